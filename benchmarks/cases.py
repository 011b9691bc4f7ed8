"""What one benchmark child process measures: ``run(spec)`` -> a dict of figures.

A spec names a case and a tool (ckptstore or a peer) and where to work. Saves stop the clock after the
data is durable (fsync of every file and directory, by the tool itself or here); restores return arrays
whose bytes are in memory (lazy tools are also timed with every page touched).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import common as c
import numpy as np

Spec = dict[str, Any]


def make_state(spec: Spec) -> dict[str, np.ndarray]:
    kind = spec["state"]
    if kind == "gpt2":
        return c.gpt2_state(spec["d_model"], spec["n_layer"])
    if kind == "small":
        return c.small_state(spec["n_tensors"])
    raise ValueError(kind)


# --- saves ----------------------------------------------------------------------------------------------


def _raw(state: dict[str, np.ndarray], path: str, early_writeback: bool) -> None:
    """The ceiling: the state's bytes, back to back, in 16 MiB writes to one file, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = flushed = 0
        for arr in state.values():
            flat = arr.reshape(-1).view(np.uint8).data
            for start in range(0, len(flat), c.CHUNK):
                done += os.write(fd, flat[start : start + c.CHUNK])
                if early_writeback and done - flushed >= 64 << 20:
                    os.posix_fadvise(fd, flushed, done - flushed, os.POSIX_FADV_DONTNEED)
                    flushed = done
        os.fsync(fd)
    finally:
        os.close(fd)
    c.fsync_tree(os.path.dirname(path))


def _no_hash() -> None:
    """Replace xxh3 with a no-op in this process only (the checksum-cost case); ckptstore has no such knob."""
    import ckptstore.tensorio as tio

    class NoHash:
        def __init__(self, *_: Any) -> None:
            pass

        def update(self, _: Any) -> None:
            pass

        def intdigest(self) -> int:
            return 0

    class Module:
        xxh3_64 = NoHash

        @staticmethod
        def xxh3_64_intdigest(_: Any) -> int:
            return 0

    tio.xxhash = Module  # type: ignore[assignment]


def _closing(fn: Callable[[], Any], store: Any) -> Callable[[], Any]:
    """``fn`` with ``fn.close``: the store's close (its background retention pass holds the store's lock
    file, which must be over before the directory is removed)."""
    fn.close = store.close  # type: ignore[attr-defined]
    return fn


def save_fn(tool: str, state: dict[str, np.ndarray], out: str) -> Callable[[], Any]:
    """A callable that saves ``state`` under ``out`` (a fresh directory) durably."""
    if tool in ("raw", "raw_early_writeback"):
        return lambda: _raw(state, os.path.join(out, "raw.bin"), tool == "raw_early_writeback")
    if tool in ("ckptstore", "ckptstore_nohash"):
        import ckptstore

        if tool == "ckptstore_nohash":
            _no_hash()
        store = ckptstore.CheckpointStore(out)
        return _closing(lambda: store.save(1, state), store)
    if tool in ("ckptstore_torch", "ckptstore_torch_inplace"):
        import ckptstore

        ts = c.to_torch(state)
        store = ckptstore.CheckpointStore(out)
        staged = tool == "ckptstore_torch"  # else direct writes from where the bytes lie, as before staging

        def save() -> None:
            with ckptstore.knobs.override(staged_writes=staged):
                store.save(1, ts)

        return _closing(save, store)
    if tool == "torch.save":
        import torch

        ts = c.to_torch(state)
        path = os.path.join(out, "model.pt")
        return lambda: (torch.save(ts, path), c.fsync_tree(path))
    if tool == "safetensors":
        # The NumPy flavour: the same Rust core as safetensors.torch, without importing torch.
        from safetensors.numpy import save_file

        path = os.path.join(out, "model.safetensors")
        return lambda: (save_file(state, path), c.fsync_tree(path))
    if tool == "np.save":

        def np_save() -> None:
            for i, arr in enumerate(state.values()):
                np.save(os.path.join(out, f"{i}.npy"), arr)
            c.fsync_tree(out)

        return np_save
    if tool in ("dcp", "dcp.async_save"):
        import torch.distributed.checkpoint as dcp

        ts = c.to_torch(state)
        if tool == "dcp":
            return lambda: dcp.save(ts, checkpoint_id=os.path.join(out, "dcp"))
        return lambda: dcp.async_save(ts, checkpoint_id=os.path.join(out, "dcp")).result()
    if tool == "orbax":
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        path = os.path.join(out, "orbax")
        return lambda: (ckptr.save(path, state), ckptr.wait_until_finished(), c.fsync_tree(path))
    raise ValueError(tool)


def case_save(spec: Spec) -> dict[str, Any]:
    state = make_state(spec)
    out = spec["out"]
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    fn = save_fn(spec["tool"], state, out)
    os.sync()  # nothing dirty from the build or earlier runs may be flushed inside the timed region
    seconds, _, mem = c.timed(fn)
    getattr(fn, "close", lambda: None)()
    res = {"seconds": seconds, "bytes": c.nbytes(state), "state_bytes": c.nbytes(state), **mem}
    manifest = [f for f in c.files_under(out) if f.endswith("manifest.msgpack")]
    if manifest:
        res["manifest_bytes"] = os.path.getsize(manifest[0])
    res["disk_bytes"] = sum(os.path.getsize(f) for f in c.files_under(out))
    if not spec.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return res


# --- restores -------------------------------------------------------------------------------------------


def _one_key(spec: Spec) -> str:
    # A mid-sized tensor from the middle of the checkpoint (a layer's MLP weight, or a small one).
    return "h.5.mlp.c_fc.weight" if spec["state"] == "gpt2" else "layer100.param3"


def restore_fn(tool: str, src: str, spec: Spec) -> Callable[[], Any]:
    """A callable that restores what ``tool`` saved under ``src`` into memory."""
    lazy = spec.get("lazy_one", False)
    key = _one_key(spec)
    if tool.startswith("ckptstore"):
        import ckptstore
        from ckptstore import load
        from ckptstore.storage import step_name

        store = ckptstore.CheckpointStore(src)
        verify = tool.endswith("+verify")
        fw = "torch" if "torch" in tool else None
        if fw:
            import torch  # imported before the clock starts, as for the torch.load runs
        if lazy:

            def one() -> Any:
                # Manifest, then one ranged read (the S3 engineer's restore(keys=...) does the same).
                name = step_name(1)
                m = load.read_manifest(store.storage, name)
                idx = next(i for i, t in enumerate(m.tensors) if t.name == key)
                return load.load_tensors(store.storage, name, m, [idx], verify=verify)[idx]

            return one
        if "mmap" in tool:  # mapped on the files: touch every page (verify hashes them all anyway)

            def mapped() -> Any:
                out = store.restore(1, framework=fw, verify=verify, mmap=True)
                if not verify:
                    for arr in out.values():
                        c.touch(arr)
                return out

            return mapped
        return lambda: store.restore(1, framework=fw, verify=verify)
    if tool.startswith("torch.load"):
        import torch

        path = os.path.join(src, "model.pt")
        mmap = "mmap" in tool
        if lazy:
            return lambda: torch.load(path, weights_only=True, mmap=True)[key].clone()
        if mmap:

            def load_touch() -> Any:
                sd = torch.load(path, weights_only=True, mmap=True)
                for t in sd.values():
                    c.touch(t.numpy())
                return sd

            return load_touch
        return lambda: torch.load(path, weights_only=True)
    if tool.startswith("safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = os.path.join(src, "model.safetensors")
        if lazy:

            def st_one() -> Any:
                with safe_open(path, "np") as f:
                    return f.get_tensor(key)

            return st_one
        if tool == "safetensors.safe_open":

            def st_all() -> Any:
                with safe_open(path, "np") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

            return st_all
        return lambda: load_file(path)
    if tool.startswith("np.load"):
        names = [f"{i}.npy" for i in range(len(spec["keys"]))]
        mmap = "mmap" in tool
        if lazy:
            i = spec["keys"].index(key)
            return lambda: np.array(np.load(os.path.join(src, names[i]), mmap_mode="r"))

        def np_all() -> Any:
            out = [np.load(os.path.join(src, n), mmap_mode="r" if mmap else None) for n in names]
            if mmap:
                for a in out:
                    c.touch(a)
            return out

        return np_all
    if tool == "orbax":
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        path = os.path.join(src, "orbax")
        return lambda: ckptr.restore(path)
    if tool == "dcp":
        import torch
        import torch.distributed.checkpoint as dcp

        # DCP loads in place: the destination tensors exist first (allocated, not timed).
        target = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in make_state(spec).items()}
        return lambda: dcp.load(target, checkpoint_id=os.path.join(src, "dcp"))
    raise ValueError(tool)


def case_restore(spec: Spec) -> dict[str, Any]:
    src = spec["src"]
    fn = restore_fn(spec["tool"], src, spec)
    if spec.get("second"):  # a first restore, untimed and dropped: the timed one fills memory touched before
        c.prime([src])
        fn()
    if spec["cache"] == "cold":
        method = c.drop_caches([src])
    else:
        c.prime([src])
        method = "primed"
    seconds, _, mem = c.timed(fn)
    return {"seconds": seconds, "bytes": spec["bytes"], "cache_method": method, **mem}


def case_prepare(spec: Spec) -> dict[str, Any]:
    """Write a checkpoint with a tool for later restores (not timed)."""
    spec = {**spec, "out": spec["src"], "keep": True, "tool": spec["writer"]}
    res = case_save(spec)
    res["keys"] = list(make_state(spec).keys()) if spec["writer"] == "np.save" else None
    return res


# --- machine ceilings -----------------------------------------------------------------------------------


def case_memcpy(spec: Spec) -> dict[str, Any]:
    n = spec["bytes"]
    src = np.ones(n, dtype=np.uint8)
    import mmap

    t0 = time.perf_counter()
    dst = src.copy()  # into fresh pages (page faults included); numpy asks for huge pages (MADV_HUGEPAGE)
    fresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # fresh pages, the default (4 KiB) size
    np.copyto(np.frombuffer(m, dtype=np.uint8), src)
    fresh_4k = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.copyto(dst, src)  # into pages already touched
    warm = time.perf_counter() - t0
    import xxhash

    t0 = time.perf_counter()
    view = src.data
    for start in range(0, n, c.CHUNK):
        xxhash.xxh3_64_intdigest(view[start : start + c.CHUNK])
    hashing = time.perf_counter() - t0
    return {"seconds": warm, "fresh_seconds": fresh, "fresh_4k_seconds": fresh_4k, "xxh3_seconds": hashing, "bytes": n}


def case_read_ceiling(spec: Spec) -> dict[str, Any]:
    """Sequential read of a file with 16 MiB readinto calls into one reused buffer."""
    path = spec["src"]
    method = c.drop_caches([path]) if spec["cache"] == "cold" else (c.prime([path]) or "primed")
    buf = bytearray(c.CHUNK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        n = 0
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return {"seconds": time.perf_counter() - t0, "bytes": n, "cache_method": method}


# --- async saves ----------------------------------------------------------------------------------------


def case_async(spec: Spec) -> dict[str, Any]:
    """A training loop of fixed compute steps (one thread) with a save in flight: blocking time of save(),
    loop slowdown while the save runs, against an in-memory copy and a blocking save."""
    import torch

    torch.set_num_threads(1)
    state = c.to_torch(make_state(spec))
    out = spec["out"]
    shutil.rmtree(out, ignore_errors=True)
    tool = spec["tool"]
    x = torch.rand(spec["matmul"], spec["matmul"])

    def step() -> float:
        t0 = time.perf_counter()
        (x @ x).sum().item()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    base = float(np.median([step() for _ in range(20)]))

    # Copy of the state into fresh memory (what the first snapshot of a process pays: its staging buffer
    # is new), then into buffers already touched (what a snapshot costs at best).
    t0 = time.perf_counter()
    fresh = {k: v.clone() for k, v in state.items()}
    fresh_copy_s = time.perf_counter() - t0
    del fresh
    staging = {k: torch.empty_like(v) for k, v in state.items()}
    for k, v in state.items():
        staging[k].copy_(v)
    t0 = time.perf_counter()
    for k, v in state.items():
        staging[k].copy_(v)
    copy_s = time.perf_counter() - t0
    del staging

    res: dict[str, Any] = {"bytes": c.nbytes(state), "step_s": base, "copy_s": copy_s, "fresh_copy_s": fresh_copy_s}
    if tool == "ckptstore":
        import ckptstore

        store = ckptstore.CheckpointStore(out)
        os.sync()
        t0 = time.perf_counter()
        store.save(0, state)
        res["blocking_save_s"] = time.perf_counter() - t0

        def start(i: int) -> Any:
            return store.save(i, state, blocking=False)

        def finish(h: Any) -> None:
            h.result()

    else:
        import torch.distributed.checkpoint as dcp

        os.sync()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=os.path.join(out, "0"))
        res["blocking_save_s"] = time.perf_counter() - t0

        def start(i: int) -> Any:
            return dcp.async_save(state, checkpoint_id=os.path.join(out, str(i)))

        def finish(h: Any) -> None:
            h.result()

    for i, label in ((1, "first"), (2, "steady")):
        os.sync()
        t0 = time.perf_counter()
        h = start(i)
        blocked = time.perf_counter() - t0
        steps = []
        while not h.done():
            steps.append(step())
        finish(h)
        total = time.perf_counter() - t0
        # Stall: how much longer the loop's steps took than the same steps without a save in flight.
        res[f"{label}_blocked_s"] = blocked
        res[f"{label}_total_s"] = total
        res[f"{label}_steps"] = len(steps)
        res[f"{label}_step_slowdown"] = (float(np.median(steps)) / base) if steps else None
    if tool == "ckptstore":
        store.close()
    shutil.rmtree(out, ignore_errors=True)
    res["seconds"] = res["steady_blocked_s"]
    return res


def case_hashcost(spec: Spec) -> dict[str, Any]:
    """The checksum's cost without the disk: ckptstore's write loop over the state into one file in
    /dev/shm, overwritten in place (its pages stay allocated), with xxh3 and with a no-op hash,
    alternately; medians of ``rounds`` each."""
    import ckptstore.tensorio as tio
    from ckptstore import tree

    state = make_state(spec)
    _, arrays = tree.flatten(state)
    names = tio.tensor_names(arrays)
    plan = tio.FilePlan("x.safetensors", tuple(range(len(arrays))))
    base = "/dev/shm" if os.path.isdir("/dev/shm") else spec["out"]
    path = os.path.join(base, f"ckptstore-hashcost-{os.getpid()}")
    real = tio.xxhash
    times: dict[str, list[float]] = {"xxh3": [], "none": []}
    try:
        with open(path, "wb") as f:
            tio.write_file(f, arrays, names, plan, 0)  # allocate the file's pages once
        for _ in range(spec.get("rounds", 7)):
            for mode in times:
                if mode == "none":
                    _no_hash()
                with open(path, "r+b") as f:
                    t0 = time.perf_counter()
                    tio.write_file(f, arrays, names, plan, 0)
                    times[mode].append(time.perf_counter() - t0)
                tio.xxhash = real
    finally:
        tio.xxhash = real
        os.unlink(path)
    with_hash, without = (float(np.median(times[m])) for m in ("xxh3", "none"))
    return {"seconds": with_hash, "bytes": c.nbytes(state), "nohash_s": without, "where": base}


# --- restore into an existing model and optimizer (issue #15) -----------------------------------------


def _model_and_opt(spec: Spec, seed: int) -> tuple[Any, Any]:
    """A GPT-2-shaped module of fp32 parameters (or, with ``n_small``, that many parameters of 64 floats)
    and an AdamW that has stepped once (its exp_avg and exp_avg_sq exist): the state a resume restores
    into."""
    import torch

    torch.manual_seed(seed)
    m = torch.nn.Module()
    if spec.get("n_small"):  # many small tensors: n parameters of 64 floats (with AdamW's: 4n tensors)
        shapes = {f"p{i}": (64,) for i in range(spec["n_small"])}
    else:
        shapes = c.gpt2_shapes(spec["d_model"], spec["n_layer"])
    for k, shape in shapes.items():
        m.register_parameter(k.replace(".", "_"), torch.nn.Parameter(torch.rand(shape)))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.rand_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return m, opt


def _state_tensors(m: Any, opt: Any) -> list[Any]:
    """Every tensor of the module and the optimizer, in the order of their state dicts."""
    out = list(m.state_dict().values())
    for st in opt.state_dict()["state"].values():
        out.extend(v for v in st.values() if hasattr(v, "data_ptr"))
    return out


def case_prepare_into(spec: Spec) -> dict[str, Any]:
    """The same model + AdamW state as a ckptstore checkpoint, a torch.save file and one raw file (not timed)."""
    import torch

    import ckptstore

    src = spec["src"]
    os.makedirs(src, exist_ok=True)
    m, opt = _model_and_opt(spec, seed=0)
    ckptstore.CheckpointStore(os.path.join(src, "ckptstore")).save(1, {"model": m, "opt": opt})
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, os.path.join(src, "model.pt"))
    tensors = _state_tensors(m, opt)
    with open(os.path.join(src, "raw.bin"), "wb") as f:
        for t in tensors:
            f.write(t.numpy().reshape(-1).view(np.uint8).data)
    c.fsync_tree(src)
    return {"seconds": 0.0, "bytes": sum(t.nbytes for t in tensors)}


def case_restore_into(spec: Spec) -> dict[str, Any]:
    """A resume: the checkpoint restored into a model and an AdamW built (and stepped) before the clock, from
    the page cache (``cache`` "warm") or the disk ("cold": the files evicted first)."""
    import torch

    src, tool = spec["src"], spec["tool"]
    m, opt = _model_and_opt(spec, seed=1)
    tensors = _state_tensors(m, opt)
    if tool == "torch.load+load_state_dict":
        path = os.path.join(src, "model.pt")

        def fn() -> Any:
            sd = torch.load(path, weights_only=True)
            m.load_state_dict(sd["model"])
            opt.load_state_dict(sd["opt"])

    elif tool.startswith("ckptstore"):
        import ckptstore

        store = ckptstore.CheckpointStore(os.path.join(src, "ckptstore"))
        verify = "verify=False" not in tool
        threads = 1 if "1 thread" in tool else ckptstore.knobs.current.read_threads

        def fn() -> Any:
            with ckptstore.knobs.override(read_threads=threads):
                return store.restore(1, like={"model": m, "opt": opt}, verify=verify)

    elif tool == "readinto its file (ceiling)":
        # The same file ckptstore reads, sequentially, 16 MiB a call, into memory touched before the clock:
        # on this VM a cold read's speed depends on the file (the host caches the disk image), so only the
        # checkpoint's own file is a like-for-like ceiling.
        step = os.path.join(src, "ckptstore", "step_00000001")
        files = sorted(os.path.join(step, n) for n in os.listdir(step) if n.endswith(".safetensors"))
        into = np.ones(max(os.path.getsize(p) for p in files), dtype=np.uint8)

        def fn() -> Any:
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    view, got = memoryview(into), 0
                    while n := f.readinto(view[got : got + (16 << 20)]):
                        got += n

    elif tool == "readinto (ceiling)":
        views = [t.numpy().reshape(-1).view(np.uint8) for t in tensors]
        path = os.path.join(src, "raw.bin")

        def fn() -> Any:
            with open(path, "rb", buffering=0) as f:
                for v in views:
                    got = 0
                    while got < v.nbytes:
                        got += f.readinto(v.data[got:])

    else:
        raise ValueError(tool)
    if spec.get("second"):  # a first restore, untimed and dropped
        c.prime([src])
        fn()
    method = c.drop_caches([src]) if spec.get("cache") == "cold" else (c.prime([src]) or "primed")
    seconds, _, mem = c.timed(fn)
    return {"seconds": seconds, "bytes": sum(t.nbytes for t in tensors), "cache_method": method, **mem}


CASES: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "hashcost": case_hashcost,
    "save": case_save,
    "restore": case_restore,
    "prepare": case_prepare,
    "memcpy": case_memcpy,
    "read_ceiling": case_read_ceiling,
    "async": case_async,
    "prepare_into": case_prepare_into,
    "restore_into": case_restore_into,
}


def run(spec: Spec) -> dict[str, Any]:
    return CASES[spec["case"]](spec)


# --- S3 (moto server on loopback) -----------------------------------------------------------------------


def _count_requests(fs: Any) -> dict[str, int]:
    """Count the HTTP requests an s3fs filesystem sends, by operation."""
    counts: dict[str, int] = {}

    def hook(model: Any = None, **_: Any) -> None:
        name = getattr(model, "name", "?")
        counts[name] = counts.get(name, 0) + 1

    fs.connect()
    fs.s3.meta.events.register("before-call.s3", hook)
    return counts


def case_s3(spec: Spec) -> dict[str, Any]:
    import s3fs

    state = make_state(spec)
    size = c.nbytes(state)
    opts = spec["storage_options"]
    url = spec["url"]
    tool, op = spec["tool"], spec["op"]
    if tool == "ckptstore":
        import ckptstore

        store = ckptstore.CheckpointStore(url, storage_options=opts)
        counts = _count_requests(store.storage.fs)  # type: ignore[attr-defined]
        if op == "save":
            fn: Callable[[], Any] = lambda: store.save(spec["step"], state)  # noqa: E731
        else:
            fn = lambda: store.restore(spec["step"])  # noqa: E731
    else:
        fs = s3fs.S3FileSystem(**opts)
        counts = _count_requests(fs)
        path = f"{url.removeprefix('s3://')}/plain-{spec['step']}.bin"
        if op == "save":
            blob = b"".join(bytes(a.reshape(-1).view(np.uint8).data) for a in state.values())

            def put() -> None:
                fs.pipe_file(path, blob)

            fn = put
        else:
            fn = lambda: fs.cat_file(path)  # noqa: E731
    seconds, _, mem = c.timed(fn)
    return {"seconds": seconds, "bytes": size, "requests": sum(counts.values()), "by_operation": counts, **mem}


CASES["s3"] = case_s3
