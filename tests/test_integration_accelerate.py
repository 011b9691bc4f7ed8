"""ckptstore.integrations.accelerate (save_state / load_state / skip_first_batches) in real Accelerate
training loops, on CPU, in one process.

The exact-resume tests run tests/hf_accelerate_worker.py in subprocesses: a loop killed with SIGKILL
between two checkpoints, then the same script rerun, which resumes and finishes, then trains uninterrupted
without checkpoints; every state and every later batch's loss must be identical. At an epoch's end the
same is checked for Accelerate's own save_state / load_state. The rest runs small loops in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doc_examples import run_integrations_example
from tests.fw_helpers import REPO, assert_kept_after_kill, run_python

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

import ckptstore  # noqa: E402
from ckptstore.errors import ConfigError, StructureMismatchError  # noqa: E402
from ckptstore.integrations.accelerate import load_state, save_state, skip_first_batches  # noqa: E402

WORKER = REPO / "tests" / "hf_accelerate_worker.py"
Accelerator, DataLoaderConfiguration = accelerate.Accelerator, accelerate.DataLoaderConfiguration


def run_worker(*args: str, expect_rc: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"worker exited with {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )


def assert_same_tensors(a: dict[Any, Any], b: dict[Any, Any], what: str) -> None:
    assert a and sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        assert torch.equal(a[k], b[k]), (what, k)


def assert_same_end(resumed: dict[str, Any], reference: dict[str, Any], trained: int, what: str) -> None:
    """``resumed`` (a run that trained its last ``trained`` batches) ends as ``reference`` (all 36)."""
    assert_same_tensors(resumed["model"], reference["model"], f"{what}: model")
    assert sorted(resumed["optimizer"]) == sorted(reference["optimizer"]), what
    for index in reference["optimizer"]:
        assert_same_tensors(resumed["optimizer"][index], reference["optimizer"][index], f"{what}: optimizer {index}")
    assert resumed["scheduler"] == reference["scheduler"], what
    assert resumed["seen"] == reference["seen"] == 36 * 8, what  # the registered object
    assert resumed["accelerator_step"] == reference["accelerator_step"], what
    assert resumed["steps"] == reference["steps"] == 36
    assert len(resumed["losses"]) == trained and resumed["losses"] == reference["losses"][-trained:], what


# (save every K batches, killed after batch N, the steps then committed, batches the rerun trains).
# 12 batches an epoch, gradient accumulation over 2: step 21 is inside epoch 1 (after its 9th batch) and
# inside an accumulation cycle; step 24 is epoch 1's end.
CASES = {
    "inside-an-epoch-and-an-accumulation-cycle": (7, 23, [14, 21], 15),
    "at-an-epochs-end": (12, 26, [12, 24], 12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loop_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_one(case: str, tmp_path: Path) -> None:
    every, kill_at, steps, trained = CASES[case]
    root = str(tmp_path / "run")
    run_worker(root, str(tmp_path / "killed.pt"), "--save-every", str(every), "--kill-at", str(kill_at), expect_rc=-9)
    store = ckptstore.CheckpointStore(root)
    assert_kept_after_kill(store.steps(), steps)  # max_to_keep=2
    saved = store.restore(steps[-1], keys=["accelerator", "dataloaders", "gradients"])
    # The epoch the next batch belongs to (a save after an epoch's last batch counts that epoch as done),
    # and the gradients of an accumulation cycle in progress.
    assert saved["dataloaders"][0]["iteration"] == steps[-1] // 12
    assert saved["accelerator"]["step"] == steps[-1] % 12  # batches into the epoch (reset at its end)
    assert bool(saved["gradients"][0]) == bool(steps[-1] % 2)

    out, ref = tmp_path / "resumed.pt", tmp_path / "reference.pt"
    run_worker(root, str(out), "--save-every", str(every), "--reference", str(ref))  # the same script, rerun
    reference = torch.load(ref, weights_only=True)
    assert_same_end(torch.load(out, weights_only=True), reference, trained, case)

    if case == "at-an-epochs-end":  # Accelerate's own checkpoints are exact here too: the same end
        native = str(tmp_path / "native")
        run_worker(native, str(tmp_path / "x.pt"), "--native", "--save-every", "12", "--kill-at", "26", expect_rc=-9)
        assert sorted(os.listdir(native)) == ["checkpoint-12", "checkpoint-24"]
        run_worker(native, str(tmp_path / "native.pt"), "--native", "--save-every", "12")
        assert_same_end(torch.load(tmp_path / "native.pt", weights_only=True), reference, trained, "native")


# --- in this process --------------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = int(state["n"])


def prepared(seed: int = 0, **config: Any) -> tuple[Any, ...]:
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.utils.data.TensorDataset(torch.arange(40.0).reshape(20, 2) @ torch.ones(2, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return (accelerator, *accelerator.prepare(model, optimizer, loader), counter)


def step_once(model: Any, optimizer: Any, x: Any, accelerator: Any) -> None:
    accelerator.backward(model(x).square().mean())
    optimizer.step()
    optimizer.zero_grad()


def test_save_and_load_state_round_trip_in_place(tmp_path: Path) -> None:
    accelerator, model, optimizer, loader, counter = prepared()
    for (x,) in loader:
        step_once(model, optimizer, x, accelerator)
    counter.n = 7
    info = save_state(accelerator, tmp_path / "run", 5, metadata={"loss": 0.5})
    assert info.step == 5 and info.metadata == {"loss": 0.5}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {i: s["momentum_buffer"].clone() for i, s in optimizer.state_dict()["state"].items()}

    accelerator2, model2, optimizer2, _, counter2 = prepared(seed=1)
    assert load_state(accelerator2, tmp_path / "run") == 5
    assert_same_tensors(model2.state_dict(), expected, "model")
    assert {i: s["momentum_buffer"] for i, s in optimizer2.state_dict()["state"].items()}.keys() == momentum.keys()
    for i, buffer in optimizer2.state_dict()["state"].items():
        assert torch.equal(buffer["momentum_buffer"], momentum[i])
    assert counter2.n == 7


def test_load_state_from_an_empty_store_changes_nothing(tmp_path: Path) -> None:
    accelerator, model, *_ = prepared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_state(accelerator, tmp_path / "empty") is None
    assert_same_tensors(model.state_dict(), before, "untouched")


def test_background_save_needs_a_store(tmp_path: Path) -> None:
    accelerator, *_ = prepared()
    store = ckptstore.CheckpointStore(tmp_path / "run")
    handle = save_state(accelerator, store, 3, blocking=False)
    assert handle.result().step == 3 and store.steps() == [3]
    with pytest.raises(ConfigError, match="needs a CheckpointStore"):
        save_state(accelerator, tmp_path / "other", 3, blocking=False)


def test_other_objects_than_saved_raise(tmp_path: Path) -> None:
    accelerator, *_ = prepared()
    save_state(accelerator, tmp_path / "run", 1)
    other, *_ = prepared()
    other.prepare(torch.nn.Linear(2, 2))  # one model more than the checkpoint holds
    with pytest.raises(StructureMismatchError):
        load_state(other, tmp_path / "run")


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_a_stateful_dataloader_continues_in_the_saved_order(tmp_path: Path) -> None:
    # The rerun seeds torch differently: the seedable sampler's seed comes from the checkpoint.
    config = {"use_stateful_dataloader": True, "use_seedable_sampler": True}
    accelerator, _, _, loader, _ = prepared(seed=0, **config)
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    save_state(accelerator, tmp_path / "run", 2)
    rest = [x.tolist() for (x,) in batches]
    accelerator2, _, _, loader2, _ = prepared(seed=1, **config)
    load_state(accelerator2, tmp_path / "run")
    assert [x.tolist() for (x,) in loader2] == rest and len(rest) == 3


def test_skip_first_batches_arguments(tmp_path: Path) -> None:
    accelerator, _, _, loader, _ = prepared(use_seedable_sampler=True)
    assert skip_first_batches(accelerator, loader, 0) is loader
    skipped = skip_first_batches(accelerator, loader, 2)
    assert len(skipped) == 3 and len(list(skipped)) == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="num_batches"):
            skip_first_batches(accelerator, loader, bad)  # type: ignore[arg-type]


def test_an_accelerator_without_the_registries_raises_naming_the_version(tmp_path: Path) -> None:
    accelerator, *_ = prepared()
    del accelerator._custom_objects  # as an accelerate version that renamed it would have it
    with pytest.raises(ConfigError, match=r"accelerate \S+ .*'_custom_objects'"):
        save_state(accelerator, tmp_path / "run", 1)


def test_import_ckptstore_imports_no_accelerate() -> None:
    code = "import sys, ckptstore; print(sorted(m for m in sys.modules if m.split('.')[0] == 'accelerate'))"
    out = run_python(code)
    assert out.strip() == "[]"


def test_the_docs_accelerate_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Accelerate")
    assert ckptstore.CheckpointStore(tmp_path / "ckpts" / "accelerate-run").steps() == [15, 20]
