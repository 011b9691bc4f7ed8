"""Exact resume with Keras 3 on TensorFlow: a ``train_on_batch`` loop killed mid-run (SIGKILL, between two
checkpoints), restored in a fresh process into a rebuilt (renamed) model and optimizer and continued,
ends bit for bit where an uninterrupted run ends.

Bit-for-bit holds because TensorFlow runs on CPU with ``tf.config.experimental.enable_op_determinism()``
and everything the loop depends on is in the checkpoint: the model's variables (Dense, BatchNormalization
statistics, the Dropout layer's seed generator state), the optimizer's variables (``iterations`` drives
the learning-rate schedule and Adam's bias correction), the NumPy generator that samples batches and
Python's ``random`` (through ``ckptstore.RNGState``) that shuffles them.

Two processes only (TensorFlow starts slowly): the second one resumes, then runs the uninterrupted
reference from scratch with the seed the first one used.
"""

from __future__ import annotations

from typing import Any

from tests.fw_helpers import run_python

TRAIN = """
import hashlib, os, random, signal, sys
import numpy as np, tensorflow as tf, keras, ckptstore

mode, root = sys.argv[1], sys.argv[2]
STEPS, SAVE_EVERY, KILL_AFTER = 10, 3, 7
tf.config.experimental.enable_op_determinism()
X = np.random.default_rng(123).standard_normal((64, 8)).astype(np.float32)
Y = (X @ np.linspace(-1, 1, 8, dtype=np.float32))[:, None]

def fresh(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.3),
                              keras.layers.Dense(1)])
    schedule = keras.optimizers.schedules.CosineDecay(0.0, STEPS, warmup_target=0.05, warmup_steps=4)
    opt = keras.optimizers.Adam(schedule)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    return {"model": model, "opt": opt, "data": np.random.default_rng(seed), "rng": ckptstore.RNGState(),
            "step": 0}

def train(state, store, kill_after=None):
    while state["step"] < STEPS:
        idx = state["data"].choice(len(X), size=16, replace=False).tolist()
        random.shuffle(idx)
        state["model"].train_on_batch(X[idx], Y[idx])
        state["step"] += 1
        if store is not None and state["step"] % SAVE_EVERY == 0:
            store.save(state["step"], state)
        if state["step"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # interrupted between two checkpoints
    h = hashlib.sha256()
    for v in state["model"].variables + state["opt"].variables:
        h.update(np.asarray(v.numpy()).tobytes())
    return h.hexdigest()

store = ckptstore.CheckpointStore(root)
if mode == "first":
    train(fresh(0), store, kill_after=KILL_AFTER)
else:
    state = store.restore(like=fresh(99))  # a different init: everything must come from the checkpoint
    assert int(state["opt"].iterations.numpy()) == state["step"], "optimizer.iterations did not come back"
    print("resumed", state["step"])
    print("final", train(state, None))
    print("final", train(fresh(0), None))  # the uninterrupted reference, same seed as "first"
"""


def test_keras_loop_killed_and_resumed_matches_uninterrupted_run(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    run_python(TRAIN, "first", root, expect_rc=-9)
    resumed, final_resumed, final_reference = run_python(TRAIN, "resume", root).strip().split("\n")[-3:]

    assert resumed == "resumed 6"  # from the last checkpoint before the kill, not from scratch
    assert final_resumed.startswith("final ")
    assert final_resumed == final_reference  # every model and optimizer variable: bit for bit
