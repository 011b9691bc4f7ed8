"""Exact resume with JAX + optax: a training loop killed mid-run (SIGKILL, between two checkpoints),
restored in a fresh process and continued, ends bit for bit where an uninterrupted run ends.

Bit-for-bit is the right bar here: XLA on CPU runs the same compiled program deterministically, and
everything the loop depends on is in the checkpoint: parameters (bfloat16 and float32), the optax state
(its ``count`` drives the schedule and Adam's bias correction), the JAX dropout key, the NumPy generator
that samples batches and Python's ``random`` (through ``ckptstore.RNGState``) that shuffles them.

The second process resumes, then runs the uninterrupted reference from scratch with the first one's seed
(JAX is functional: nothing of the resumed run leaks into it).
"""

from __future__ import annotations

from typing import Any

from tests.fw_helpers import run_python

STEPS, SAVE_EVERY, KILL_AFTER = 12, 3, 7

TRAIN = """
import hashlib, os, random, signal, sys
import jax, jax.numpy as jnp, numpy as np, optax, ckptstore

mode, root = sys.argv[1], sys.argv[2]
STEPS, SAVE_EVERY, KILL_AFTER = 12, 3, 7
X = np.random.default_rng(123).standard_normal((64, 8), dtype=np.float32)
Y = (X @ np.linspace(-1, 1, 8, dtype=np.float32))[:, None]

def init(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w1": jax.random.normal(k1, (8, 16)).astype(jnp.bfloat16), "b1": jnp.zeros(16),
            "w2": jax.random.normal(k2, (16, 1)) * 0.1, "b2": jnp.zeros(1)}

schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 4, STEPS)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-3))

def loss(params, x, y, key):
    h = jax.nn.relu(x @ params["w1"].astype(jnp.float32) + params["b1"])
    keep = jax.random.bernoulli(key, 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0)
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

@jax.jit
def train_step(params, opt_state, x, y, key):
    grads = jax.grad(loss)(params, x, y, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

def fresh(seed):
    random.seed(seed)
    params = init(seed)
    return {"params": params, "opt": opt.init(params), "key": jax.random.key(seed),
            "data": np.random.default_rng(seed), "rng": ckptstore.RNGState(), "step": 0}

def train(state, store, kill_after=None):
    while state["step"] < STEPS:
        idx = state["data"].choice(len(X), size=16, replace=False).tolist()
        random.shuffle(idx)
        state["key"], sub = jax.random.split(state["key"])
        state["params"], state["opt"] = train_step(state["params"], state["opt"], X[idx], Y[idx], sub)
        state["step"] += 1
        if store is not None and state["step"] % SAVE_EVERY == 0:
            store.save(state["step"], state)
        if state["step"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # interrupted between two checkpoints
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves((state["params"], state["opt"], jax.random.key_data(state["key"]))):
        h.update(np.asarray(leaf).tobytes())
    return f"{h.hexdigest()} loss={float(loss(state['params'], X, Y, jax.random.key(0)))}"

store = ckptstore.CheckpointStore(root)
if mode == "first":
    train(fresh(0), store, kill_after=KILL_AFTER)
else:
    state = store.restore(like=fresh(99))  # a different init: everything must come from the checkpoint
    assert int(state["opt"][1][0].count) == state["step"], "optax count did not round-trip"
    print("resumed", state["step"])
    print("final", train(state, None))
    print("final", train(fresh(0), None))  # the uninterrupted reference, same seed as "first"
"""


def test_jax_optax_loop_killed_and_resumed_matches_uninterrupted_run(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    run_python(TRAIN, "first", root, expect_rc=-9)
    resumed, final_resumed, final_reference = run_python(TRAIN, "resume", root).strip().split("\n")[-3:]

    assert resumed == f"resumed {KILL_AFTER // SAVE_EVERY * SAVE_EVERY}"  # from step 6, not from scratch
    assert final_resumed.startswith("final ")
    assert final_resumed == final_reference  # parameters, optimizer state and key: bit for bit
