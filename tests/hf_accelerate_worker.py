"""An Accelerate training loop saving through ``ckptstore.integrations.accelerate``, as a training script
would be: run in a subprocess by tests/test_integration_accelerate.py, killed part-way and rerun unchanged.

    python tests/hf_accelerate_worker.py ROOT OUT [--save-every K] [--kill-at N] [--native] [--reference REF]

ROOT: the store (``--native``: the folder of Accelerate's own ``save_state`` checkpoints,
``ROOT/checkpoint-<step>``). The script resumes from the latest checkpoint when there is one, skipping the
batches of the resumed epoch trained before it. The process SIGKILLs itself after batch N with
``--kill-at``. Otherwise it writes to OUT (torch.save) the final model and optimizer state, the scheduler's
state, the registered counter's, ``accelerator.step`` and the loss of every batch it trained; with
``--reference`` it then trains uninterrupted in this process (no checkpoint) and writes the same to REF.

A small MLP with dropout (drawn from torch's global generator at every batch), AdamW with a one-cycle
schedule, gradient accumulation over 2 batches (``accelerator.accumulate``), shuffled data through
Accelerate's seedable sampler, a registered object counting samples: 3 epochs of 12 batches, a checkpoint
every K batches (5 by default; ``max_to_keep=2``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

import ckptstore
from ckptstore.integrations.accelerate import load_state, save_state, skip_first_batches

EPOCHS = 3
DATA = torch.Generator().manual_seed(123)
X = torch.randn(96, 8, generator=DATA)
Y = X @ torch.linspace(-1, 1, 8)[:, None] + 0.1 * torch.randn(96, 1, generator=DATA)


class SamplesSeen:
    """A registered object (``accelerator.register_for_checkpointing``): samples trained on."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])


def setup() -> tuple[Any, ...]:
    """Everything a run builds before its loop, the same in every process (seeded)."""
    set_seed(0)
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=2, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-2, total_steps=EPOCHS * 6)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    seen = SamplesSeen()
    accelerator.register_for_checkpointing(seen)
    return accelerator, model, optimizer, loader, scheduler, seen


def run(
    root: str, save_every: int = 0, kill_at: int | None = None, native: bool = False, checkpoints: bool = True
) -> dict[str, Any]:
    accelerator, model, optimizer, loader, scheduler, seen = setup()
    store = ckptstore.CheckpointStore(root, max_to_keep=2)
    step = 0  # batches trained since the run began: the checkpoint step
    if checkpoints and native:
        folders = sorted((int(n.split("-")[1]), n) for n in os.listdir(root)) if os.path.isdir(root) else []
        if folders:
            accelerator.load_state(os.path.join(root, folders[-1][1]))
            step = folders[-1][0]
    elif checkpoints:
        step = load_state(accelerator, store) or 0
    losses = []
    first_epoch, skip = divmod(step, len(loader))
    for epoch in range(first_epoch, EPOCHS):
        model.train()
        if native:
            loader.set_epoch(epoch)  # Accelerate's own checkpoints hold no epoch counter
            batches = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
        else:
            batches = skip_first_batches(accelerator, loader, skip if epoch == first_epoch else 0)
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            seen.count += len(x)
            losses.append(loss.item())
            step += 1
            if checkpoints and step % save_every == 0:
                if native:
                    accelerator.save_state(os.path.join(root, f"checkpoint-{step}"))
                else:
                    save_state(accelerator, store, step, metadata={"loss": loss.item()})
            if step == kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    return {
        "model": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "optimizer": optimizer.state_dict()["state"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if isinstance(v, int | float)},
        "seen": seen.count,
        "accelerator_step": accelerator.step,
        "losses": losses,
        "steps": step,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--native", action="store_true")
    p.add_argument("--reference")
    args = p.parse_args()
    torch.save(run(args.root, args.save_every, args.kill_at, args.native), args.out)
    print("trained", flush=True)
    if args.reference:
        torch.save(run(args.root, checkpoints=False), args.reference)
        print("reference done", flush=True)


if __name__ == "__main__":
    main()
