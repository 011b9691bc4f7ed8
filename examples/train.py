"""A training script that checkpoints with ckptstore, logs to TensorBoard, and resumes where it stopped.

    python examples/train.py --ckpt-dir runs/demo/ckpts --logdir runs/demo/tb/train

Kill it at any moment (even with SIGKILL) and run the same command again: it restores the latest checkpoint
and continues at the exact iteration, with the same batches, so it ends where an uninterrupted run ends.
Its last checkpoint says ``"done": True``, which is how examples/evaluate.py knows training is over.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.tensorboard import SummaryWriter

import ckptstore

FEATURES = 8


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batch(seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn from its own seed, so that a resumed run sees exactly the batches a fresh run sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=g)
    true_w = torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    return x, torch.sin(x @ true_w) + 0.05 * torch.randn(size, 1, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="checkpoint store: a directory or fsspec URL")
    p.add_argument("--logdir", required=True, help="TensorBoard log directory")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save-interval", type=int, default=100)
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.0, help="extra seconds per iteration (to watch a demo)")
    args = p.parse_args()

    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    store = ckptstore.CheckpointStore(args.ckpt_dir, max_to_keep=args.max_to_keep)

    # Resume: the model and optimizer are loaded in place; the plain values come back from the checkpoint.
    state = {"model": model, "optimizer": optimizer, "iteration": 0, "done": False}
    if store.latest_step() is not None:
        state = store.restore(like=state)
    start = state["iteration"]
    print(f"starting at iteration {start}", flush=True)

    # purge_step: TensorBoard drops what a killed run logged after the checkpoint we resume from.
    writer = SummaryWriter(args.logdir, purge_step=start + 1 if start else None)
    for iteration in range(start + 1, args.iterations + 1):
        x, y = batch(seed=iteration)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(args.delay)

        if iteration % args.log_interval == 0:
            writer.add_scalar("train/loss", loss.item(), iteration)
        if iteration % args.save_interval == 0 or iteration == args.iterations:
            writer.flush()  # what was logged up to a checkpoint is on disk before it is committed
            done = iteration == args.iterations
            store.save(iteration, {"model": model, "optimizer": optimizer, "iteration": iteration, "done": done})
            print(f"saved iteration {iteration}", flush=True)
    writer.close()


if __name__ == "__main__":
    main()
