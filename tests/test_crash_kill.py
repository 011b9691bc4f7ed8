"""A writer killed with SIGKILL at random moments, during saves and during the retention deletes inside them,
many times: after each kill every listed step restores and verifies, none is partial, the last save that
returned is there, and the next writer saves and removes every leftover (temp, trash, half-deleted step).
Local disk (50+ kills) and S3 on moto (fewer: each save is several HTTP calls)."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ckptstore
from ckptstore import knobs
from ckptstore.storage import parse_step
from tests.conftest import Location
from tests.faults import FaultyOps, check_state, check_store, drain, leftovers, pipe, spawn, state_of


def writer(url: str, opts: dict[str, Any], first: int, out: Any) -> None:
    """Save steps first, first+1, ... forever (max_to_keep=2), reporting each step whose save returned."""
    store = ckptstore.CheckpointStore(url, storage_options=opts or None, max_to_keep=2)
    out.send(-1)  # ready
    step = first
    while True:
        store.save(step, state_of(step))
        out.send(step)
        step += 1


def phase_of(names: list[str], last_returned: int) -> str:
    """Where the kill landed, read from what it left: a temp directory, or data of a step newer than the
    last save that returned (a save); a trash directory, or an older step without its manifest (a delete)."""
    for n in names:
        step = parse_step(n)
        if n.startswith(".tmp-") or (step is not None and step > last_returned):
            return "save"
    return "delete" if names else "between"


def kill_loop(
    location: Location,
    kills: int,
    max_delay: float,
    next_writer: Callable[[], ckptstore.CheckpointStore],
    left: Callable[[], list[str]],
    want_phases: int,
) -> Counter[str]:
    rng = random.Random(1234)
    phases: Counter[str] = Counter()
    first = 1
    n = 0
    while n < kills or min(phases["save"], phases["delete"]) < want_phases:
        assert n < kills * 6, f"kills never landed in every phase: {dict(phases)}"
        reader, sender = pipe()
        proc = spawn(writer, location.url, location.storage_options, first, sender)
        assert reader.poll(60) and reader.recv() == -1
        time.sleep(rng.uniform(0, max_delay))
        proc.kill()  # SIGKILL
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        returned = [s for s in drain(reader) if s >= 0]
        n += 1
        phases[phase_of(left(), returned[-1] if returned else first - 1)] += 1
        # The next writer: every listed step whole; the last save that returned among them.
        store = next_writer()
        steps = check_store(store, must_have=returned[-1:])
        first = (steps[-1] if steps else first) + 1
        store.save(first, state_of(first))
        store.wait_until_finished()  # its retention pass (in the background) leaves no trash behind either
        assert not left(), f"kill {n}: leftovers after the next save: {left()}"
        check_state(first, store.restore())
        first += 1
    return phases


def test_sigkill_during_saves_and_deletes_local(local_url: Location, record_property) -> None:
    def next_writer() -> ckptstore.CheckpointStore:
        # It need not sync (speed); what it must do is see and clean up.
        return ckptstore.CheckpointStore(
            ckptstore.storage.LocalStorage(local_url.url, ops=FaultyOps(sync=False)), max_to_keep=2
        )

    phases = kill_loop(local_url, 50, 0.05, next_writer, lambda: leftovers(local_url.url), want_phases=3)
    record_property("sigkills_local", sum(phases.values()))
    record_property("sigkill_phases_local", dict(phases))
    assert sum(phases.values()) >= 50


def test_sigkill_during_saves_and_deletes_s3(s3_url: Location, record_property) -> None:
    from tests.test_faults import uncommitted

    def next_writer() -> ckptstore.CheckpointStore:
        return s3_url.store(max_to_keep=2)

    def left() -> list[str]:
        return uncommitted(s3_url.store().storage)

    with knobs.override(stale_after_s=0):  # only dead writers' objects are about: no grace needed
        phases = kill_loop(s3_url, 6, 1.0, next_writer, left, want_phases=0)
    record_property("sigkills_s3", sum(phases.values()))
    record_property("sigkill_phases_s3", dict(phases))
    assert sum(phases.values()) >= 6
