"""A Flax NNX training script backed up by a CheckpointStore, as a user would write one: run in a subprocess
by tests/test_integration_flax.py, killed part-way and rerun unchanged.

    python tests/flax_nnx_worker.py ROOT OUT.npz [--kill-after N] [--reference REF.npz]

Trains a small MLP (bfloat16 first layer, BatchNorm, Dropout drawing from its own RNG stream) with
``nnx.Optimizer(optax.adam(schedule))`` for STEPS steps on fixed data, each batch drawn with an
``nnx.Rngs`` stream, saving ``{"model", "opt", "rngs"}`` every SAVE_EVERY steps into ROOT and resuming
from its latest checkpoint when it starts. With ``--kill-after N`` the process SIGKILLs itself after
training step N (a crash between two checkpoints). Otherwise it writes the final state of the model,
the optimizer and the RNGs (every variable's bytes) and the loss of each step it trained to OUT.npz; with
``--reference``, it then trains fresh objects of the same seed for STEPS steps without a store (the
uninterrupted run) and writes the same to REF.npz.

Runs on CPU (JAX_PLATFORMS=cpu), where XLA runs a compiled program deterministically.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ckptstore

STEPS, SAVE_EVERY, BATCH, SEED = 12, 3, 16, 0
DATA = np.random.default_rng(123)
X = jnp.asarray(DATA.standard_normal((64, 8), dtype=np.float32))
Y = X @ jnp.linspace(-1, 1, 8)[:, None] + 0.1 * jnp.asarray(DATA.standard_normal((64, 1), dtype=np.float32))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(8, 16, param_dtype=jnp.bfloat16, dtype=jnp.float32, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


# One transformation for every optimizer built here: it is static to nnx.jit, which compiles anew for another.
TX = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 0.05, 4, STEPS))  # the schedule: by the optimizer's count


def build(seed: int) -> tuple[MLP, nnx.Optimizer, nnx.Rngs]:
    model = MLP(nnx.Rngs(seed, dropout=seed + 1))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    return model, optimizer, nnx.Rngs(data=seed + 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: Any, y: Any) -> Any:
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def train(model: MLP, optimizer: nnx.Optimizer, rngs: nnx.Rngs, start: int, step_end: Any) -> dict[int, float]:
    """Steps ``start + 1 .. STEPS``; ``step_end(step)`` after each. Returns the loss of each step."""
    losses = {}
    for step in range(start + 1, STEPS + 1):
        idx = jax.random.permutation(rngs.data(), X.shape[0])[:BATCH]
        losses[step] = float(train_step(model, optimizer, X[idx], Y[idx]))
        step_end(step)
    return losses


def dump(path: str, objects: dict[str, Any], losses: dict[int, float]) -> None:
    """Every variable's bytes (``var/<object>/<path>``) and dtype, and the losses, to an npz file."""
    out: dict[str, np.ndarray] = {"steps": np.array(list(losses)), "losses": np.array(list(losses.values()))}
    for name, obj in objects.items():
        for keypath, variable in nnx.to_flat_state(nnx.state(obj)):
            value = variable.get_value()
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            arr = np.asarray(value)
            key = "/".join(map(str, (name, *keypath)))
            out[f"var/{key}"] = np.frombuffer(arr.tobytes(), np.uint8)
            out[f"dtype/{key}"] = np.array(f"{arr.dtype}{arr.shape}")
    np.savez(path, **out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--kill-after", type=int)
    p.add_argument("--reference")
    args = p.parse_args()

    model, optimizer, rngs = build(SEED)
    state = {"model": model, "opt": optimizer, "rngs": rngs}
    store = ckptstore.CheckpointStore(args.root, max_to_keep=2)
    _, step = store.resume(state)  # restores the objects in place
    start = 0 if step is None else step
    assert int(optimizer.step[...]) == start, (int(optimizer.step[...]), start)
    print(f"starting at step {start}", flush=True)

    def step_end(step: int) -> None:
        if step % SAVE_EVERY == 0:
            store.save(step, state)
        if step == args.kill_after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    losses = train(model, optimizer, rngs, start, step_end)
    store.close()
    dump(args.out, state, losses)

    if args.reference:
        ref_model, ref_optimizer, ref_rngs = build(SEED)
        ref_losses = train(ref_model, ref_optimizer, ref_rngs, 0, lambda step: None)
        dump(args.reference, {"model": ref_model, "opt": ref_optimizer, "rngs": ref_rngs}, ref_losses)


if __name__ == "__main__":
    main()
