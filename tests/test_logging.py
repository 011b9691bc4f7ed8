"""logging.getLogger("ckptstore") records each save, restore, fallback and retention deletion; a save's
CheckpointInfo carries its per-phase timings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import ckptstore
from ckptstore.errors import CorruptCheckpointWarning
from ckptstore.storage import step_name


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("ckptstore") and r.levelno >= level]


@pytest.mark.background_retention
def test_saves_restores_fallbacks_and_deletions_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckptstore")
    store = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=2)
    for s in (1, 2, 3):
        store.save(s, {"w": np.zeros(1000, np.float32)})
    store.wait_until_finished()
    logged = messages(caplog)
    assert any(m.startswith("saved step 3 to ") and " bytes in " in m and "GB/s" in m for m in logged), logged
    assert any("retention deleted step 1 of" in m for m in logged), logged
    caplog.clear()
    store.restore()
    assert any(m.startswith("restored step 3 from ") and "4000 bytes" in m for m in messages(caplog))
    (tmp_path / "run" / step_name(3) / "manifest.msgpack").write_bytes(b"junk")
    caplog.clear()
    with pytest.warns(CorruptCheckpointWarning):
        store.restore(fallback=True)
    assert any("skipped step 3" in m for m in messages(caplog, logging.WARNING))
    assert any(m.startswith("restored step 2 ") for m in messages(caplog))


def test_a_save_reports_its_phases(tmp_path: Path) -> None:
    info = ckptstore.CheckpointStore(tmp_path / "run").save(1, {"w": np.ones((256, 256))})
    assert set(info.timings) == {"retention_wait", "prepare", "plan", "write", "commit", "retention", "total"}
    assert all(v >= 0 for v in info.timings.values())
    phases = sum(v for k, v in info.timings.items() if k != "total")
    assert phases <= info.timings["total"] + 1e-6


def test_nothing_is_logged_at_info_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ckptstore")
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(1, {"w": np.ones(3)})
    store.restore()
    assert messages(caplog) == []
