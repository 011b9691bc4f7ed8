"""A tiny PyTorch training run for the exact-resume test, run as its own process.

``python -m tests.resume_worker STORE OUT --total N [--stop K] [--resume | --weights-only]``

Trains a small model with Adam, a OneCycle LR schedule, dropout (torch's global RNG), an epoch-wise data
order from a seeded ``torch.Generator`` and input noise from a NumPy ``Generator``, saving the whole state
into the ckptstore at STORE every 3 steps (max_to_keep=2). With ``--stop K`` it exits right after step K
(as if killed after a save); with ``--resume`` it first restores the latest checkpoint into freshly built
objects; with ``--weights-only`` it restores only the model and the step count, as weights-only checkpoints
do. At the end it writes the parameters, the optimizer's moments and the loss curve to OUT (safetensors;
the losses as a float64 tensor).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import ckptstore

N_SAMPLES, BATCH, SAVE_EVERY = 24, 4, 3


def build(total: int) -> dict[str, Any]:
    """Freshly built training objects, as a new process would build them (before any restore)."""
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=total)
    data_gen = torch.Generator().manual_seed(7)
    noise = np.random.default_rng(11)
    return {"model": model, "opt": opt, "sched": sched, "data_gen": data_gen, "noise": noise}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 3, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("out")
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--stop", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--weights-only", action="store_true", help="restore the model and step count only")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one summation order in every process

    objs = build(args.total)
    model, opt, sched = objs["model"], objs["opt"], objs["sched"]
    x_all, y_all = dataset()
    store = ckptstore.CheckpointStore(args.store, max_to_keep=2)
    step, perm, pos, losses = 0, torch.randperm(N_SAMPLES, generator=objs["data_gen"]), 0, []

    if args.weights_only:  # the failure mode ckptstore exists to prevent, as a control for the test
        state = store.restore(
            like={
                "model": model,
                "step": 0,
                "losses": [],
                "opt": None,
                "sched": None,
                "perm": None,
                "pos": 0,
                "rng": None,
            }
        )
        step, losses = state["step"], state["losses"]
    elif args.resume:
        like = {"model": model, "opt": opt, "sched": sched, "perm": torch.zeros(N_SAMPLES, dtype=torch.int64)}
        state = store.restore(like={**like, "step": 0, "pos": 0, "losses": [], "rng": None})
        step, perm, pos, losses = state["step"], state["perm"], state["pos"], state["losses"]
        objs["data_gen"].set_state(torch.from_numpy(state["rng"]["data_gen"]))
        objs["noise"].bit_generator.state = state["rng"]["noise"]
        torch.set_rng_state(torch.from_numpy(state["rng"]["torch"]))

    model.train()
    while step < args.total:
        if pos + BATCH > N_SAMPLES:  # a new epoch: a new order from the data generator
            perm, pos = torch.randperm(N_SAMPLES, generator=objs["data_gen"]), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        noise = torch.from_numpy(objs["noise"].normal(0.0, 0.01, size=(BATCH, 3)).astype(np.float32))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x_all[idx] + noise), y_all[idx])
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if step % SAVE_EVERY == 0:
            rng = {
                "data_gen": objs["data_gen"].get_state(),
                "noise": objs["noise"].bit_generator.state,
                "torch": torch.get_rng_state(),
            }
            state = {"model": model, "opt": opt, "sched": sched, "perm": perm, "pos": pos, "step": step}
            store.save(step, {**state, "losses": losses, "rng": rng}, metadata={"loss": losses[-1]})
        if args.stop is not None and step == args.stop:
            break

    out = {f"param/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state.items():
        name = next(n for n, p in model.named_parameters() if p is i)
        out[f"exp_avg/{name}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].clone()
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out["step"] = torch.tensor([step, sched.last_epoch])
    save_file(out, args.out)


if __name__ == "__main__":
    main()
