"""What ``CheckpointStore.should_save`` costs across ranks: the agreement on preemption and time decisions.

    .venv/bin/python benchmarks/preemption_agreement.py                   # 2 ranks, 10 ms steps, K = 1, 10, auto
    .venv/bin/python benchmarks/preemption_agreement.py --world 2 --steps 1000 --step-ms 10 --every 0 100

Forks one process per rank (gloo on CPU, loopback) after torch is imported. Each rank runs ``--steps``
simulated training steps: ``--step-ms`` of busy CPU work (a spin; with ``--sleep``, asleep), then a
barrier on the default group (the training's own collective, which keeps the ranks in step as gradient
all-reduces do), then ``store.should_save(step)``, timed. The store has ``save_on_preemption=True`` and a
``save_interval_secs`` of a day, so the agreement runs (one all-reduce on the side gloo group) but nothing
is saved; ``--every`` gives the values of ``knobs.preemption_sync_every`` to measure (K; 0: the adaptive
default). A store with ``save_interval_steps`` only (no communication at all) is the baseline. The first
``--warmup`` steps are not timed (the first call makes the side group; the adaptive period starts at one
call and at most doubles at each agreement, so it settles within a few hundred calls). Rank 0 prints per
K: the mean time inside ``should_save`` per call, its share of the step, the number of agreements, and the
mean time of one agreement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace, root: str, every: int | None) -> tuple[float, int, float]:
    """(mean seconds per should_save call, agreements, mean seconds per agreement) of one store."""
    import torch.distributed as dist

    import ckptstore
    from ckptstore import distributed

    agreements: list[float] = []
    real = distributed.all_max

    def counted(coord: Any, values: list[int]) -> list[int]:
        t0 = time.perf_counter()
        try:
            return real(coord, values)
        finally:
            agreements.append(time.perf_counter() - t0)

    kwargs: dict[str, Any] = (
        {"save_interval_steps": 10**9 + 7}
        if every is None
        else {"save_on_preemption": True, "save_interval_secs": 86400.0}
    )
    distributed.all_max = counted  # type: ignore[assignment]
    try:
        with ckptstore.knobs.override(preemption_sync_every=every or 0):
            store = ckptstore.CheckpointStore(root, **kwargs)
            inside = 0.0
            for step in range(args.warmup + args.steps):
                if step == args.warmup:  # untimed before: the side group is made, the period settles
                    agreements.clear()
                    inside = 0.0
                step_end = time.perf_counter() + args.step_ms / 1000
                if args.sleep:
                    time.sleep(args.step_ms / 1000)
                while time.perf_counter() < step_end:  # the step's work: the CPU stays busy, as in training
                    pass
                dist.barrier()
                t0 = time.perf_counter()
                store.should_save(step)
                inside += time.perf_counter() - t0
            store.close()
    finally:
        distributed.all_max = real  # type: ignore[assignment]
    return inside / args.steps, len(agreements), sum(agreements) / max(1, len(agreements))


def rank_main(rank: int, args: argparse.Namespace, root: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rows = [("none", *run(args, root, None))]
    for every in args.every:
        rows.append((str(every) if every else "auto", *run(args, root, every)))
    dist.barrier()
    if rank == 0:
        how = "asleep" if args.sleep else "busy"
        print(f"{args.world} ranks, gloo on CPU, {args.steps} steps of {args.step_ms} ms ({how}) + a barrier, ", end="")
        print(f"after {args.warmup} untimed; rank 0's times")
        print(f"{'K':>5} {'us/call':>9} {'% of step':>10} {'agreements':>11} {'us/agreement':>13}")
        for label, per_call, n, per_agreement in rows:
            share = 100 * per_call / (args.step_ms / 1000)
            print(f"{label:>5} {per_call * 1e6:>9.1f} {share:>9.3f}% {n:>11} {per_agreement * 1e6:>13.1f}")
        print("K none: save_interval_steps only (no agreement); auto: preemption_sync_every=0 (the default)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500, help="simulated training steps per K, timed")
    ap.add_argument("--warmup", type=int, default=200, help="untimed steps first (the adaptive period settles)")
    ap.add_argument("--step-ms", type=float, default=10.0, help="the training step, milliseconds")
    ap.add_argument("--sleep", action="store_true", help="sleep through the step instead of spinning")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10, 0], help="K: preemption_sync_every, 0: adaptive")
    args = ap.parse_args()

    import torch  # noqa: F401  (imported once, before forking)

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(args.world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    with tempfile.TemporaryDirectory() as root:
        pids = []
        for rank in range(args.world):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    rank_main(rank, args, root)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    if any(codes):
        sys.exit(f"ranks exited with {codes}")


if __name__ == "__main__":
    main()
