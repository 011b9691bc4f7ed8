"""Distributed save and restore: ckptstore vs torch.distributed.checkpoint (DCP), 1, 2 and 4 ranks.

    .venv/bin/python benchmarks/bench_distributed.py                 # 512 MiB state, 2 jobs x 3 runs each
    .venv/bin/python benchmarks/bench_distributed.py --mib 64 --runs 1 --rounds 1 --json out.json

Every rank holds a row block (torch DTensor, Shard(0)) of each of a few large float32 arrays, the
state of a row-sharded model; both libraries save the same DTensor state dict into a fresh directory
(the previous one deleted) and restore it into zeroed DTensors of the same layout. A job is one process
per rank (gloo on CPU), forked from this process after torch is imported; it does one untimed save and
restore (warm-up: lazy imports, first touch of memory and page cache), then ``--runs`` timed ones, as a
training job that checkpoints repeatedly would. Times are rank 0's, from a barrier before to a barrier
after; throughput is global bytes over that time. Jobs of the two libraries alternate (``--rounds``); the
table shows medians over all timed runs. Restores read files just written (page cache), for both
libraries alike. ckptstore restores with ``verify=True`` (its default: every checksum checked) into new
arrays; DCP loads in place into the template's tensors. Both fsync on save (DCP: ``sync_files=True``).
Prints a table; ``--json`` also writes every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import common

MiB = 1 << 20
N_ARRAYS = 8
COLS = 1024


def make_state(total_mib: int, step: int, zeros: bool = False) -> dict[str, Any]:
    """This rank's DTensor state: N_ARRAYS float32 arrays of COLS columns, total_mib in all."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = total_mib * MiB // (4 * COLS * N_ARRAYS)
    state = {}
    for i in range(N_ARRAYS):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset((rows, COLS), mesh, [Shard(0)])
        local = torch.zeros(shape) if zeros else torch.full(shape, float(step + i)) + offsets[0]
        state[f"layer{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, COLS)), stride=(COLS, 1)
        )
    return state


def timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def save_and_restore(lib: str, mib: int, root: str, step: int) -> dict[str, float]:
    """One save and one restore of an ``mib`` MiB state; checks what came back."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckptstore

    state, target = make_state(mib, step), make_state(mib, step, zeros=True)
    got: dict[str, Any] = {}
    if lib == "ckptstore":
        store = ckptstore.CheckpointStore(os.path.join(root, "ckptstore"))
        save_s = timed(lambda: store.save(step, state))
        restore_s = timed(lambda: got.update(store.restore(step, like=target)))
    else:
        path = os.path.join(root, f"dcp-{step}")
        save_s = timed(lambda: dcp.save(state, checkpoint_id=path))
        restore_s = timed(lambda: dcp.load(target, checkpoint_id=path))  # in place, into `target`
        got = target
    for k, v in state.items():  # the restore is right (and was not skipped)
        assert torch.equal(got[k].to_local(), v.to_local()), k
    dist.barrier()
    if dist.get_rank() == 0:  # deleted outside the timed part, for both libraries
        if lib == "dcp":
            shutil.rmtree(path)
        else:
            store.delete(step)
    return {"save_s": save_s, "restore_s": restore_s}


def rank_main(lib: str, mib: int, runs: int, root: str, result: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    torch.set_num_threads(1)
    save_and_restore(lib, mib, root, 0)  # warm-up, untimed: lazy imports, first touch of page cache
    samples = [save_and_restore(lib, mib, root, step) for step in range(1, runs + 1)]
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(samples))
    dist.barrier()
    dist.destroy_process_group()


def job(lib: str, world: int, mib: int, runs: int, root: str, port: int) -> list[dict[str, float]]:
    """Fork ``world`` ranks running ``lib``; return rank 0's samples."""
    result = os.path.join(root, "result.json")
    codes = common.fork_ranks(world, port, lambda: rank_main(lib, mib, runs, root, result))
    if any(codes):
        raise SystemExit(f"{lib} on {world} ranks failed: exit codes {codes}")
    return list(json.loads(Path(result).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="global state size in MiB (default 512)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3, help="timed save+restore runs per job (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per library and rank count, alternating")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write every sample here")
    args = parser.parse_args()

    # Imported once, before the forks (DTensor's first use imports dynamo: seconds per process).
    import torch._dynamo
    import torch.distributed.checkpoint
    import torch.distributed.tensor._utils  # noqa: F401

    import ckptstore  # noqa: F401

    base = tempfile.mkdtemp(prefix="bench-dist-", dir=args.dir)
    rows: list[dict[str, Any]] = []
    port = 29700 + os.getpid() % 1000
    try:
        for world in args.ranks:
            per_lib: dict[str, list[dict[str, float]]] = {"ckptstore": [], "dcp": []}
            for rnd in range(args.rounds):  # alternate the libraries, job by job
                for lib in per_lib:
                    root = os.path.join(base, f"{lib}-{world}-{rnd}")
                    os.makedirs(root)
                    port += 1
                    per_lib[lib] += job(lib, world, args.mib, args.runs, root, port)
                    shutil.rmtree(root)
            for lib, samples in per_lib.items():
                save_s = statistics.median(s["save_s"] for s in samples)
                restore_s = statistics.median(s["restore_s"] for s in samples)
                rows.append(
                    {
                        "ranks": world,
                        "library": lib,
                        "mib": args.mib,
                        "save_s": save_s,
                        "restore_s": restore_s,
                        "save_mib_s": args.mib / save_s,
                        "restore_mib_s": args.mib / restore_s,
                        "samples": samples,
                    }
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()[0]
    n = args.runs * args.rounds
    print(f"\n{args.mib} MiB global state, {N_ARRAYS} row-sharded float32 DTensors, median of {n} runs")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print(f"{'ranks':>5}  {'library':<10} {'save s':>8} {'save MiB/s':>11} {'restore s':>10} {'restore MiB/s':>14}")
    for r in rows:
        print(
            f"{r['ranks']:>5}  {r['library']:<10} {r['save_s']:>8.2f} {r['save_mib_s']:>11.0f} "
            f"{r['restore_s']:>10.2f} {r['restore_mib_s']:>14.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
