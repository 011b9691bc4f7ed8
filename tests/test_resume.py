"""store.resume(like): the latest intact checkpoint restored into `like` with its step, or `like` untouched
and None when nothing is committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import CorruptCheckpointError, CorruptCheckpointWarning, PartialRestoreWarning
from ckptstore.storage import step_name


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_nothing_committed_gives_like_back_untouched(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    like = {"model": m, "step": 0}
    state, step = store.resume(like)
    assert step is None and state is like
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not (tmp_path / "run").exists()  # a reader creates nothing


def test_resume_restores_the_latest_in_place_with_its_step(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=2)
    m = model()
    for s in (1, 2, 3):
        with torch.no_grad():
            m.weight.fill_(s)
        store.save(s, {"model": m, "step": s, "w": np.full(2, s)})
    fresh = torch.nn.Linear(3, 2)
    state, step = ckptstore.CheckpointStore(tmp_path / "run").resume({"model": fresh, "step": 0, "w": np.zeros(2)})
    assert step == 3 and state["step"] == 3 and state["model"] is fresh
    assert torch.equal(fresh.weight, torch.full((2, 3), 3.0))
    np.testing.assert_array_equal(state["w"], np.full(2, 3))


def test_a_damaged_latest_is_skipped_and_all_damaged_is_an_error(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    for s in (1, 2):
        store.save(s, {"w": np.full(4, s)})
    (tmp_path / "run" / step_name(2) / "manifest.msgpack").write_bytes(b"junk")
    with pytest.warns(CorruptCheckpointWarning, match="step 2"):
        state, step = store.resume({"w": np.zeros(4)})
    assert step == 1 and state["w"].tolist() == [1, 1, 1, 1]
    (tmp_path / "run" / step_name(1) / "manifest.msgpack").write_bytes(b"junk")
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        store.resume({"w": np.zeros(4)})  # checkpoints exist: never a silent start from scratch


def test_resume_passes_strict_and_key_map(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(5, {"w": np.ones(2), "old": 1})
    with pytest.warns(PartialRestoreWarning) as caught:
        state, step = store.resume({"w": np.zeros(2), "sched": {"last_epoch": 0}}, strict=False)
    assert step == 5 and state["w"].tolist() == [1.0, 1.0] and state["sched"] == {"last_epoch": 0}
    assert "old" not in state and caught[0].message.unexpected == ["state['old']"]  # type: ignore[union-attr]
    state, _ = store.resume({"weights": np.zeros(2), "old": 0}, key_map={"w": "weights"})
    assert state["weights"].tolist() == [1.0, 1.0]
