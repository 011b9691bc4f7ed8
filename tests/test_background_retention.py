"""Retention off the save's critical path: the pass after a commit runs on a thread of its own; the save
returns before its deletions; the next save, close(), wait_until_finished() and the store's own listings
wait for it; an interpreter that exits after a save finishes them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

import ckptstore
from ckptstore.storage import TRASH_PREFIX, LocalOps, LocalStorage


class HeldDeletes(LocalOps):
    """Deletions (a step renamed to the trash) wait until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def rename(self, src: str, dst: str) -> None:
        if os.path.basename(dst).startswith(TRASH_PREFIX):
            self.started.set()
            assert self.release.wait(30)
        super().rename(src, dst)


def state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full(1000, step)}


def test_a_save_returns_before_its_deletions_and_the_next_save_waits_for_them(tmp_path: Path) -> None:
    ops = HeldDeletes()
    store = ckptstore.CheckpointStore(LocalStorage(tmp_path / "run", ops=ops), max_to_keep=1)
    ops.release.set()
    store.save(1, state(1))
    store.wait_until_finished()
    ops.release.clear()
    store.save(2, state(2))  # returns while its retention pass waits to delete step 1
    assert ops.started.wait(30)
    other = ckptstore.CheckpointStore(tmp_path / "run")
    assert other.steps() == [1, 2]  # not deleted yet: the pass is held
    done = threading.Event()
    saver = threading.Thread(target=lambda: (store.save(3, state(3)), done.set()))
    saver.start()
    assert not done.wait(0.5)  # the next save waits for the pass in flight
    ops.release.set()
    saver.join(30)
    assert done.is_set()
    store.close()
    assert other.steps() == [3]


def test_close_and_the_stores_own_listing_wait_for_the_pass(tmp_path: Path) -> None:
    ops = HeldDeletes()
    store = ckptstore.CheckpointStore(LocalStorage(tmp_path / "run", ops=ops), max_to_keep=1)
    ops.release.set()
    store.save(1, state(1))
    ops.release.clear()
    ops.started.clear()
    store.save(2, state(2))
    assert ops.started.wait(30)
    threading.Timer(0.3, ops.release.set).start()
    assert store.steps() == [2]  # its own deletions are done before it lists
    store.save(3, state(3))
    store.close()
    assert ckptstore.CheckpointStore(tmp_path / "run").steps() == [3]


def test_an_interpreter_exiting_after_a_save_finishes_its_deletions(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np, ckptstore\n"
        "s = ckptstore.CheckpointStore(sys.argv[1], max_to_keep=1)\n"
        "for i in range(1, 4):\n"
        "    s.save(i, {'w': np.full(1 << 20, i)})\n"
    )
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, env=env, timeout=120)
    assert ckptstore.CheckpointStore(root).steps() == [3]
    assert not [n for n in os.listdir(root) if n.startswith(TRASH_PREFIX)]
