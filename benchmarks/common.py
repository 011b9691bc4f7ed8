"""Helpers for benchmark children: the states, durability, page cache control, memory high-water marks.

Every measurement runs in a fresh process (see run.py), so RSS and the Python heap start clean; these
helpers are what such a process needs. Linux-specific where it must be (/proc).
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

CHUNK = 16 << 20


def gpt2_shapes(d_model: int, n_layer: int, vocab: int = 50304, ctx: int = 1024) -> dict[str, tuple[int, ...]]:
    """GPT-2-shaped parameters: token and position embeddings, per layer two layer norms, attention
    (qkv, proj) and MLP (fc, proj) weights and biases; 12 tensors a layer, 4 more at the ends."""
    d = d_model
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (ctx, d)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def gpt2_state(d_model: int, n_layer: int) -> dict[str, np.ndarray]:
    """fp32 arrays of :func:`gpt2_shapes`, filled with seeded random values."""
    rng = np.random.default_rng(0)
    return {k: rng.random(s, dtype=np.float32) for k, s in gpt2_shapes(d_model, n_layer).items()}


def small_state(n: int) -> dict[str, np.ndarray]:
    """``n`` fp32 tensors of 64 to 4096 values each (sizes drawn uniformly, seeded)."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(64, 4097, n)
    return {f"layer{i // 8}.param{i % 8}": rng.random(int(k), dtype=np.float32) for i, k in enumerate(sizes)}


def to_torch(state: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v) for k, v in state.items()}


def nbytes(state: dict[str, Any]) -> int:
    return int(sum(v.nbytes for v in state.values()))


# --- durability and the page cache ------------------------------------------------------------------


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(out)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and every directory (what a checkpointer that does not fsync
    itself needs before it can claim the data is durable)."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = [path] if os.path.isdir(path) else [os.path.dirname(path)]
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_caches(paths: Iterable[str]) -> str:
    """Evict the files from the page cache; returns the method used. ``drop_caches`` (root) evicts
    everything clean; otherwise posix_fadvise(DONTNEED) per file (clean pages of those files only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        for f in files_under(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def prime(paths: Iterable[str]) -> None:
    """Read every file once so that it sits in the page cache (a warm read)."""
    buf = bytearray(CHUNK)
    for p in paths:
        for f in files_under(p):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def touch(arr: Any) -> None:
    """Fault in every page of a lazily mapped array (one byte read per 4 KiB)."""
    a = np.asarray(arr).reshape(-1).view(np.uint8)
    if a.size:
        int(a[::4096].sum())


# --- memory -------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _status("VmRSS")


def hwm() -> int:
    return _status("VmHWM")


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0, writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any]) -> tuple[float, Any, dict[str, int]]:
    """Run ``fn``; return seconds, its result, and: RSS before, the high-water mark above it, CPU seconds
    (user + system, all threads: a figure that the disk's mood does not change)."""
    reset = reset_hwm()
    before = rss()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = hwm()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, out, {"rss_before": before, "extra_peak": max(0, peak - before) if reset else -1, "cpu_seconds": cpu}


def fork_ranks(world: int, port: int, rank_main: Callable[[], None]) -> list[int]:
    """Fork one process per rank of a torch.distributed job on 127.0.0.1:``port`` (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set), each running ``rank_main()``; return their exit
    codes once all have ended (1 for a rank that raised, its traceback printed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ["RANK"] = str(rank)
                rank_main()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
