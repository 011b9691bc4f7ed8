"""CkptStoreCallback (ckptstore.integrations.keras) in real ``model.fit`` runs on the TensorFlow backend.

The exact-resume tests run tests/keras_fit_worker.py in subprocesses: a fit killed with SIGKILL between
two checkpoints, then the same script rerun, which resumes and finishes, then trains the uninterrupted
reference from scratch; every model and optimizer variable must be bit-identical, and the logs of every
epoch the rerun trained equal to the reference's. On TensorFlow with checkpoints at epoch ends and inside
an epoch; on torch (the worker's backend is KERAS_BACKEND) inside an epoch. The rest runs small fits in
this process, on TensorFlow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import fw_helpers  # noqa: F401  (fixes KERAS_BACKEND and quiets TF before Keras is imported)
from tests.doc_examples import run_integrations_example
from tests.fw_helpers import FRAMEWORK_ENV, REPO, assert_kept_after_kill, run_python

keras = pytest.importorskip("keras")

import ckptstore  # noqa: E402
from ckptstore.errors import ConfigError  # noqa: E402
from ckptstore.integrations.keras import CkptStoreCallback, resolve_mode  # noqa: E402

WORKER = REPO / "tests" / "keras_fit_worker.py"


def run_worker(backend: str, *args: str, expect_rc: int = 0) -> str:
    env = {**os.environ, **FRAMEWORK_ENV, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"worker exited with {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc.stdout


# 6 batches an epoch, 4 epochs. Killed after batch 15 (in epoch 2, whose checkpoint at step 12 was saved)
# with save_freq="epoch"; after batch 11 with save_freq=4 (the last checkpoint: step 8, epoch 1, batch 2).
EPOCH = ("epoch", 15, [6, 12], {"epoch": 2, "batch": 0}, [18, 24])
MID_EPOCH = ("4", 11, [4, 8], {"epoch": 1, "batch": 2}, [20, 24])
# (backend, shuffle, case). Shuffled data: seeded, reproducible (docs/integrations.md). On torch the hardest
# case only (14 s more): inside an epoch, shuffled (the order drawn from torch's global generator as the
# epoch begins), and Dropout drawing from that generator at every batch. (JAX passes the same; left out
# for time.)
CASES = {
    "tensorflow-epoch-shuffled": ("tensorflow", True, EPOCH),
    "tensorflow-mid-epoch": ("tensorflow", False, MID_EPOCH),
    "torch-mid-epoch-shuffled": ("torch", True, MID_EPOCH),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_fit(case: str, tmp_path: Path) -> None:
    backend, shuffle, (save_freq, kill_after, steps_at_kill, metadata_at_kill, steps_at_end) = CASES[case]
    pytest.importorskip(backend)
    root = str(tmp_path / "run")
    flags = ["--shuffle"] if shuffle else []
    killed = str(tmp_path / "killed.npz")
    run_worker(backend, root, save_freq, killed, *flags, "--kill-after", str(kill_after), expect_rc=-9)

    store = ckptstore.CheckpointStore(root)
    assert_kept_after_kill(store.steps(), steps_at_kill)  # max_to_keep=2; steps count batches
    info = store.info()
    assert {k: info.metadata[k] for k in ("epoch", "batch")} == metadata_at_kill
    assert ("val_loss" in info.metadata) == (save_freq == "epoch")  # the batch logs hold no validation metric

    out, ref = tmp_path / "resumed.npz", tmp_path / "reference.npz"
    run_worker(backend, root, save_freq, str(out), *flags, "--reference", str(ref))  # the same script, rerun
    resumed, reference = np.load(out), np.load(ref)

    variables = sorted(k for k in reference.files if k.startswith("var"))
    assert variables and variables == sorted(k for k in resumed.files if k.startswith("var"))
    for k in variables:  # the model's and the optimizer's variables, bit for bit
        assert resumed[k].dtype == reference[k].dtype and resumed[k].shape == reference[k].shape, k
        assert resumed[k].tobytes() == reference[k].tobytes(), k
    assert int(resumed["iterations"]) == int(reference["iterations"]) == 24
    # The rerun trained from the checkpoint's epoch on, and each of those epochs logged what the
    # uninterrupted run logged: for the mid-epoch case the resumed epoch's averages include the batches
    # trained before the kill (the restored metric state).
    assert resumed["epochs"].tolist() == list(range(metadata_at_kill["epoch"], 4))
    for name in ("loss", "mae", "val_loss", "val_mae"):
        assert np.array_equal(resumed[f"history_{name}"], reference[f"history_{name}"][resumed["epochs"]]), name
    assert ckptstore.CheckpointStore(root).steps() == steps_at_end


# --- in this process ------------------------------------------------------------------------------------


def data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]


def model(**compile_kw: Any) -> Any:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    m.compile(**{"optimizer": keras.optimizers.SGD(0.02), "loss": "mse", **compile_kw})
    return m


def test_keep_best_by_val_loss_keeps_the_best_epochs_and_the_newest(tmp_path: Path) -> None:
    x, y = data()
    x_val, y_val = data(16, seed=1)
    # The validation targets are the training targets negated: the better the fit, the worse val_loss,
    # so the best epochs are the first ones and not the newest.
    cb = CkptStoreCallback(tmp_path / "run", max_to_keep=1, keep_best=2, monitor="val_loss")
    history = model().fit(
        x, y, batch_size=16, epochs=5, validation_data=(x_val, -y_val), callbacks=[cb], verbose=0, shuffle=False
    )
    val_loss = history.history["val_loss"]
    step_of = {e: 4 * (e + 1) for e in range(5)}  # 4 batches an epoch
    best_two = sorted(range(5), key=lambda e: val_loss[e])[:2]
    assert max(best_two) < 4  # the test means something: the best are not the newest
    assert cb.store.policy.best_mode == "min"  # "auto" for a loss
    assert cb.store.steps() == sorted({step_of[e] for e in best_two} | {step_of[4]})
    assert cb.store.best_step() == step_of[best_two[0]]
    for e in (*best_two, 4):
        metadata = cb.store.info(step_of[e]).metadata
        assert metadata == {"epoch": e + 1, "batch": 0, "val_loss": val_loss[e]}


def test_a_given_store_keeps_its_own_policy(tmp_path: Path) -> None:
    x, y = data()
    store = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=2, keep_best=1, best_metric="loss")
    cb = CkptStoreCallback(store, save_freq=3)
    assert cb.store is store and cb.monitor == "loss"  # the store's best_metric is recorded
    model().fit(x, y, batch_size=16, epochs=3, callbacks=[cb], verbose=0, shuffle=False)  # 12 batches
    steps = store.steps()
    assert steps[-2:] == [9, 12] and set(steps) <= {3, 6, 9, 12} and store.best_step() in steps
    assert all("loss" in store.info(s).metadata for s in steps)  # the batch logs hold the training loss


@pytest.mark.parametrize(
    "kwargs",
    [{"max_to_keep": 3}, {"keep_best": 1}, {"mode": "max"}, {"storage_options": {"anon": True}}],
    ids=lambda kw: next(iter(kw)),
)
def test_retention_arguments_with_a_store_raise(kwargs: dict[str, Any], tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"{next(iter(kwargs))}=.*keeps its own retention policy"):
        CkptStoreCallback(store, **kwargs)


def test_a_monitor_other_than_the_stores_metric_raises(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run", keep_best=1, best_metric="val_acc", best_mode="max")
    with pytest.raises(ConfigError, match="best_metric='val_acc'"):
        CkptStoreCallback(store, monitor="val_loss")
    assert CkptStoreCallback(store, monitor="val_acc").monitor == "val_acc"
    assert CkptStoreCallback(ckptstore.CheckpointStore(tmp_path / "other")).monitor == "val_loss"


@pytest.mark.parametrize(
    "bad", [{"save_freq": 0}, {"save_freq": "batch"}, {"save_freq": True}, {"mode": "auto-ish"}, {"monitor": ""}]
)
def test_bad_arguments_raise(bad: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CkptStoreCallback(tmp_path / "run", **bad)


def test_mode_auto_decides_as_keras() -> None:
    assert resolve_mode("val_loss") == resolve_mode("loss") == resolve_mode("val_output_loss") == "min"
    for name in ("val_accuracy", "acc", "val_auc", "val_precision", "recall", "val_f1_score", "mean_iou"):
        assert resolve_mode(name) == "max", name
    for name in ("val_mae", "mean_squared_error", "val_something"):
        assert resolve_mode(name) == "min", name
    assert resolve_mode("val_accuracy", "min") == "min" and resolve_mode("val_loss", "max") == "max"
    with pytest.raises(ConfigError):
        resolve_mode("val_loss", "biggest")


def test_mode_auto_asks_the_models_metric_at_the_first_save(tmp_path: Path) -> None:
    # A metric whose name says nothing: its direction ("up") decides, once fit has built it.
    x, y = data()
    labels = (y > 0).astype(np.float32)
    m = model(loss="binary_crossentropy", metrics=[keras.metrics.BinaryAccuracy(name="score")])
    assert resolve_mode("val_score", model=m) == "min"  # not built yet: by the name
    cb = CkptStoreCallback(tmp_path / "run", monitor="val_score", keep_best=1)
    m.fit(x, labels, batch_size=16, epochs=2, validation_split=0.25, callbacks=[cb], verbose=0)
    assert resolve_mode("val_score", model=m) == "max"
    assert cb.store.policy.best_mode == "max"
    assert cb.store.best_step() in cb.store.steps()


def test_a_later_fit_of_the_model_is_not_moved_to_the_restored_epoch(tmp_path: Path) -> None:
    x, y = data()
    model().fit(x, y, batch_size=16, epochs=2, callbacks=[CkptStoreCallback(tmp_path / "run")], verbose=0)
    m2 = model()
    history = m2.fit(x, y, batch_size=16, epochs=3, callbacks=[CkptStoreCallback(tmp_path / "run")], verbose=0)
    assert history.epoch == [2]  # resumed after epoch 2 of 3
    assert int(m2.optimizer.iterations.numpy()) == 12
    assert m2.fit(x, y, batch_size=16, epochs=1, verbose=0).epoch == [0]  # no callback: fit as Keras does


def test_an_unbuilt_model_starts_fresh_but_cannot_resume(tmp_path: Path) -> None:
    x, y = data()

    def unbuilt() -> Any:  # no keras.Input: on TensorFlow, fit builds it at its first step
        m = keras.Sequential([keras.layers.Dense(1)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    unbuilt().fit(x, y, batch_size=16, epochs=1, callbacks=[CkptStoreCallback(tmp_path / "run")], verbose=0)
    assert ckptstore.CheckpointStore(tmp_path / "run").steps() == [4]
    with pytest.raises(ConfigError, match="holds checkpoints to resume from, but the model is not built"):
        unbuilt().fit(x, y, batch_size=16, epochs=2, callbacks=[CkptStoreCallback(tmp_path / "run")], verbose=0)


def test_import_ckptstore_imports_no_integration() -> None:
    out = run_python("import sys, ckptstore; print(sorted(m for m in sys.modules if 'integrations' in m))")
    assert out.strip() == "[]"


def test_the_docs_keras_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Keras")
    assert ckptstore.CheckpointStore(tmp_path / "ckpts" / "keras-run").latest_step() == 18
