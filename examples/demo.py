"""ckptstore demo: a PyTorch run is killed mid-training (SIGKILL, like a preemption), resumes from its
last checkpoint, and ends with exactly the loss curve of a run that was never interrupted.

    make demo                      # or: .venv/bin/python examples/demo.py [--dir DIR]

What is saved every few steps (with max_to_keep=3): the model, the Adam optimizer (per-parameter step
counts included), the LR scheduler, the data-order generator, the step count and the loss history.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

STEPS, SAVE_EVERY, CRASH_AT = 60, 10, 37


def train(ckpt_dir: str, crash_at: int | None, out: str) -> None:
    """The training script a user would write (this process may be killed at ``crash_at``)."""
    import torch

    import ckptstore

    class DataOrder:
        """A seeded generator driving the batch order, saved with the rest of the state."""

        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(1234)

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"state": self.gen.get_state()}

        def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            self.gen.set_state(state["state"])

    torch.manual_seed(0)
    xs = torch.randn(512, 16)
    ys = xs @ torch.randn(16, 1) + 0.1 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    data = DataOrder()
    state = {"model": model, "opt": opt, "sched": sched, "data": data, "step": 0, "losses": []}

    store = ckptstore.CheckpointStore(ckpt_dir, max_to_keep=3)
    if store.latest_step() is not None:
        # Objects are restored in place; plain values (step, losses) come back in the returned tree.
        state = store.restore(like=state)
        print(f"  resumed from step {state['step']} (lr {sched.get_last_lr()[0]:.4f})", flush=True)

    while state["step"] < STEPS:
        idx = torch.randint(0, len(xs), (32,), generator=data.gen)
        loss = torch.nn.functional.mse_loss(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        state["step"] += 1
        state["losses"].append(loss.item())
        if state["step"] % SAVE_EVERY == 0:
            store.save(state["step"], state, metadata={"loss": loss.item()})
            print(f"  saved step {state['step']}  loss {loss.item():.5f}", flush=True)
        if state["step"] == crash_at:
            print(f"  step {crash_at}: killed with SIGKILL (a preemption)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    with open(out, "w") as f:
        json.dump(state["losses"], f)


def _run(ckpt_dir: str, out: str, crash_at: int | None = None) -> int:
    cmd = [sys.executable, __file__, "--worker", ckpt_dir, "--out", out]
    if crash_at is not None:
        cmd += ["--crash-at", str(crash_at)]
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to keep the checkpoints (default: a temp directory)")
    parser.add_argument("--worker", metavar="CKPT_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--crash-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train(args.worker, args.crash_at, args.out)
        return 0

    root = args.dir or tempfile.mkdtemp(prefix="ckptstore-demo-")
    ref_dir, run_dir = os.path.join(root, "reference"), os.path.join(root, "run")
    ref_out, run_out = os.path.join(root, "reference.json"), os.path.join(root, "run.json")

    print(f"1. an uninterrupted run of {STEPS} steps (checkpoints in {ref_dir})")
    _run(ref_dir, ref_out)
    print(f"2. the same run, killed at step {CRASH_AT} (checkpoints in {run_dir})")
    rc = _run(run_dir, run_out, crash_at=CRASH_AT)
    print(f"  exit status {rc}; committed checkpoints: {_steps(run_dir)} (max_to_keep=3)")
    print("3. started again: it resumes from the latest checkpoint")
    _run(run_dir, run_out)

    with open(ref_out) as f:
        ref = json.load(f)
    with open(run_out) as f:
        run = json.load(f)
    print("\n  step   uninterrupted loss   killed + resumed loss")
    for step in (1, 10, 30, 31, 37, 38, 45, 60):
        print(f"  {step:4d}   {ref[step - 1]:18.10f}   {run[step - 1]:21.10f}")
    same = ref == run
    print(f"\nloss curves identical, bit for bit, over all {STEPS} steps: {same}")
    print(f"inspect the checkpoints: .venv/bin/ckptstore ls {run_dir}")
    return 0 if same else 1


def _steps(path: str) -> list[int]:
    import ckptstore

    return ckptstore.CheckpointStore(path).steps()


if __name__ == "__main__":
    sys.exit(main())
