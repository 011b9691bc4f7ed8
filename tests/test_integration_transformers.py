"""CkptStoreTrainer (ckptstore.integrations.transformers) in real ``Trainer.train`` runs, on CPU.

The exact-resume test runs tests/hf_trainer_worker.py in subprocesses: a run killed with SIGKILL between
two checkpoints, then the same script rerun, which resumes from the store and finishes, then trains with
the Trainer's own checkpoints (uninterrupted; cut short and resumed natively; resumed natively-saved by
CkptStoreTrainer). The weights after the last step, the final (best) weights, the optimizer's state and
the log history must be identical to all of those. The rest runs small Trainers in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doc_examples import run_integrations_example
from tests.fw_helpers import REPO, run_python

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ckptstore  # noqa: E402
from ckptstore.errors import CheckpointNotFoundError, ConfigError  # noqa: E402
from ckptstore.integrations.transformers import CkptStoreTrainer  # noqa: E402
from tests.hf_trainer_worker import TIMING, Tokens, build  # noqa: E402

WORKER = REPO / "tests" / "hf_trainer_worker.py"
Trainer, TrainingArguments, TrainerCallback = (
    transformers.Trainer,
    transformers.TrainingArguments,
    transformers.TrainerCallback,
)


def run_worker(*args: str, expect_rc: int = 0) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"worker exited with {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc.stdout


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a and sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        assert torch.equal(a[k], b[k]), (what, k)


def assert_same_run(resumed: dict[str, Any], other: dict[str, Any], what: str) -> None:
    assert_same_tensors(resumed["last"], other["last"], f"{what}: weights after the last step")
    assert_same_tensors(resumed["final"], other["final"], f"{what}: final weights (the best model)")
    opt_a, opt_b = resumed["optimizer"], other["optimizer"]
    assert sorted(opt_a) == sorted(opt_b), what
    for index in opt_a:
        assert_same_tensors(opt_a[index], opt_b[index], f"{what}: optimizer state of parameter {index}")
    # Every logged training and evaluation value is equal; the final summary's train_loss averages the
    # steps this run trained (as in any Trainer resume), so it is left out.
    assert resumed["log_history"][:-1] == other["log_history"][:-1], what
    for key in ("global_step", "best_global_step", "best_metric"):
        assert resumed[key] == other[key], (what, key)


def test_train_killed_and_rerun_ends_bit_identical_to_uninterrupted_and_native(tmp_path: Path) -> None:
    root = tmp_path / "run"
    # 12 update steps, saves and evaluations every 3; killed at the end of step 8 (inside epoch 1 of 4
    # updates an epoch), before that step's save: the last checkpoint is step 6, inside epoch 1 too.
    run_worker(str(root), str(tmp_path / "killed.pt"), "--kill-at", "8", expect_rc=-9)
    store = ckptstore.CheckpointStore(root / "ckptstore", best_metric="best_eval_loss")
    # save_total_limit=2: the newest two, and the best (evaluation loss rises: the first evaluation's).
    assert store.steps() == [3, 6] and store.best_step() == 3
    info = store.info(6)
    assert info.metadata["epoch"] == 1.5 and "eval_loss" in info.metadata and "best_eval_loss" not in info.metadata
    assert "best_eval_loss" in store.info(3).metadata
    state_6 = store.restore(6, keys=["trainer_state", "position"])
    assert state_6["position"] == {"epoch": 1, "batch": 4}  # 2 updates of 2 batches into epoch 1

    out, ref = tmp_path / "resumed.pt", tmp_path / "reference.pt"
    run_worker(str(root), str(out), "--reference", str(ref))  # the same script, rerun
    resumed = torch.load(out, weights_only=True)
    reference = torch.load(ref, weights_only=True)
    assert resumed["global_step"] == 12 and resumed["best_global_step"] == 3
    assert resumed["best_model_checkpoint"] == store.info(3).path
    for name in ("uninterrupted", "native_resumed", "migrated"):
        assert_same_run(resumed, reference[name], name)
    assert store.steps() == [3, 9, 12]

    # The checkpoint's TrainerState is the native trainer_state.json of the same step, but for timings and
    # where the best checkpoint lies.
    native = reference["native_state_6"]
    ours = state_6["trainer_state"]
    assert sorted(ours) == sorted(native)
    for state in (ours, native):
        state["log_history"] = [{k: v for k, v in e.items() if k not in TIMING} for e in state["log_history"]]
        state["best_model_checkpoint"] = os.path.basename(state["best_model_checkpoint"])
    assert native.pop("best_model_checkpoint") == "checkpoint-3"
    assert ours.pop("best_model_checkpoint") == "step_00000003"
    assert ours == native


# --- in this process --------------------------------------------------------------------------------


def arguments(output_dir: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 2,
        "learning_rate": 1e-2,
    }
    return TrainingArguments(**{**base, **kw})


def trainer(output_dir: Path, cls: type = CkptStoreTrainer, *, callbacks: Any = (), **kw: Any) -> Any:
    store_kw = {k: kw.pop(k) for k in ("store", "storage_options") if k in kw}
    compute_metrics = kw.pop("compute_metrics", None)
    return cls(
        model=build(),
        args=arguments(output_dir, **kw),
        train_dataset=Tokens(24, seed=0),
        eval_dataset=Tokens(8, seed=1),
        compute_metrics=compute_metrics,
        callbacks=list(callbacks),
        **store_kw,
    )


def weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class RecordMetadata(transformers.TrainerCallback):
    """The metadata of each checkpoint, read from the store as it is saved (retention may delete it later)."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.metadata: dict[int, dict[str, Any]] = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.metadata[state.global_step] = self.trainer.store.info(state.global_step).metadata


def test_best_checkpoint_is_the_trainers_first_best_and_survives_rotation(tmp_path: Path) -> None:
    # Scores by evaluation (greater is better): steps 4 and 6 tie at the best. The Trainer's best is the
    # first to reach it (4); the store keeps it although the newest two are 8 and 10, and drops 6.
    scores = iter([0.5, 0.7, 0.7, 0.6, 0.6])
    record = RecordMetadata()
    t = record.trainer = trainer(
        tmp_path / "run",
        callbacks=[record],
        max_steps=10,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        compute_metrics=lambda _: {"score": next(scores)},
    )
    t.train()
    store = t.store
    assert t.best_key == "best_eval_score" and store.policy.best_mode == "max"
    assert store.steps() == [4, 8, 10] and store.best_step() == 4
    assert t.state.best_global_step == 4 and t.state.best_model_checkpoint == store.info(4).path
    assert {s: m["eval_score"] for s, m in record.metadata.items()} == {2: 0.5, 4: 0.7, 6: 0.7, 8: 0.6, 10: 0.6}
    # Only the Trainer's new bests carry the key the store ranks by: step 6 ties step 4, and comes later.
    assert {s: m["best_eval_score"] for s, m in record.metadata.items() if "best_eval_score" in m} == {2: 0.5, 4: 0.7}
    assert all(m["epoch"] == pytest.approx(s / 6) and "eval_loss" in m for s, m in record.metadata.items())
    # load_best_model_at_end: the model is step 4's.
    best = store.restore(4, like={"model": build()}, keys=["model"])["model"]
    assert_same_tensors(weights(t.model), weights(best), "best")


def test_a_pinned_checkpoint_is_not_rotated_away(tmp_path: Path) -> None:
    # Nothing but the store's retention deletes checkpoints, and it honours readers' pins.
    trainer(tmp_path / "run", max_steps=2, save_total_limit=1).train()
    t = trainer(tmp_path / "run", max_steps=6, save_total_limit=1)
    with t.store.pin(2):
        t.train(resume_from_checkpoint=True)
        assert t.store.steps() == [2, 6]
    assert t.state.global_step == 6


def test_resume_by_step_and_by_path(tmp_path: Path) -> None:
    full = trainer(tmp_path / "full")
    full.train()
    expected = weights(full.model)
    by_step = trainer(tmp_path / "full")  # the same store: step 4 is saved again (overwritten)
    by_step.train(resume_from_checkpoint=2)
    by_path = trainer(tmp_path / "other")  # a checkpoint of another store
    by_path.train(resume_from_checkpoint=full.store.info(2).path)
    for t in (by_step, by_path):
        assert t.state.global_step == 4
        assert_same_tensors(weights(t.model), expected, "resumed")
    assert by_path.store.steps() == [4]


def test_nothing_to_resume_raises(tmp_path: Path) -> None:
    t = trainer(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        t.train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointNotFoundError, match="no such step"):
        t.train(resume_from_checkpoint=4)


def test_save_only_model_holds_the_model_and_cannot_resume(tmp_path: Path) -> None:
    t = trainer(tmp_path / "run", save_only_model=True)
    t.train()
    saved = t.store.restore(4)
    assert saved["optimizer"] is None and saved["trainer_state"]["global_step"] == 4
    with pytest.raises(ConfigError, match="save_only_model"):
        trainer(tmp_path / "run", max_steps=6).train(resume_from_checkpoint=True)


def test_a_given_store_keeps_its_policy(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "store", max_to_keep=1)
    t = trainer(tmp_path / "run", store=store)
    t.train()
    assert t.store is store and store.steps() == [4]
    with pytest.raises(ConfigError, match=r"save_total_limit=3.*keeps its own retention policy"):
        trainer(tmp_path / "run", store=store, save_total_limit=3)
    with pytest.raises(ConfigError, match="keep_best=1, best_metric='best_eval_loss'"):
        trainer(tmp_path / "run", store=store, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)


def test_an_incompatible_trainer_raises_naming_the_version(tmp_path: Path) -> None:
    class OtherTrainer(Trainer):  # as a transformers version whose private method changed would have it
        def _load_rng_state(self, path: str) -> None:  # type: ignore[override]
            pass

    class Mixed(CkptStoreTrainer, OtherTrainer):
        pass

    with pytest.raises(ConfigError, match=r"transformers \S+ .*_load_rng_state lacks the parameters \['checkpoint'\]"):
        trainer(tmp_path / "run", cls=Mixed)


def test_import_ckptstore_imports_neither_transformers_nor_accelerate() -> None:
    frameworks = "('transformers', 'accelerate', 'torch')"
    code = f"import sys, ckptstore; print(sorted(m for m in sys.modules if m.split('.')[0] in {frameworks}))"
    out = run_python(code)
    assert out.strip() == "[]"


def test_the_docs_trainer_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Hugging Face Trainer")
    store = ckptstore.CheckpointStore(tmp_path / "out" / "ckptstore")
    assert store.latest_step() is not None
    assert json.dumps(store.restore(keys=["trainer_state"])["trainer_state"])  # plain data
