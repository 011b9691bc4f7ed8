"""An evaluator that follows a trainer's checkpoints, scores each one, and stops when training is over.

    python examples/evaluate.py --ckpt-dir runs/demo/ckpts --logdir runs/demo/tb/eval

Start it before, during or after examples/train.py. Each checkpoint is pinned while it is evaluated, so the
trainer's retention (max_to_keep) cannot delete it under our feet.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.tensorboard import SummaryWriter
from train import batch, make_model  # the same model and data as the trainer

import ckptstore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="the trainer's checkpoint store")
    p.add_argument("--logdir", required=True, help="TensorBoard log directory for the eval metric")
    p.add_argument("--timeout", type=float, default=60, help="seconds between two asks whether training is over")
    args = p.parse_args()

    model = make_model()
    x, y = batch(seed=-1, size=1024)  # held-out data: no training batch has this seed
    writer = SummaryWriter(args.logdir)
    trainer_done = False
    print(f"watching {args.ckpt_dir}", flush=True)

    checkpoints = ckptstore.checkpoints_iterator(
        args.ckpt_dir,
        timeout=args.timeout,
        timeout_fn=lambda: trainer_done,  # asked after each checkpoint and at each timeout
        every_checkpoint=True,  # score every checkpoint, oldest first, not only the newest
    )
    for path in checkpoints:
        state = ckptstore.restore(path, framework="torch")
        model.load_state_dict(state["model"])
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(x), y).item()
        writer.add_scalar("eval/loss", loss, state["iteration"])  # at the checkpoint's step
        writer.flush()
        print(f"evaluated iteration {state['iteration']}: loss {loss:.6f}", flush=True)
        trainer_done = state["done"]
    writer.close()


if __name__ == "__main__":
    main()
