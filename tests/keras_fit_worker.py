"""A Keras ``model.fit`` run backed up by ``CkptStoreCallback``, as a training script would be: run in a
subprocess by tests/test_integration_keras.py, killed part-way and rerun unchanged.

    python tests/keras_fit_worker.py ROOT SAVE_FREQ OUT.npz [--shuffle] [--kill-after N] [--reference REF.npz]

ROOT: the store; SAVE_FREQ: "epoch" or a number of batches. The process SIGKILLs itself at the end of
training batch N (counted from the start of this process's fit, after the callback has seen that batch)
with ``--kill-after``. Otherwise it writes the final variables of the model and the optimizer, the
optimizer's ``iterations`` and the logs of each epoch it ran to OUT.npz; with ``--reference``, it then trains a
fresh model of the same seed for the same epochs without the callback (uninterrupted) and writes the same
to REF.npz.

The Keras backend is ``KERAS_BACKEND`` (TensorFlow by default). Deterministic on CPU (TensorFlow with
``enable_op_determinism``): the model has Dropout (TensorFlow and JAX: its seed generator's state is a model
variable; torch: it draws from torch's global generator) and BatchNormalization, the optimizer a warm-up
cosine schedule driven by ``iterations``, and the compiled metric ``mae`` running values that a
mid-epoch resume restores. With ``--shuffle`` the data order of each epoch is drawn by fit (TensorFlow: a
seeded op of its input pipeline; JAX: NumPy's global generator; torch: torch's).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras
import numpy as np

from ckptstore.integrations.keras import CkptStoreCallback

EPOCHS, BATCH = 4, 16  # 96 samples: 6 batches an epoch, 24 in all
DATA = np.random.default_rng(123)
X = DATA.standard_normal((96, 8)).astype(np.float32)
Y = (X @ np.linspace(-1, 1, 8, dtype=np.float32))[:, None] + 0.1 * DATA.standard_normal((96, 1)).astype(np.float32)
X_VAL = DATA.standard_normal((32, 8)).astype(np.float32)
Y_VAL = (X_VAL @ np.linspace(-1, 1, 8, dtype=np.float32))[:, None]


def build(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(0.0, EPOCHS * 6, warmup_target=0.05, warmup_steps=8)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", metrics=["mae"])
    return model


class KillAfter(keras.callbacks.Callback):
    """SIGKILL this process at the end of its ``n``-th training batch: a crash between two checkpoints."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.seen += 1
        if self.seen == self.n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def fit(model: Any, callbacks: list[Any], shuffle: bool) -> Any:
    return model.fit(
        X,
        Y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=shuffle,
        validation_data=(X_VAL, Y_VAL),
        callbacks=callbacks,
        verbose=0,
    )


def dump(path: str, model: Any, history: Any) -> None:
    arrays = {f"var{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables + model.optimizer.variables)}
    arrays["iterations"] = np.asarray(model.optimizer.iterations.numpy())
    arrays["epochs"] = np.asarray(history.epoch, dtype=np.int64)  # the epochs this fit() ran
    for name, values in history.history.items():
        arrays[f"history_{name}"] = np.asarray(values, dtype=np.float64)
    np.savez(path, **arrays)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("save_freq")
    p.add_argument("out")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--kill-after", type=int)
    p.add_argument("--reference")
    args = p.parse_args()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)

    model = build(0)
    callbacks: list[Any] = [CkptStoreCallback(args.root, save_freq=save_freq, max_to_keep=2)]
    if args.kill_after is not None:
        callbacks.append(KillAfter(args.kill_after))
    history = fit(model, callbacks, args.shuffle)
    dump(args.out, model, history)
    print("fit done", len(history.epoch), "epochs", flush=True)
    if args.reference:
        reference = build(0)
        dump(args.reference, reference, fit(reference, [], args.shuffle))
        print("reference done", flush=True)


if __name__ == "__main__":
    main()
