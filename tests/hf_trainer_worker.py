"""A Hugging Face ``Trainer`` run saving through ``CkptStoreTrainer``, as a training script would be: run in a
subprocess by tests/test_integration_transformers.py, killed part-way and rerun unchanged.

    python tests/hf_trainer_worker.py ROOT OUT [--kill-at N] [--reference REF]

ROOT: the run's output_dir (the store is ROOT/ckptstore). The script resumes from the store's latest
checkpoint when there is one (``resume_from_checkpoint=trainer.store.latest_step() is not None``). With
``--kill-at`` the process SIGKILLs itself at the end of update step N (before that step's evaluation and
save). Otherwise it writes to OUT (torch.save) the model's final weights (the best model, loaded at the
end), its weights after the last update step, the optimizer's state and the TrainerState; with
``--reference`` it then trains, in this process, with the Trainer's own checkpoints under ROOT/native
(all kept): uninterrupted (REF "uninterrupted"), then resumed from its native checkpoint-6 by
CkptStoreTrainer ("migrated") and by the Trainer ("native_resumed"), and writes them all to REF, with
checkpoint-6's trainer_state.json ("native_state_6").

A tiny GPT-2 built from its config (no download) with dropout (drawn from torch's global generator at
every step), AdamW with warm-up and cosine decay, gradient accumulation over 2 batches, shuffled data
(the Trainer's seeded sampler), evaluation and saves every 3 updates, ``save_total_limit=2``,
``load_best_model_at_end``: 3 epochs of 4 updates, 12 in all.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ckptstore.integrations.transformers import CkptStoreTrainer

transformers.logging.set_verbosity_error()

VOCAB, SEQ = 32, 8
#: TrainerState entries that measure time (they differ between any two runs).
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second")  # fmt: skip


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the labels the inputs (causal LM): a fixed dataset of ``n`` examples."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build() -> GPT2LMHeadModel:
    transformers.set_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(output_dir: str, **kw: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=1e-2,
        warmup_steps=3,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=3,
        save_total_limit=2,
        load_best_model_at_end=True,
    )
    return TrainingArguments(**{**settings, **kw})


class LastStep(TrainerCallback):
    """Keeps the model's weights after each update step (load_best_model_at_end replaces them at the end)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of update step ``n``: a crash between two checkpoints."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def train(cls: type[Trainer], output_dir: str, *callbacks: Any, resume: Any = None, **kw: Any) -> dict[str, Any]:
    last = LastStep()
    trainer = cls(
        model=build(),
        args=arguments(output_dir, **kw),
        train_dataset=Tokens(32, seed=0),
        eval_dataset=Tokens(16, seed=1),
        callbacks=[last, *callbacks],
    )
    if cls is CkptStoreTrainer and resume is None:
        resume = trainer.store.latest_step() is not None  # the same script resumes when there is a checkpoint
    trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    return {
        "final": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "last": last.weights,
        "optimizer": trainer.optimizer.state_dict()["state"],
        "log_history": [{k: v for k, v in e.items() if k not in TIMING} for e in state.log_history],
        "global_step": state.global_step,
        "best_global_step": state.best_global_step,
        "best_metric": state.best_metric,
        "best_model_checkpoint": state.best_model_checkpoint,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--reference")
    args = p.parse_args()
    callbacks = [KillAt(args.kill_at)] if args.kill_at is not None else []
    torch.save(train(CkptStoreTrainer, args.root, *callbacks), args.out)
    print("trained", flush=True)
    if args.reference:
        native = os.path.join(args.root, "native")
        # Every native checkpoint kept (rotation changes nothing else), to resume from checkpoint-6 after.
        reference = {"uninterrupted": train(Trainer, native, save_total_limit=None)}
        checkpoint_6 = os.path.join(native, "checkpoint-6")
        with open(os.path.join(checkpoint_6, "trainer_state.json")) as f:
            reference["native_state_6"] = json.load(f)
        reference["migrated"] = train(CkptStoreTrainer, os.path.join(args.root, "migrated"), resume=checkpoint_6)
        reference["native_resumed"] = train(Trainer, native, resume=checkpoint_6, save_total_limit=None)
        torch.save(reference, args.reference)
        print("reference done", flush=True)


if __name__ == "__main__":
    main()
