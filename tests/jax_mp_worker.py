"""One process of a multi-process JAX job for tests/test_jax_multiprocess.py.

Run as ``python tests/jax_mp_worker.py CONFIG.json PROCESS_ID``, with ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (each process: 2 CPU devices). The process joins
JAX's distributed runtime (a coordinator on 127.0.0.1, gloo CPU collectives), runs the config's phases
and writes what it saw to ``OUT/rank<id>.json``. Phases:

- ``save``: save the global state (``state()``) at a step; ``kill_marker``: rank ``kill_rank`` creates that
  file when it starts writing its tensor file and then blocks until it is killed.
- ``save`` with ``fail_rank``: that process's tensor file fails to be written (an injected OSError).
- ``keys``: typed PRNG keys, replicated and sharded over both processes, saved and restored.
- ``alone``: process 0 saves by itself, with JAX's coordinator (it must fail, saying why) and with
  ``SINGLE`` (a sharded array is refused, a replicated one saved).
- ``resolve``: torch.distributed initialised beside JAX, with the same ranks and with them swapped: which
  coordinator ckptstore picks, or its error.
- ``restore``: restore into templates on a mesh (``mesh``: "2x2", "4x1", ...) with ``verify``, check every
  addressable block against the expected values and the sharding against the template's; record the bytes
  this process read per stored array.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# Every global array of the saved state: (name, shape, dtype, partition spec on the ("x", "y") mesh).
ARRAYS: list[tuple[str, tuple[int, ...], str, tuple[Any, ...]]] = [
    ("w", (8, 6), "float32", ("x", "y")),  # 4 distinct blocks, 2 per process
    ("b", (8,), "bfloat16", ("y",)),  # 2 blocks, each on both processes: written once each
    ("h", (4, 4), "float16", ("x",)),  # each process holds its half twice (its two devices)
    ("r", (4, 3), "int32", ()),  # fully replicated: a plain array, written once
    ("m", (6, 2), "uint8", (None, "y")),
    ("z", (4, 4), "bool", ("x", None)),
    ("e", (4, 2), "float8_e4m3fn", ("x",)),
    ("c", (4,), "complex64", ("x",)),
    ("k", (4,), "int16", ("x",)),
]


def expected(name: str) -> np.ndarray:
    """The global value of array ``name`` (the same in every process)."""
    import ml_dtypes

    _, shape, dtype, _ = next(a for a in ARRAYS if a[0] == name)
    n = int(np.prod(shape))
    base = np.arange(n, dtype=np.float64).reshape(shape)
    if dtype == "bool":
        return (base % 3 == 0).reshape(shape)
    if dtype in ("bfloat16", "float8_e4m3fn"):
        return (base * 0.5 - 3).astype(getattr(ml_dtypes, dtype))
    if dtype == "complex64":
        return (base * 1.5 - 7 + 1j * base).astype(np.complex64)
    if dtype == "uint8":
        return (base * 7 % 256).astype(np.uint8)
    return (base * 1.5 - 7).astype(dtype)


def mesh_of(kind: str) -> Any:
    import jax
    from jax.sharding import Mesh

    if kind == "4x1":  # another mesh shape over the same devices, another order
        devices = np.array(jax.devices()[::-1]).reshape(4, 1)
    else:
        rows, cols = (int(d) for d in kind.split("x"))
        devices = np.array(jax.devices()).reshape(rows, cols)
    return Mesh(devices, ("x", "y"))


def sharding_of(mesh: Any, spec: tuple[Any, ...]) -> Any:
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*spec))


def state(mesh: Any) -> dict[str, Any]:
    import jax

    out: dict[str, Any] = {}
    for name, shape, _, spec in ARRAYS:
        full = expected(name)
        out[name] = jax.make_array_from_callback(shape, sharding_of(mesh, spec), full.__getitem__)
    out["step_count"] = 7
    return out


class Recorder(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_array(name: str, got: Any, want_sharding: Any) -> list[str]:
    """What is wrong with restored ``got`` (nothing: an empty list)."""
    import jax

    problems = []
    full = expected(name)
    if not isinstance(got, jax.Array):
        return [f"{name}: a {type(got).__name__}"]
    if got.shape != full.shape or got.dtype != full.dtype:
        problems.append(f"{name}: shape {got.shape} dtype {got.dtype}, want {full.shape} {full.dtype}")
    if not got.sharding.is_equivalent_to(want_sharding, got.ndim):
        problems.append(f"{name}: sharding {got.sharding}, want {want_sharding}")
    for s in got.addressable_shards:
        if not np.array_equal(np.asarray(s.data), full[s.index]):
            problems.append(f"{name}: block {s.index} on {s.device} differs")
    return problems


def run(cfg: dict[str, Any], pid: int) -> dict[str, Any]:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg["coordinator"],
        num_processes=cfg["processes"],
        process_id=pid,
        initialization_timeout=60,
        heartbeat_timeout_seconds=cfg.get("heartbeat_s", 100),
    )
    import ckptstore
    from ckptstore import block_read, distributed, tensorio

    report: dict[str, Any] = {"rank": pid, "processes": jax.process_count(), "devices": jax.local_device_count()}
    coordinator = None if cfg.get("timeout_s") is None else distributed.JaxDistributed(timeout_s=cfg["timeout_s"])
    store = ckptstore.CheckpointStore(
        cfg["url"], storage_options=cfg.get("storage_options") or None, coordinator=coordinator
    )
    report["coordinator"] = type(distributed.resolve(store.coordinator)).__name__
    read: dict[str, int] = {}
    real_read_bytes = block_read.BlockReader._read_bytes

    def counting_read_bytes(self: Any, entry: Any, pos: int, n: int, into: Any = None) -> Any:
        key = entry.name.partition("@")[0]
        read[key] = read.get(key, 0) + n
        return real_read_bytes(self, entry, pos, n, into)

    block_read.BlockReader._read_bytes = counting_read_bytes  # type: ignore[method-assign]
    for phase in cfg["phases"]:
        kind = phase["kind"]
        if kind == "save":
            real = tensorio.write_file
            if phase.get("kill_rank") == pid:

                def write_then_hang(*args: Any, marker: str = phase["kill_marker"], **kwargs: Any) -> Any:
                    Path(marker).touch()
                    threading.Event().wait(120)  # killed by the test long before
                    raise OSError("not killed")

                tensorio.write_file = write_then_hang
            if phase.get("fail_rank") == pid:

                def failing_write_file(*args: Any, **kwargs: Any) -> Any:
                    raise OSError(28, "injected: no space left")

                tensorio.write_file = failing_write_file
            mesh = mesh_of(phase.get("mesh", "2x2"))
            try:
                saved = state(mesh)
                if phase.get("per_rank"):  # this process's own value, of a size its own
                    saved["pos"] = ckptstore.PerRank({"process": pid, "seen": np.arange(pid + 2)})
                if phase.get("blocking", True):
                    store.save(phase["step"], saved)
                else:  # in the background, while the training runs a computation across the processes
                    import jax.numpy as jnp

                    handle = store.save(phase["step"], saved, blocking=False)
                    total = jax.jit(lambda x: jnp.sum(x))(saved["w"])  # a cross-process reduction meanwhile
                    report["sum"] = float(total)
                    handle.result(timeout=120)
                report["saved"] = phase["step"]
            except ckptstore.errors.CkptStoreError as e:
                report["save_error"] = f"{type(e).__name__}: {e}"
            tensorio.write_file = real
        elif kind == "keys":  # typed PRNG keys: saved as their implementation and their key data
            mesh = mesh_of("2x2")

            def keys_on(spec: tuple[Any, ...], seed: int, mesh: Any = mesh) -> Any:  # each process its blocks
                return jax.jit(
                    lambda: jax.random.split(jax.random.key(seed), 4), out_shardings=sharding_of(mesh, spec)
                )()

            for step, spec in ((30, ()), (31, ("x",))):  # replicated, and sharded over the processes
                keys = keys_on(spec, 3)
                store.save(step, {"k": keys})
                back = store.restore(step, like={"k": keys_on(spec, 0)})["k"]
                same = jax.random.key_data(back) == jax.random.key_data(keys)
                report[f"keys_{step}"] = [bool(np.asarray(b.data).all()) for b in same.addressable_shards]
                report[f"keys_{step}_sharding"] = back.sharding.is_equivalent_to(keys.sharding, keys.ndim)
        elif kind == "alone":  # process 0 saves by itself: without SINGLE it waits, warns, then fails
            if pid == 0:
                recorder = Recorder()
                logging.getLogger("ckptstore.distributed").addHandler(recorder)
                mesh = mesh_of("2x2")
                with ckptstore.knobs.override(join_warn_s=1.0):
                    try:
                        alone = ckptstore.CheckpointStore(cfg["url"], coordinator=distributed.JaxDistributed(4))
                        alone.save(20, {"n": 1})
                    except ckptstore.errors.CkptStoreError as e:
                        report["alone_error"] = f"{type(e).__name__}: {e}"
                report["alone_warned"] = recorder.messages
                single = ckptstore.CheckpointStore(cfg["url"], coordinator=distributed.SINGLE)
                try:
                    single.save(21, {"w": state(mesh)["w"]})  # only half of w is this process's
                except ckptstore.errors.CkptStoreError as e:
                    report["single_error"] = f"{type(e).__name__}: {e}"
                single.save(22, {"r": state(mesh)["r"]})  # replicated everywhere: this process has it all
        elif kind == "resolve":
            import torch.distributed as dist

            for label, rank, port in (
                ("same", pid, cfg["torch_ports"][0]),
                ("swapped", 1 - pid, cfg["torch_ports"][1]),
            ):
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
                try:
                    report[f"resolve_{label}"] = type(distributed.resolve(None)).__name__
                except ckptstore.errors.CkptStoreError as e:
                    report[f"resolve_{label}"] = f"{type(e).__name__}: {e}"
                dist.destroy_process_group()
        elif kind == "restore":
            mesh = mesh_of(phase["mesh"])
            specs = {name: tuple(s) for name, s in phase.get("specs", {}).items()}
            like: dict[str, Any] = {"step_count": 0}
            wanted = {}
            for name, shape, dtype, spec in ARRAYS:
                sharding = sharding_of(mesh, specs.get(name, spec))
                wanted[name] = sharding
                if phase.get("arrays_as_like"):
                    like[name] = jax.make_array_from_callback(shape, sharding, np.zeros(shape, dtype).__getitem__)
                else:
                    like[name] = jax.ShapeDtypeStruct(shape, expected(name).dtype, sharding=sharding)
            if phase.get("per_rank"):
                like["pos"] = ckptstore.PerRank({"process": -1, "seen": np.zeros(pid + 2, dtype=np.int64)})
            read.clear()
            out = store.restore(phase.get("step"), like=like, verify=phase.get("verify", True))
            problems = [p for name in wanted for p in check_array(name, out[name], wanted[name])]
            if phase.get("per_rank") and (
                out["pos"]["process"] != pid or out["pos"]["seen"].tolist() != list(range(pid + 2))
            ):
                problems.append(f"pos {out['pos']}")
            if out["step_count"] != 7:
                problems.append(f"step_count {out['step_count']}")
            blocks = {name: sorted({str(sh.index) for sh in out[name].addressable_shards}) for name in wanted}
            report.setdefault("restores", []).append({"problems": problems, "read": dict(read), "blocks": blocks})
    store.close()
    if cfg.get("shutdown", True):
        jax.distributed.shutdown()  # a barrier: process 0 (the coordination service) ends last
    return report


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    pid = int(sys.argv[2])
    out = Path(cfg["out"]) / f"rank{pid}.json"
    try:
        report = run(cfg, pid)
    except BaseException as e:
        report = {"rank": pid, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out.write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)  # no shutdown handshake with a peer that may be dead


if __name__ == "__main__":
    main()
