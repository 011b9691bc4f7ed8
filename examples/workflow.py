"""The trainer + evaluator workflow, end to end: an evaluator follows the trainer's checkpoints while the
trainer is killed mid-run (SIGKILL, like a preemption) and restarted; it resumes at the exact iteration, and
the evaluator scores every checkpoint and stops by itself once the trainer's final checkpoint is scored.

    python examples/workflow.py [--dir DIR]
    tensorboard --logdir DIR/tb        # train/loss and eval/loss, against the iteration count
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import ckptstore

HERE = os.path.dirname(os.path.abspath(__file__))


def start(name: str, script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` with ``args``; wait for its first line of output, then echo the rest from a thread,
    each line prefixed with ``name``."""
    cmd = [sys.executable, "-u", os.path.join(HERE, script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = proc.stdout

    def relay() -> None:
        for line in lines:
            print(f"[{name}] {line}", end="", flush=True)

    print(f"[{name}] {lines.readline()}", end="", flush=True)  # "watching ...", "starting at ...": it is ready
    threading.Thread(target=relay, daemon=True).start()
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="where checkpoints and TensorBoard logs go (default: a new temp dir)")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--save-interval", type=int, default=50)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.01, help="extra seconds per training iteration")
    args = p.parse_args()
    run = args.dir or tempfile.mkdtemp(prefix="ckptstore-workflow-")
    ckpts = os.path.join(run, "ckpts")
    train_args = [
        f"--ckpt-dir={ckpts}",
        f"--logdir={os.path.join(run, 'tb', 'train')}",
        f"--iterations={args.iterations}",
        f"--save-interval={args.save_interval}",
        f"--log-interval={args.log_interval}",
        f"--max-to-keep={args.max_to_keep}",
        f"--delay={args.delay}",
    ]
    print(f"workflow in {run}", flush=True)
    evaluator = start("evaluator", "evaluate.py", f"--ckpt-dir={ckpts}", f"--logdir={os.path.join(run, 'tb', 'eval')}")

    trainer = start("trainer", "train.py", *train_args)
    store = ckptstore.CheckpointStore(ckpts)
    while trainer.poll() is None and (store.latest_step() or 0) < args.iterations // 2:
        time.sleep(0.01)
    time.sleep(args.save_interval * args.delay / 2)  # half-way to the next checkpoint
    os.kill(trainer.pid, signal.SIGKILL)  # a preemption
    trainer.wait()
    print(f"trainer killed (SIGKILL); committed checkpoints: {store.steps()}; restarting it", flush=True)

    trainer = start("trainer", "train.py", *train_args)
    if trainer.wait() != 0:
        sys.exit("the trainer failed")
    if evaluator.wait() != 0:  # it stops by itself after scoring the trainer's final checkpoint
        sys.exit("the evaluator failed")
    print(f"done: checkpoints in {ckpts}, TensorBoard logs in {os.path.join(run, 'tb')}", flush=True)


if __name__ == "__main__":
    main()
