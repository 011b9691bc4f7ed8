"""Training runs that a test preempts with SIGTERM, run as their own processes (tests/test_preemption.py).

``python -m tests.preemption_worker train STORE OUT --total N [--resume] [--async] [--ready PATH]
[--hold PATH --go PATH]``: the small deterministic training of tests/resume_worker.py (Adam, OneCycle LR,
dropout, a seeded data order, NumPy input noise), written as the loop of ckptstore's docs::

    for step in range(start, total):
        train_step()
        if store.should_save(step):
            store.save(step, state)                 # blocking=False with --async
        if store.reached_preemption(step):
            store.wait_until_finished()
            sys.exit(0)

on a store with ``save_interval_steps=20, save_on_preemption=True``. ``--ready PATH``: after step 10 create
PATH and from then on take 30 ms a step, so that the test's signal arrives mid-run. ``--hold PATH --go PATH``
(with ``--async``): the first background save from step 10 on, once it writes its first file, creates PATH
(holding the step) and waits until the test creates GO (the test sends its signal in between: a signal
while an async save is in flight). A SIGTERM handler of the program's own, installed before the store's,
notes the step under way when the signal arrives (the store chains it). Writes ``OUT.json`` (the step
``reached_preemption`` fired at, or None; the steps saved; the steps the own handler noted) and, at the
end, the parameters, Adam's moments and the losses to OUT (safetensors).

``python -m tests.preemption_worker dist STORE OUTDIR``: the same API on two torch.distributed ranks (gloo,
CPU, one forked process each; the gradients all-reduced on the default group), ``save_interval_steps=1000``,
so that only preemption saves (and step 0). Each rank creates ``OUTDIR/ready<rank>`` after step 10, then takes 30 ms a
step; it writes ``OUTDIR/rank<rank>.json`` (its ``reached_preemption`` step and what it saved). The launcher
writes ``pids.json`` at once and ``codes.json`` once both ranks ended.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import ckptstore
from tests.resume_worker import BATCH, N_SAMPLES, build, dataset

READY_STEP = 10
PACE_S = 0.03


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one summation order in every process
    objs = build(args.total)
    model, opt, sched = objs["model"], objs["opt"], objs["sched"]
    x_all, y_all = dataset()
    # The program's own SIGTERM handler, installed before the store's: chained, it notes the step under way.
    current, signalled = [0], []
    signal.signal(signal.SIGTERM, lambda signum, frame: signalled.append(current[0]))
    store = ckptstore.CheckpointStore(args.store, max_to_keep=3, save_interval_steps=20, save_on_preemption=True)
    start, perm, pos, losses = 0, torch.randperm(N_SAMPLES, generator=objs["data_gen"]), 0, []
    if args.resume:
        like = {"model": model, "opt": opt, "sched": sched, "perm": torch.zeros(N_SAMPLES, dtype=torch.int64)}
        state = store.restore(like={**like, "step": 0, "pos": 0, "losses": [], "rng": None})
        start, perm, pos, losses = state["step"] + 1, state["perm"], state["pos"], state["losses"]
        objs["data_gen"].set_state(torch.from_numpy(state["rng"]["data_gen"]))
        objs["noise"].bit_generator.state = state["rng"]["noise"]
        torch.set_rng_state(torch.from_numpy(state["rng"]["torch"]))
    if args.hold:
        hold_first_async_write(args.hold, args.go)
    report = Path(args.out + ".json")
    report.write_text(json.dumps({"preempted": None}))

    model.train()
    for step in range(start, args.total):
        current[0] = step
        # one training step (step s is the (s+1)-th: a checkpoint of step s holds the state after it)
        if pos + BATCH > N_SAMPLES:
            perm, pos = torch.randperm(N_SAMPLES, generator=objs["data_gen"]), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        noise = torch.from_numpy(objs["noise"].normal(0.0, 0.01, size=(BATCH, 3)).astype(np.float32))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x_all[idx] + noise), y_all[idx])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if args.ready and step >= READY_STEP:
            Path(args.ready).touch()
            time.sleep(PACE_S)

        if store.should_save(step):
            rng = {
                "data_gen": objs["data_gen"].get_state(),
                "noise": objs["noise"].bit_generator.state,
                "torch": torch.get_rng_state(),
            }
            state = {"model": model, "opt": opt, "sched": sched, "perm": perm, "pos": pos, "step": step}
            _saving.append(step)
            store.save(step, {**state, "losses": losses, "rng": rng}, blocking=not args.async_)
        if store.reached_preemption(step):
            store.wait_until_finished()
            report.write_text(json.dumps({"preempted": step, "saved": _saving, "signalled": signalled}))
            sys.exit(0)

    out = {f"param/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        name = next(n for n, q in model.named_parameters() if q is p)
        out[f"exp_avg/{name}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].clone()
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out["step"] = torch.tensor([args.total, sched.last_epoch])
    save_file(out, args.out)
    store.close()


#: The steps whose saves were started, in order.
_saving: list[int] = []


def hold_first_async_write(marker: str, go: str) -> None:
    """Make the first background save from step READY_STEP on stop at its first file: create ``marker``
    (holding the step), then wait until ``go`` exists (at most 60 s)."""
    real = ckptstore.tensorio.write_file
    held: list[int] = []

    def write_file(*a: Any, **kw: Any) -> Any:
        thread = threading.current_thread()  # the save's thread is named ckptstore-save-<step>
        step = int(thread.name.rpartition("-")[2]) if thread.name.startswith("ckptstore-save-") else -1
        if not held and step >= READY_STEP:
            held.append(step)
            Path(marker).write_text(str(step))
            deadline = time.monotonic() + 60
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(*a, **kw)

    ckptstore.tensorio.write_file = write_file  # type: ignore[assignment]


# --- two ranks ----------------------------------------------------------------------------------------


def dist_rank(store_path: str, out: Path, rank: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)  # the same on both ranks: built from one seed, updated by averaged gradients
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    store = ckptstore.CheckpointStore(store_path, save_interval_steps=1000, save_on_preemption=True)
    saved: list[int] = []
    report = out / f"rank{rank}.json"
    for step in range(0, 400):
        x = torch.randn(8, 4, generator=data)
        opt.zero_grad()
        model(x).square().mean().backward()
        for p in model.parameters():  # the training's own collectives, on the default group
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        opt.step()
        if step >= READY_STEP:
            (out / f"ready{rank}").touch()
            time.sleep(PACE_S)

        if store.should_save(step):
            saved.append(step)
            store.save(step, {"model": model, "opt": opt, "step": step})
        if store.reached_preemption(step):
            store.wait_until_finished()
            report.write_text(json.dumps({"preempted": step, "saved": saved}))
            sys.exit(0)
    report.write_text(json.dumps({"preempted": None, "saved": saved}))


def dist_launch(store_path: str, out: Path) -> None:
    # An optimizer's first step imports torch._dynamo (seconds): once here, not in each rank.
    warm = nn.Linear(1, 1)
    warm(torch.ones(1)).sum().backward()
    torch.optim.SGD(warm.parameters(), lr=0.1).step()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(out / f"log{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ["RANK"] = str(rank)
                dist_rank(store_path, out, rank)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
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


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train")
    t.add_argument("store")
    t.add_argument("out")
    t.add_argument("--total", type=int, required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--async", dest="async_", action="store_true", help="save with blocking=False")
    t.add_argument("--ready")
    t.add_argument("--hold")
    t.add_argument("--go")
    d = sub.add_parser("dist")
    d.add_argument("store")
    d.add_argument("outdir")
    args = ap.parse_args()
    if args.mode == "train":
        train(args)
    else:
        dist_launch(args.store, Path(args.outdir))


if __name__ == "__main__":
    main()
