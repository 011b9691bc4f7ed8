"""Leases: a checkpoint yielded to (or pinned by) a reader survives the trainer's retention until released or
expired. The protocol's two orders, retention honouring pins, expiry after a reader is SIGKILLed, and the
real race: a trainer process saving with max_to_keep=1 while an evaluator process restores what it is given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs, leases, retention
from ckptstore.errors import CheckpointNotFoundError
from ckptstore.storage import step_name
from tests.conftest import Location

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fast_polling() -> Iterator[None]:
    with knobs.override(poll_interval_s=0.02):
        yield


def state(step: int, done: bool = False) -> dict[str, Any]:
    return {"w": np.full(256, step, np.int64), "step": step, "done": done}


def lease_files(store: ckptstore.CheckpointStore) -> list[str]:
    return leases.LeaseDir(store.storage).names()


# --- retention honours pins ---------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_retention_keeps_a_pinned_checkpoint_until_released(location: Location) -> None:
    trainer = location.store(max_to_keep=1)
    reader = location.store()
    trainer.save(1, state(1))
    with reader.pin(1) as lease:
        assert lease.step == 1 and lease.path == reader.info(1).path
        trainer.save(2, state(2))
        trainer.save(3, state(3))
        assert trainer.steps() == [1, 3]
        assert reader.restore(1)["step"] == 1
    assert lease_files(trainer) == []
    trainer.save(4, state(4))
    assert trainer.steps() == [4]


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_the_iterator_pins_what_it_yielded_until_the_next(location: Location) -> None:
    trainer = location.store(max_to_keep=1)
    url, opts = location
    trainer.save(1, state(1))
    it = ckptstore.checkpoints_iterator(url, timeout=1, storage_options=opts or None)
    first = next(it)
    trainer.save(2, state(2))
    trainer.save(3, state(3))  # step 1 would be gone by now without the pin
    assert ckptstore.restore(first, storage_options=opts or None)["step"] == 1
    assert next(it) == trainer.info(3).path  # step 1 released, step 3 pinned
    trainer.save(4, state(4))
    assert trainer.steps() == [3, 4]
    it.close()  # closing the iterator releases its lease
    assert lease_files(trainer) == []
    trainer.save(5, state(5))
    assert trainer.steps() == [5]


def test_without_a_pin_retention_deletes_under_the_reader(tmp_path: Path) -> None:
    """The control for the test above: the pin is what keeps the checkpoint."""
    trainer = ckptstore.CheckpointStore(tmp_path, max_to_keep=1)
    trainer.save(1, state(1))
    it = ckptstore.checkpoints_iterator(tmp_path, timeout=1, pin=False)
    first = next(it)
    trainer.save(2, state(2))
    trainer.wait_until_finished()  # its retention pass, in the background
    with pytest.raises(CheckpointNotFoundError, match="step_00000001"):
        ckptstore.restore(first)
    it.close()


def test_store_iter_new_pins_too(tmp_path: Path) -> None:
    trainer = ckptstore.CheckpointStore(tmp_path, max_to_keep=1)
    trainer.save(1, state(1))
    for info in ckptstore.CheckpointStore(tmp_path).iter_new(timeout=0.1):
        if info.step == 1:
            trainer.save(2, state(2))
            assert ckptstore.restore(info.path)["step"] == 1
    trainer.save(3, state(3))
    assert trainer.steps() == [3]


# --- the protocol: whoever writes first wins, the other backs off ---------------------------------------


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_a_reader_that_pinned_first_makes_retention_back_off(location: Location) -> None:
    store = location.store()
    store.save(1, state(1))
    lease = leases.acquire(store.storage, step_name(1))
    assert lease is not None
    # Retention that chose step 1 before the lease existed (its `pinned` listing was older) still keeps it.
    assert retention.delete_unpinned(store.storage, [1]) == []
    assert store.steps() == [1]
    assert [n for n in lease_files(store) if n.endswith(".deleting")] == []  # its mark is withdrawn
    lease.release()
    assert retention.delete_unpinned(store.storage, [1]) == [1]
    assert store.steps() == []


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_a_checkpoint_marked_for_deletion_is_not_pinned_nor_yielded(location: Location) -> None:
    store = location.store()
    store.save(1, state(1))
    store.save(2, state(2))
    store.wait_until_finished()  # its clean-up pass (in the background) would sweep the mark planted below
    files = leases.LeaseDir(store.storage)
    files.put(f"{step_name(1)}.abc.deleting")  # retention got there first and is deleting step 1
    assert leases.acquire(store.storage, step_name(1)) is None
    with pytest.raises(CheckpointNotFoundError, match="being deleted"):
        store.pin(1)
    url, opts = location
    got = list(ckptstore.checkpoints_iterator(url, timeout=0.1, storage_options=opts or None, every_checkpoint=True))
    assert got == [store.info(2).path]
    assert files.names() == [f"{step_name(1)}.abc.deleting"]  # the failed pins left no lease behind
    # The next deleter (the only one there is) clears a mark that a crashed deleter left.
    store.save(3, state(3))
    store.wait_until_finished()  # (delete_unpinned assumes it is the only deleter)
    assert retention.delete_unpinned(store.storage, [3]) == [3]
    assert files.names() == []


def test_pinning_a_deleted_checkpoint_is_a_named_error(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    path = store.info(1).path
    store.delete(1)
    with pytest.raises(CheckpointNotFoundError, match="step_00000001"):
        ckptstore.pin(path)
    with pytest.raises(CheckpointNotFoundError):
        store.pin(1)
    assert lease_files(store) == []


def test_renewal_replaces_the_lease_file(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    with store.pin(1, ttl=600) as lease:
        before = lease_files(store)
        lease.renew()
        after = lease_files(store)
        assert len(before) == len(after) == 1 and before != after
        assert leases.pinned_steps(store.storage) == {1}
    assert lease_files(store) == [] and leases.pinned_steps(store.storage) == set()


# --- processes: expiry after SIGKILL, and the trainer/evaluator race -----------------------------------


def _spawn(fn: str, *args: Any) -> subprocess.Popen[str]:
    """Run ``fn(*args)`` of this module in a new Python process (repo root on the path)."""
    code = f"import sys, json; from tests.test_leases import {fn}; {fn}(*json.loads(sys.argv[1]))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], cwd=REPO, stdout=subprocess.PIPE, text=True)


def _opts(loc: Location) -> dict[str, Any] | None:
    return dict(loc.storage_options) or None


def hold_pin(url: str, opts: dict[str, Any] | None, step: int, ttl: float) -> None:
    """Child: pin ``step`` and hold it until killed."""
    ckptstore.CheckpointStore(url, storage_options=opts).pin(step, ttl=ttl)
    print("pinned", flush=True)
    time.sleep(3600)


@pytest.mark.parametrize("location", ["local", "s3"], indirect=True)
def test_a_dead_readers_lease_expires(location: Location) -> None:
    ttl = 2.5
    trainer = location.store(max_to_keep=1)
    trainer.save(1, state(1))
    reader = _spawn("hold_pin", location.url, _opts(location), 1, ttl)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "pinned"
        time.sleep(ttl * 1.2)  # longer than the lease lives unless renewed: the live reader renews it
        trainer.save(2, state(2))
        assert trainer.steps() == [1, 2]
        os.kill(reader.pid, signal.SIGKILL)  # dies holding the lease: no release
        reader.wait()
        trainer.save(3, state(3))
        assert trainer.steps() == [1, 3]  # not expired yet
        time.sleep(ttl + 0.2)
        with knobs.override(lease_ttl_s=0):  # no grace: the expired lease file is cleaned up at once
            trainer.save(4, state(4))
            trainer.wait_until_finished()  # its retention pass, in the background, under the override
        assert trainer.steps() == [4]
        assert lease_files(trainer) == []
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def race_trainer(url: str, opts: dict[str, Any] | None, n: int, pause: float) -> None:
    """Child: save steps 0..n-1 as fast as it can with max_to_keep=1; the last says done."""
    store = ckptstore.CheckpointStore(url, max_to_keep=1, storage_options=opts)
    for s in range(n):
        store.save(s, state(s, done=s == n - 1))
        time.sleep(pause)
    print(json.dumps(store.steps()), flush=True)


def race_evaluator(url: str, opts: dict[str, Any] | None, work: float) -> None:
    """Child: restore every checkpoint yielded, after some work that lets the trainer move on; report."""
    knobs.current.poll_interval_s = 0.01
    done = [False]
    restored, failures = [], []
    print("ready", flush=True)
    for path in ckptstore.checkpoints_iterator(url, timeout=1, timeout_fn=lambda: done[0], storage_options=opts):
        time.sleep(work)  # meanwhile the trainer commits newer steps and wants this one deleted
        try:
            st = ckptstore.restore(path, storage_options=opts)
            assert (st["w"] == st["step"]).all(), path
            restored.append(st["step"])
            done[0] = st["done"]
        except Exception as e:
            failures.append(f"{path}: {e!r}")
    print(json.dumps({"restored": restored, "failures": failures}), flush=True)


@pytest.mark.parametrize(
    ("location", "n", "pause", "work"), [("local", 60, 0.01, 0.05), ("s3", 15, 0.0, 0.1)], indirect=["location"]
)
def test_trainer_deleting_rapidly_never_breaks_an_evaluators_restore(
    location: Location, n: int, pause: float, work: float
) -> None:
    evaluator = _spawn("race_evaluator", location.url, _opts(location), work)
    assert evaluator.stdout is not None and evaluator.stdout.readline().strip() == "ready"
    trainer = _spawn("race_trainer", location.url, _opts(location), n, pause)
    out, _ = trainer.communicate(timeout=120)
    assert trainer.returncode == 0
    left = json.loads(out)
    report_line, _ = evaluator.communicate(timeout=120)
    assert evaluator.returncode == 0
    report = json.loads(report_line.strip().splitlines()[-1])
    assert report["failures"] == []
    restored = report["restored"]
    assert restored[-1] == n - 1  # the final checkpoint, and the evaluator stopped by itself
    assert len(restored) >= 3 and restored == sorted(restored)
    # Retention did run: at most the newest and one pinned step were left when the trainer finished.
    assert len(left) <= 2 and left[-1] == n - 1
