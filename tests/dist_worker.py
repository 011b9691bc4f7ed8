"""One rank of a multi-process test job (torch.distributed, gloo, CPU), started by tests/test_distributed.py.

Usage: ``python tests/dist_worker.py``, then one JSON job config a line on its stdin (see :func:`zygote`);
each job forks one process per rank. Each rank writes ``<out>/rank<r>.json`` with what it saw and logs to
``<out>/log<r>.txt``; the test reads those files.

The state is a pure function of (step, rank, world size, partition), so any process can compute what a
restore must give back. Partition "a" is the one saves use, "b" another one for restores (columns where
"a" has rows, and so on), so a restore on another number of ranks reads blocks that straddle stored ones.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

import ckptstore
from ckptstore import Shard

# Global arrays: name -> (shape, dtype).
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "w": ((13, 6), "float32"),
    "emb": ((5, 9, 3), "int64"),
    "grid": ((6, 8), "float32"),
    "m": ((13, 6), "float64"),
    "dt": ((10, 4), "float32"),
    "bias": ((7,), "float32"),
}


def full(name: str, step: int) -> np.ndarray:
    """The global array ``name`` at ``step``: distinct values everywhere, exact in every dtype used."""
    shape, dtype = SHAPES[name]
    base = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return (base + 1000 * step + 100_000 * list(SHAPES).index(name)).astype(dtype)


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """(start, size) of part ``i`` of ``n`` items cut into ``parts`` nearly equal runs (np.array_split)."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, q + (1 if i < r else 0)


def block(name: str, rank: int, world: int, partition: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of this rank's block of ``name`` under a partition."""
    shape, _ = SHAPES[name]
    dim = {
        ("a", "w"): 0,
        ("a", "emb"): 1,
        ("a", "m"): 0,
        ("a", "grid"): 1,
        ("b", "w"): 1,
        ("b", "emb"): 0,
        ("b", "m"): 1,
        ("b", "grid"): 0,
        ("b", "bias"): 0,
    }[(partition, name)]
    offsets, sizes = [0] * len(shape), list(shape)
    if name == "grid" and partition == "a" and world == 4:  # a 2 x 2 grid of blocks
        for d, i in ((0, rank // 2), (1, rank % 2)):
            offsets[d], sizes[d] = split(shape[d], 2, i)
        return tuple(offsets), tuple(sizes)
    offsets[dim], sizes[dim] = split(shape[dim], world, rank)
    return tuple(offsets), tuple(sizes)


def shard(name: str, step: int, rank: int, world: int, partition: str) -> Shard:
    offsets, shape = block(name, rank, world, partition)
    region = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
    return Shard(np.ascontiguousarray(full(name, step)[region]), SHAPES[name][0], offsets)


def dtensor(step: int, dim: int, zeros: bool = False) -> Any:
    """``dt`` as a DTensor sharded on ``dim`` over all ranks (built from local pieces, no communication)."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    gshape = SHAPES["dt"][0]
    shape, offsets = compute_local_shape_and_global_offset(gshape, mesh, [TShard(dim)])
    region = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
    local = torch.from_numpy(np.ascontiguousarray(full("dt", step)[region]))
    if zeros:
        local = torch.zeros_like(local)
    stride = torch.empty(gshape).stride()
    return DTensor.from_local(local, mesh, [TShard(dim)], run_check=False, shape=torch.Size(gshape), stride=stride)


def state(step: int, rank: int, world: int) -> dict[str, Any]:
    """What every rank saves: sharded arrays (Shards, a DTensor), replicated arrays, plain values."""
    import torch

    return {
        "model": {"w": shard("w", step, rank, world, "a"), "emb": shard("emb", step, rank, world, "a")},
        "opt": {"m": shard("m", step, rank, world, "a"), "count": step, "lr": 0.5},
        "grid": shard("grid", step, rank, world, "a"),
        "dt": dtensor(step, 0),
        "bias": full("bias", step),  # replicated: the same on every rank
        "flags": torch.arange(5, dtype=torch.int32) + step,  # replicated, torch
    }


def like(rank: int, world: int) -> dict[str, Any]:
    """A restore template with partition "b" (zeros: the values must come from the checkpoint)."""

    def z(name: str) -> Shard:
        s = shard(name, 0, rank, world, "b")
        return Shard(np.zeros_like(s.local), s.global_shape, s.offsets)

    import torch

    return {
        "model": {"w": z("w"), "emb": z("emb")},
        "opt": {"m": z("m"), "count": 0, "lr": 0.0},
        "grid": z("grid"),
        "dt": dtensor(0, 1, zeros=True),
        "bias": z("bias"),
        "flags": torch.zeros(5, dtype=torch.int32),
    }


def check_restored(got: dict[str, Any], step: int, rank: int, world: int) -> list[str]:
    """Mismatches between a partition-"b" restore and the saved step (empty: all exact)."""
    bad = []
    for name, value in [
        ("w", got["model"]["w"]),
        ("emb", got["model"]["emb"]),
        ("m", got["opt"]["m"]),
        ("grid", got["grid"]),
        ("bias", got["bias"]),
    ]:
        want = shard(name, step, rank, world, "b")
        if not isinstance(value, Shard) or value.offsets != want.offsets or value.global_shape != want.global_shape:
            bad.append(f"{name}: got {value!r}")
        elif value.local.dtype != want.local.dtype or not np.array_equal(value.local, want.local):
            bad.append(f"{name}: values differ")
    dt = got["dt"]
    from torch.distributed.tensor import DTensor

    expected_dt = dtensor(step, 1)
    if not isinstance(dt, DTensor) or dt.placements != expected_dt.placements:
        bad.append(f"dt: got {type(dt).__name__}")
    elif not np.array_equal(dt.to_local().numpy(), expected_dt.to_local().numpy()):
        bad.append("dt: values differ")
    if got["opt"]["count"] != step or got["opt"]["lr"] != 0.5:
        bad.append(f"plain values: {got['opt']}")
    if got["flags"].tolist() != list(range(step, step + 5)):
        bad.append(f"flags: {got['flags']}")
    return bad


def loader(rank: int, world: int) -> Any:
    """Rank ``rank``'s data loader: its own slice of the data, shuffled by its own generator."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(rank, 96, world))
    return StatefulDataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(100 + rank))


def batches(it: Any, n: int) -> list[list[int]]:
    return [next(it).tolist() for _ in range(n)]


def per_rank_state(rank: int, dl: Any, reshard: bool = False) -> dict[str, Any]:
    """A state with per-rank parts: each rank's data loader, and a value whose structure differs by rank.
    As a template (``dl`` fresh), with ``reshard``: the functions a restore on another world size needs."""
    import torch

    seen = {"rank": rank, "ids": torch.arange(rank + 1) * 10, "by_rank": {f"r{rank}": rank}}
    if not reshard:
        return {"bias": full("bias", 1), "loader": ckptstore.PerRank(dl), "seen": ckptstore.PerRank(seen)}
    return {
        "bias": full("bias", 1),
        # every new rank continues from saved rank 0's position (its sampler state and generator)
        "loader": ckptstore.PerRank(dl, reshard=lambda saved, r, world: saved[0]),
        "seen": ckptstore.PerRank(None, reshard=lambda saved, r, world: {"saved": saved, "me": [r, world]}),
    }


def sharded_module(step: int, dim: int, zeros: bool = False) -> Any:
    """A module whose parameters are DTensors sharded on ``dim`` over all ranks (as FSDP2 leaves them):
    ``w`` (13 x 6) and ``p0`` ... ``p15`` (256 x 768 each, 12 MiB in all: enough to see a second copy
    in the process's memory). ``zeros``: -1 everywhere, its memory touched (as a model's is)."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    module = torch.nn.Module()
    for name, gshape in [("w", SHAPES["w"][0])] + [(f"p{i}", (256, 768)) for i in range(16)]:
        shape, offsets = compute_local_shape_and_global_offset(gshape, mesh, [TShard(dim)])
        if zeros:
            local = torch.full(tuple(shape), -1.0)
        else:
            base = torch.arange(int(np.prod(gshape)), dtype=torch.float32).reshape(gshape) + 1000 * step
            local = base[tuple(slice(o, o + n) for o, n in zip(offsets, shape))].contiguous()
        stride = torch.empty(gshape).stride()
        value = DTensor.from_local(local, mesh, [TShard(dim)], run_check=False, shape=torch.Size(gshape), stride=stride)
        module.register_parameter(name, torch.nn.Parameter(value))
    return module


def peak_growth(fn: Any) -> tuple[int, Any]:
    """How far this process's peak resident memory rose above its current one while ``fn`` ran."""

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    got = fn()
    return status("VmHWM") - before, got


def failing_write_file(f: Any, *args: Any, **kwargs: Any) -> Any:
    """A tensorio.write_file that fails half-way, as a full disk would: its file's writes raise what the
    storage boundary raises for ENOSPC."""
    f.write(b"partial bytes of a tensor file")
    raise ckptstore.errors.StorageError(errno.ENOSPC, "No space left on device (injected)")


def slow_write_file(marker: str) -> Any:
    """A tensorio.write_file that writes a little, then says so through ``marker`` and hangs (the test
    SIGKILLs the process there: a rank killed in the middle of writing its files)."""

    def write_file(f: Any, *args: Any, **kwargs: Any) -> Any:
        f.write(b"partial bytes of a tensor file")
        f.flush()
        Path(marker).touch()
        time.sleep(600)
        raise AssertionError("not killed")

    return write_file


def torch_zeros(n: int) -> Any:
    import torch

    return torch.zeros(n, dtype=torch.int64)


def run_phase(store: ckptstore.CheckpointStore, phase: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """One phase of a job; returns what this rank saw."""
    import torch.distributed as dist

    out: dict[str, Any] = {}
    mode = phase["mode"]
    if mode == "save":
        out["infos"] = []
        for step in phase["steps"]:
            info = store.save(step, state(step, rank, world), metadata={"step": step, "rank": rank})
            out["infos"].append([info.step, info.nbytes, info.metadata])
    elif mode == "restore":
        got = store.restore(like=like(rank, world))  # the latest step, as rank 0 sees it
        out["bad"] = check_restored(got, phase["expect_step"], rank, world)
    elif mode == "fail":
        # One rank's state cannot be saved; the ranks' shards overlap; one rank's disk fails. Every rank
        # must raise the same error class, nothing must be committed, and the job must save afterwards.
        out["errors"] = []
        bad_state = state(7, rank, world)
        if rank == world - 1:
            bad_state["opt"]["oops"] = object()
        try:
            store.save(7, bad_state)
        except ckptstore.errors.CkptStoreError as e:
            out["errors"].append([type(e).__name__, str(e)])
        overlapping = state(8, rank, world)
        rows = slice(4 * rank, 4 * rank + 8)  # rank 0: rows 0..7, rank 1: rows 4..11, ...
        overlapping["model"]["w"] = Shard(full("w", 8)[rows], (13, 6), (rows.start, 0))
        try:
            store.save(8, overlapping)
        except ckptstore.errors.CkptStoreError as e:
            out["errors"].append([type(e).__name__, str(e)])
        if rank == world - 1:  # a disk error in the middle of writing, on one rank
            real_write_file = ckptstore.tensorio.write_file
            ckptstore.tensorio.write_file = failing_write_file  # type: ignore[assignment]
        try:
            store.save(8, state(8, rank, world))
        except ckptstore.errors.CkptStoreError as e:
            out["errors"].append([type(e).__name__, str(e)])
        finally:
            if rank == world - 1:
                ckptstore.tensorio.write_file = real_write_file
        try:
            store.save(10 + rank, state(10, rank, world))  # every rank a different step
        except ckptstore.errors.CkptStoreError as e:
            out["errors"].append([type(e).__name__, str(e)])
        store.save(9, state(9, rank, world))
    elif mode == "docs":  # the example of docs/distributed.md, on every rank
        text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
        code = text.split("```python\n")[1].split("```")[0]
        scope: dict[str, Any] = {"path": phase["path"]}
        exec(compile(code, "docs/distributed.md", "exec"), scope)
        rows = 1024 // world  # each row of w holds the rank that saved it
        want = np.repeat(np.arange(world, dtype=np.float32), rows)[:, None]
        out["bad"] = (
            [] if np.array_equal(scope["state"]["w"].local, np.broadcast_to(want, (1024, 256 // world))) else ["w"]
        )
    elif mode == "unshared":  # memory:// is private to each process: rank 0 cannot see the others' files
        private = ckptstore.CheckpointStore("memory://unshared/run")
        try:
            private.save(1, state(1, rank, world))
            out["error"] = None
        except ckptstore.errors.CkptStoreError as e:
            out["error"] = [type(e).__name__, str(e)]
        out["steps"] = private.steps()
    elif mode == "rank0_only":
        # nanoGPT's pattern (`if rank == 0: store.save(...)`) on a store that saves with every rank; with
        # "late", the other ranks do join, only later (a slow rank, not a missing one).
        import logging

        warned: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("ckptstore").addHandler(handler)
        with ckptstore.knobs.override(join_warn_s=phase["warn"], join_timeout_s=phase["timeout"]):
            t0 = time.monotonic()
            try:
                if rank == 0 or phase.get("late") is not None:
                    if rank != 0:
                        time.sleep(phase["late"])
                    store.save(phase["step"], state(phase["step"], rank, world))
                out["error"] = None
            except ckptstore.errors.CkptStoreError as e:
                out["error"] = [type(e).__name__, str(e)]
            out["seconds"] = time.monotonic() - t0
        logging.getLogger("ckptstore").removeHandler(handler)
        out["warned"] = warned
        if rank == 0 and phase.get("then_single"):  # the documented one line: this process saves alone
            alone = ckptstore.CheckpointStore(store.url, coordinator=ckptstore.distributed.SINGLE)
            alone.save(phase["step"] + 1, {"w": np.arange(4)})
        out["steps"] = store.storage.committed_steps()
        dist.barrier()
    elif mode == "async":
        import torch

        handles, out["sums"] = [], []
        for step in phase["steps"]:
            s = state(step, rank, world)
            handles.append(store.save(step, s, metadata={"step": step}, blocking=False))
            # The training goes on at once: collectives of its own on the default group while the save's
            # run in the background, and its arrays changed in place (the checkpoint must not see it).
            t = torch.ones(8)
            for _ in range(phase["allreduces"]):
                dist.all_reduce(t)
            out["sums"].append(float(t[0]))
            for leaf in (s["model"]["w"], s["model"]["emb"], s["opt"]["m"], s["grid"]):
                leaf.local[...] = -1
            s["bias"][...] = -1
            s["flags"].fill_(-1)
            s["dt"].to_local().fill_(-1)
        out["infos"] = [[h.result(timeout=60).step, h.result().metadata] for h in handles]
    elif mode == "async_fail":
        # One rank's disk fails in a background save: every rank's handle has the error; a failure that no
        # handle reported is raised by every rank's next save; after it, saves work again.
        real_write_file = ckptstore.tensorio.write_file
        out["errors"] = []
        for step in (7, 8):
            if rank == world - 1:
                ckptstore.tensorio.write_file = failing_write_file  # type: ignore[assignment]
            handle = store.save(step, state(step, rank, world), blocking=False)
            if step == 7:
                e = handle.exception(timeout=60)
                out["errors"].append(None if e is None else [type(e).__name__, str(e)])
            else:
                try:
                    store.save(9, state(9, rank, world))  # waits for step 8's save, which failed
                except ckptstore.errors.CkptStoreError as e:
                    out["errors"].append([type(e).__name__, str(e)])
            ckptstore.tensorio.write_file = real_write_file
        store.save(9, state(9, rank, world), blocking=False).result(timeout=60)
    elif mode == "async_preempt":
        # SIGTERM on one rank while a background save is in flight (the loop of docs/training-loop.md):
        # that save completes, every rank agrees on the preemption and saves once more, then stops at the
        # same step.
        import signal

        import torch

        real_write_file = ckptstore.tensorio.write_file

        def slow_write(*args: Any, **kwargs: Any) -> Any:
            time.sleep(1.0)  # the signal comes while this rank is still writing
            return real_write_file(*args, **kwargs)

        ps = ckptstore.CheckpointStore(store.url, save_on_preemption=True)
        out["stopped_at"] = None
        for step in range(1, 200):
            t = torch.ones(1)
            dist.all_reduce(t)  # the training's collective
            wanted = ps.should_save(step)  # (only on preemption: no interval); every rank, every step
            if step == 5 or wanted:
                if step == 5:
                    ckptstore.tensorio.write_file = slow_write  # type: ignore[assignment]
                ps.save(step, state(step, rank, world), blocking=False)
                if step == 5 and rank == world - 1:
                    os.kill(os.getpid(), signal.SIGTERM)
            if ps.reached_preemption(step):
                ps.wait_until_finished()
                out["stopped_at"] = step
                break
        ckptstore.tensorio.write_file = real_write_file
        out["steps"] = ps.steps()
        ps.close()
    elif mode == "per_rank_save":  # each rank's loader at its own position, saved per rank
        dl = loader(rank, world)
        it = iter(dl)
        batches(it, rank + 2)
        store.save(phase["step"], per_rank_state(rank, dl))
        out["next"] = batches(it, 3)  # what a resumed loader must give
    elif mode == "per_rank_restore":
        dl = loader(rank, world)
        template = per_rank_state(rank, dl)
        template["seen"] = ckptstore.PerRank({"rank": -1, "ids": torch_zeros(rank + 1), "by_rank": {f"r{rank}": -1}})
        try:
            got = store.restore(like=template)
        except ckptstore.errors.CkptStoreError as e:
            out["error"] = [type(e).__name__, str(e)]
            out["untouched"] = dl.state_dict()["_num_yielded"] == 0
        else:
            out["error"] = None
            out["same_loader"] = got["loader"] is dl
            out["seen"] = [got["seen"]["rank"], got["seen"]["ids"].tolist(), got["seen"]["by_rank"]]
            out["next"] = batches(iter(dl), 3)
    elif mode == "per_rank_reshard":
        dl = loader(rank, world)
        got = store.restore(like=per_rank_state(rank, dl, reshard=True), framework="torch")
        seen = got["seen"]
        out["seen"] = {
            "saved": [[s["rank"], type(s["ids"]).__name__, s["ids"].tolist(), s["by_rank"]] for s in seen["saved"]],
            "me": seen["me"],
        }
        out["same_loader"] = got["loader"] is dl
        out["num_yielded"] = dl.state_dict()["_num_yielded"]
    elif mode == "in_place_save":
        store.save(phase["step"], {"model": sharded_module(phase["step"], 0)})
        rows = dict(sharded_module(phase["step"], 0).named_parameters())
        rows["w"] = rows["w"].full_tensor()
        store.save(phase["step"] + 1, {"model": rows})
    elif mode == "in_place_restore":  # rows were saved; columns are restored, into the module's DTensors
        import torch

        from ckptstore import shard as shard_module

        made: list[Any] = []
        real = shard_module.dtensor_like
        shard_module.dtensor_like = lambda *a: made.append(1) or real(*a)  # type: ignore[assignment]
        want = sharded_module(phase["step"], 1)
        store.restore(phase["step"], like={"model": sharded_module(0, 1, zeros=True)})  # warm (imports, threads)
        made.clear()
        out["runs"] = []
        for step, verify in ((phase["step"], True), (phase["step"], False), (phase["step"] + 1, True)):
            module = sharded_module(0, 1, zeros=True)
            before = {k: v.to_local().data_ptr() for k, v in module.named_parameters()}
            nbytes = sum(v.to_local().nbytes for v in module.parameters())
            grew, got = peak_growth(lambda m=module, s=step, v=verify: store.restore(s, like={"model": m}, verify=v))
            out["runs"].append(
                {
                    "same_object": got["model"] is module,
                    "same_memory": before == {k: v.to_local().data_ptr() for k, v in module.named_parameters()},
                    "exact": all(
                        torch.equal(v.to_local(), getattr(want, k).to_local()) for k, v in module.named_parameters()
                    ),
                    "new_dtensors": len(made),
                    "peak_growth": grew / nbytes,
                }
            )
        # A template (no object's state): a new DTensor in fresh memory, the measurement's control.
        template = {"model": dict(sharded_module(0, 1, zeros=True).named_parameters())}
        nbytes = sum(v.to_local().nbytes for v in template["model"].values())
        grew, got = peak_growth(lambda: store.restore(phase["step"], like=template))
        out["template"] = {"new_dtensors": len(made), "peak_growth": grew / nbytes}
        shard_module.dtensor_like = real  # type: ignore[assignment]
    elif mode == "collectives":  # the coordinator's messages: short values inline, long ones in a second one
        from ckptstore.distributed import INLINE_BYTES, TorchDistributed

        def value(r: int, long: bool) -> dict[str, Any]:
            return {"rank": r, "pad": "x" * (3 * INLINE_BYTES if long else 10)}

        def seen(v: dict[str, Any]) -> list[Any]:
            return [v["rank"], len(v["pad"]), set(v["pad"]) == {"x"}]

        tail = dist.new_group(list(range(1, world)))  # a group whose rank 0 is global rank 1
        for label, group in (("world", None), ("tail", tail)):
            if group is tail and rank == 0:
                continue
            c = TorchDistributed(group)
            got: dict[str, Any] = {"gloo": c._gloo}
            for case, longs in (("none", []), ("one", [1]), ("all", list(range(c.world_size)))):
                gathered = c.gather(value(c.rank, c.rank in longs))
                got[f"gather {case}"] = None if gathered is None else [seen(v) for v in gathered]
                mine = c.scatter([value(r, r in longs) for r in range(c.world_size)] if c.rank == 0 else None)
                got[f"scatter {case}"] = seen(mine)
                got[f"broadcast {case}"] = seen(c.broadcast(value(0, 0 in longs) if c.rank == 0 else None))
            out[label] = got
    elif mode == "kill":
        store.save(1, state(1, rank, world))
        dist.barrier()
        if rank == phase["victim"]:
            ckptstore.tensorio.write_file = slow_write_file(phase["marker"])  # type: ignore[assignment]
        try:
            store.save(2, state(2, rank, world))
            out["error"] = None
        except ckptstore.errors.CkptStoreError as e:
            out["error"] = [type(e).__name__, str(e)]
    return out


def main(cfg: dict[str, Any]) -> None:
    """One rank's life: join the process group, run the phases, report."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.get("pg_timeout", 30)))
    torch.set_num_threads(1)
    store = ckptstore.CheckpointStore(
        cfg["url"], storage_options=cfg.get("storage_options") or None, max_to_keep=cfg.get("max_to_keep")
    )
    out = [run_phase(store, phase, rank, world) for phase in cfg["phases"]]
    store.close()  # its retention pass, in the background: the rank ends with os._exit, which would cut it
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(out))
    if not any(p["mode"] == "kill" for p in cfg["phases"]):  # after a rank died the group is broken
        dist.barrier()
        dist.destroy_process_group()


def spawn(cfg: dict[str, Any]) -> None:
    """Run one job: fork a process per rank; write ``pids.json`` at once and ``codes.json`` (exit codes,
    -9 for SIGKILL) once every rank has ended."""
    os.environ.update(cfg["env"])
    out = Path(cfg["out"])
    pids = []
    for rank in range(int(os.environ["WORLD_SIZE"])):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(out / f"log{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ["RANK"] = str(rank)
                main(cfg)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    (out / "pids.json").write_text(json.dumps(pids))
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    (out / "codes.json").write_text(json.dumps(codes))


def zygote() -> None:
    """Import everything once, then run each job read from stdin (one JSON config a line) in a forked
    leader, in its own process group (the test kills that group if a job hangs). Ends at EOF.

    Forking from one warm process spares every rank of every job the imports (torch, DTensor's dynamo,
    s3fs: seconds each on this machine's two cores)."""
    import signal

    import s3fs  # noqa: F401
    import torch._dynamo
    import torch.distributed.tensor._utils  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    for line in sys.stdin:
        cfg = json.loads(line)
        if os.fork() == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the leader waits for its ranks
                Path(cfg["out"], "leader.json").write_text(json.dumps(os.getpid()))
                spawn(cfg)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)


if __name__ == "__main__":
    zygote()
