"""A Lightning training script checkpointed through ``CkptStoreCheckpointIO``, as a user would write it: run
in subprocesses by tests/test_integration_lightning.py, killed part-way and rerun unchanged.

    python tests/lightning_worker.py ROOT OUT.npz [--io ckptstore|async|native] [--kill-at N] [--ddp]
                                                  [--reference REF.npz]

ROOT: ModelCheckpoint's directory. Every run passes ``ckpt_path="last"``: a fresh run starts from scratch
(Lightning warns that there is no last checkpoint), a rerun resumes from ``ROOT/last.ckpt``. ``--io``: the
checkpoint plugin: ``ckptstore`` (CkptStoreCheckpointIO), ``async`` (AsyncCheckpointIO around it),
``native`` (Lightning's own TorchCheckpointIO). ``--kill-at N``: the process SIGKILLs itself (with
``--ddp``: rank 0 kills the whole process group, both ranks, as a scheduler would) at the end of training
step N, before ModelCheckpoint has seen it. Otherwise rank 0 writes to OUT.npz every tensor of the final
model and optimizer state, the learning rate, the global step, and the step the fit started from. With
``--reference`` the script first trains the same model from scratch, uninterrupted and without
checkpoints, and writes the same to REF.npz (under DDP too: a second Trainer in the same processes).

Deterministic on CPU: a model with BatchNorm (running statistics), Adam, a StepLR schedule stepped every
step, random data in a fixed order from a ``torchdata`` StatefulDataLoader (its position is in the
checkpoint, so a resume inside an epoch continues where the epoch was), 6 batches an epoch, 15 steps, a
checkpoint every 4 (top 2 by training loss, and ``last.ckpt``): the kill at step 10 falls inside an epoch,
and the rerun resumes inside one. ``--ddp``: the DDP strategy with 2 CPU processes on gloo (each rank its
half of the data: 3 batches an epoch).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptstore.integrations.lightning import CkptStoreCheckpointIO

STEPS, EVERY, BATCH = 15, 4, 8


class Regressor(pl.LightningModule):
    """A small regression model; its hyper-parameters (``lr``, ``hidden``) go into every checkpoint."""

    def __init__(self, lr: float = 0.05, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> StatefulDataLoader:
        """48 random samples in a fixed order, 6 batches an epoch (under DDP each rank its 24, in 3): the
        position inside the epoch is the loader's state, which Lightning puts in the checkpoint. Not shuffled,
        and the sampler made here rather than by Lightning (``use_distributed_sampler=False``): with an order
        drawn for each epoch (``set_epoch``), Lightning 2.6.6 resumes inside an epoch with the order of epoch
        0, whichever checkpoint plugin it uses (docs/integrations.md)."""
        g = torch.Generator().manual_seed(123)
        x = torch.randn(48, 6, generator=g)
        y = x @ torch.linspace(-1, 1, 6)[:, None] + 0.1 * torch.randn(48, 1, generator=g)
        dataset = TensorDataset(x, y)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return StatefulDataLoader(dataset, batch_size=BATCH, sampler=sampler)


class KillAt(pl.Callback):
    """SIGKILL at the end of training step ``n``: a crash between two checkpoints."""

    def __init__(self, n: int, group: bool) -> None:
        self.n, self.group = n, group

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.n and trainer.is_global_zero:
            sys.stdout.flush()
            if self.group:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


class StartStep(pl.Callback):
    """The global step the fit started from (after restoring a checkpoint)."""

    start = -1

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.start = trainer.global_step


def trainer(root: str | None, io: str, ddp: bool, callbacks: list[Any]) -> pl.Trainer:
    plugins: list[Any] = []
    if io == "ckptstore":
        plugins = [CkptStoreCheckpointIO()]
    elif io == "async":
        plugins = [AsyncCheckpointIO(CkptStoreCheckpointIO())]
    if root is not None:
        callbacks = [
            *callbacks,
            ModelCheckpoint(
                dirpath=root, every_n_train_steps=EVERY, save_top_k=2, monitor="train_loss", save_last=True
            ),
        ]
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=root is not None,
        deterministic=True,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(root: str | None, io: str, ddp: bool, kill_at: int | None) -> tuple[pl.Trainer, Regressor, StartStep]:
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    start = StartStep()
    callbacks: list[Any] = [start] + ([KillAt(kill_at, ddp)] if kill_at is not None else [])
    t = trainer(root, io, ddp, callbacks)
    t.fit(model, ckpt_path="last" if root is not None else None)
    return t, model, start


def dump(path: str, t: pl.Trainer, model: Regressor, start: StartStep) -> None:
    arrays = {f"model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    optimizer = t.optimizers[0]
    for i, p in enumerate(model.parameters()):
        for k, v in optimizer.state[p].items():
            arrays[f"opt.{i}.{k}"] = v.detach().numpy()
    arrays["lr"] = np.asarray(optimizer.param_groups[0]["lr"])
    arrays["global_step"] = np.asarray(t.global_step)
    arrays["start_step"] = np.asarray(start.start)
    np.savez(path, **arrays)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--io", choices=["ckptstore", "async", "native"], default="ckptstore")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--reference")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="lightning")  # "no last checkpoint", num_workers hints...
    torch.set_num_threads(1)
    if args.reference:  # first: a run killed part-way has written it all the same
        t, model, start = fit(None, args.io, args.ddp, None)
        if t.is_global_zero:
            dump(args.reference, t, model, start)
            print("reference done", flush=True)
    t, model, start = fit(args.root, args.io, args.ddp, args.kill_at)
    if t.is_global_zero:
        dump(args.out, t, model, start)
        print("fit done from step", start.start, flush=True)


if __name__ == "__main__":
    main()
