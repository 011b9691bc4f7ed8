"""Several processes on one store at once, on local disk and on S3 (moto over HTTP):

* two writers saving different steps, each applying retention: nothing lost, nothing partial;
* two writers racing for the same step: exactly one wins, the other gets CheckpointExistsError, and the
  checkpoint is wholly the winner's;
* a writer with retention, an evaluator that pins what it reads, a watcher, and an evaluator that does not
  pin, all together for a few seconds: no checkpoint is mixed up (each one's bytes encode its step), a
  pinned checkpoint is never deleted under its reader, and an unpinned reader whose checkpoint is deleted
  under it gets a named error, never wrong bytes.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CheckpointExistsError, CkptStoreError
from tests.conftest import Location
from tests.faults import barrier, check_state, check_store, drain, pipe, spawn, state_of

#: Store locations several processes can reach (memory:// lives inside one process).
SHARED = pytest.mark.parametrize("location", ["local", "s3"], indirect=True)


def _store(loc: tuple[str, dict[str, Any]], **kw: Any) -> ckptstore.CheckpointStore:
    url, opts = loc
    return ckptstore.CheckpointStore(url, storage_options=opts or None, **kw)


def saver(loc: tuple[str, dict[str, Any]], steps: list[int], keep: int | None, tag: str, out: Any) -> None:
    store = _store(loc, max_to_keep=keep)
    for s in steps:
        store.save(s, state_of(s), metadata={"writer": tag})
    out.send(tag)


@SHARED
def test_two_writers_different_steps(location: Location) -> None:
    reader, sender = pipe()
    n = 12 if "://" in location.url else 40
    procs = [
        spawn(saver, tuple(location), list(range(parity, 2 * n, 2)), 4, tag, sender)
        for parity, tag in ((0, "even"), (1, "odd"))
    ]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(drain(reader)) == ["even", "odd"]
    store = location.store(max_to_keep=4)
    steps = check_store(store)
    assert 2 <= len(steps) <= 4 and max(steps) >= 2 * n - 2, steps  # retention ran; the newest are there
    with knobs.override(stale_after_s=0):
        store.save(1000, state_of(1000))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert check_store(store) == [*steps, 1000][-4:]


def racer(loc: tuple[str, dict[str, Any]], steps: list[int], tag: str, start: Any, out: Any) -> None:
    store = _store(loc)
    for s in steps:
        start.wait(30)
        try:
            store.save(s, state_of(s), metadata={"writer": tag})
            out.send((s, tag, "won"))
        except CheckpointExistsError:
            out.send((s, tag, "lost"))


@SHARED
def test_two_writers_same_step_exactly_one_wins(location: Location, record_property) -> None:
    steps = list(range(1, 9 if "://" in location.url else 25))
    reader, sender = pipe()
    start = barrier(2)
    procs = [spawn(racer, tuple(location), steps, tag, start, sender) for tag in ("A", "B")]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = drain(reader)
    store = location.store()
    assert check_store(store) == steps
    for s in steps:
        outcomes = sorted((r[2], r[1]) for r in results if r[0] == s)
        assert [o[0] for o in outcomes] == ["lost", "won"], (s, outcomes)
        assert store.info(s).metadata["writer"] == outcomes[1][1]  # the checkpoint is the winner's
    record_property("same_step_races", len(steps))


def trainer(loc: tuple[str, dict[str, Any]], seconds: float, out: Any) -> None:
    store = _store(loc, max_to_keep=2)
    end, step = time.time() + seconds, 1
    while time.time() < end:
        store.save(step, state_of(step))
        step += 1
    out.send(("trainer", {"saved": step - 1}))


def evaluator(loc: tuple[str, dict[str, Any]], seconds: float, mode: str, out: Any) -> None:
    """Restore in a loop; count outcomes. mode: "pinned" (pin, restore, wait, restore again), "watch"
    (the watcher, which pins what it yields) or "unpinned" (restore the latest)."""
    store = _store(loc)
    counts: Counter[str] = Counter()
    end = time.time() + seconds

    def read(step: int, again: bool) -> None:
        check_state(step, store.restore(step))
        if again:
            time.sleep(0.05)  # the trainer saves and applies retention meanwhile
            check_state(step, store.restore(step))
        counts["ok"] += 1

    while time.time() < end:
        try:
            if mode == "watch":
                for info in store.iter_new(timeout=0.5, timeout_fn=lambda: time.time() > end):
                    try:
                        read(info.step, again=True)
                    except CkptStoreError as e:
                        counts[f"lost under pin: {type(e).__name__}: {e}"] += 1
                continue
            if mode == "pinned":
                try:
                    lease = store.pin()
                except CkptStoreError:
                    counts["pin refused (being deleted)"] += 1
                    continue
                with lease:
                    try:
                        read(lease.step, again=True)  # type: ignore[arg-type]
                    except CkptStoreError as e:
                        counts[f"lost under pin: {type(e).__name__}: {e}"] += 1
                continue
            step = store.latest_step()
            if step is not None:
                read(step, again=False)
        except CkptStoreError as e:
            counts[f"named error: {type(e).__name__}"] += 1
        except AssertionError as e:
            counts[f"WRONG BYTES: {e}"] += 1
        except Exception as e:
            counts[f"UNNAMED: {type(e).__name__}: {e}"] += 1
    out.send((mode, dict(counts)))


@SHARED
def test_writer_retention_and_readers_together(location: Location, record_property) -> None:
    seconds = 4.0
    reader, sender = pipe()
    loc = tuple(location)
    store = location.store(max_to_keep=2)
    store.save(0, state_of(0))
    procs = [spawn(trainer, loc, seconds, sender)]
    procs += [spawn(evaluator, loc, seconds, mode, sender) for mode in ("pinned", "watch", "unpinned")]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = dict(drain(reader))
    record_property("concurrent_outcomes", got)
    assert got["trainer"]["saved"] >= 3, got
    for mode in ("pinned", "watch", "unpinned"):
        counts = got[mode]
        assert counts.get("ok", 0) >= 1, (mode, counts)
        bad = [k for k in counts if k.startswith(("WRONG", "UNNAMED", "lost under pin"))]
        assert not bad, (mode, counts)
    with knobs.override(stale_after_s=0):
        store.save(10**6, state_of(10**6))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert check_store(store)[-1] == 10**6


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_reader_whose_checkpoint_is_deleted_under_it_gets_a_named_error(location: Location) -> None:
    """Without a pin, retention may delete what a reader has started on: the reader holds the manifest,
    the data goes; it must get a CkptStoreError naming the file, never bytes of something else."""
    from ckptstore import load
    from ckptstore.storage import step_name

    store = location.store()
    for s in (1, 2):
        store.save(s, state_of(s))
    m = load.read_manifest(store.storage, step_name(1))
    store.delete(1)
    with pytest.raises(CkptStoreError, match="step_00000001"):
        load.read(store.storage, step_name(1), m=m, verify=True)
    store.save(1, state_of(1))  # the step reused by a new checkpoint: its own manifest, its own files
    with pytest.raises(CkptStoreError, match="tensors-"):
        load.read(store.storage, step_name(1), m=m, verify=False)
    check_state(1, store.restore(1))
