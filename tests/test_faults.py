"""A failure at the k-th filesystem call of a save (and of the retention pass inside it), for every k, on
local disk, memory:// and S3 (moto over HTTP): ENOSPC once, a disk that stays full, and a call that takes
effect but reports failure (a lost response). Each time: the save raises a named StorageError (errno kept)
or, where the failed call was a best-effort clean-up, succeeds; nothing partial is committed; earlier
checkpoints are intact; temp data is gone at once, or after the next writer."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from typing import Any

import fsspec
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import StorageError
from ckptstore.storage import FsspecStorage, LocalStorage, Storage, parse_step
from tests.conftest import Location
from tests.faults import FaultPlan, FaultyFS, FaultyOps, check_state, check_store, eio, enospc, state_of

MODES = {
    "enospc": dict(error=enospc),
    "enospc-sticky": dict(error=enospc, sticky=True),
    "eio-after": dict(error=eio, after=True),
}
Make = Callable[[str, FaultPlan], Storage]


# S3 runs the same protocol code as memory:// (plus its own uploads and retries), over HTTP and slower:
# there, the failure S3 is known for (a call that took effect, its response lost) at every call.
CASES = [(b, m) for b in ("local", "memory") for m in MODES] + [("s3", "eio-after")]


def faulty(location: Location) -> Make:
    """``make(sub, plan)``: a fresh store location ``sub`` under ``location``, whose calls go through ``plan``."""
    if location.kind == "local":
        return lambda sub, plan: LocalStorage(location.join(sub), ops=FaultyOps(plan, sync=False))

    def make(sub: str, plan: FaultPlan) -> Storage:
        fs, root = fsspec.core.url_to_fs(location.join(sub), **location.storage_options)
        return FsspecStorage(FaultyFS(fs, plan), root)  # type: ignore[arg-type]

    return make


def uncommitted(storage: Storage) -> list[str]:
    """What a failed writer may leave: temp/trash directories (local), step data without a manifest."""
    if isinstance(storage, LocalStorage):
        from tests.faults import leftovers

        return leftovers(storage.root)
    assert isinstance(storage, FsspecStorage)
    by_step: dict[str, set[str]] = {}
    for rel in storage._find():
        parent, _, name = rel.partition("/")
        if parse_step(parent) is not None:
            by_step.setdefault(parent, set()).add(name)
    return sorted(p for p, names in by_step.items() if "manifest.msgpack" not in names)


def one_fault(make: Make, sub: str, k: int, mode: dict[str, Any]) -> FaultPlan | None:
    """Steps 1, 2 saved; save 3 (max_to_keep=2, so retention deletes 1) with call k failing. Check
    everything; return the plan, or None when the save made fewer than k calls."""
    plan = FaultPlan()
    store = ckptstore.CheckpointStore(make(sub, plan), max_to_keep=2)
    for s in (1, 2):
        store.save(s, state_of(s))
    store.wait_until_finished()  # no retention pass of these in flight while the calls are counted
    plan.count, plan.log, plan.fail_at = 0, [], k
    for key, value in mode.items():
        setattr(plan, key, value)
    error: BaseException | None = None
    try:
        store.save(3, state_of(3))
    except StorageError as e:
        error = e
    store.wait_until_finished()  # the retention pass after the commit, in the background (its failure is logged)
    if not plan.fired:
        assert error is None
        return None
    plan.heal()
    where = f"call {k} ({plan.log[k - 1][0]} {plan.log[k - 1][1]})"
    steps = store.steps()
    if error is not None:
        assert error.errno in (errno.ENOSPC, errno.EIO, None), f"{where}: {error!r}"
        assert "step_0000000" in str(error) or "step 3" in str(error), f"{where}: {error}"
        committed = "step 3 is committed" in str(error) or "is committed all the same" in str(error)
        assert (3 in steps) == committed, f"{where}: {error}; steps {steps}"
    else:
        assert 3 in steps, f"{where}: the save returned but step 3 is not committed"
    check_store(store, must_have={2, 3} if 3 in steps else {1, 2})
    if not mode.get("sticky") and 3 not in steps:  # a failed save cleans up after itself at once
        assert not uncommitted(store.storage), f"{where}: {uncommitted(store.storage)}"
    # The next writer (its grace period shortened: no other writer is alive) removes what is left.
    with knobs.override(stale_after_s=0):
        store.save(4, state_of(4))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert not uncommitted(store.storage), f"{where}: {uncommitted(store.storage)} left after the next save"
    assert check_store(store) == [3, 4] if 3 in steps else [2, 4]
    check_state(4, store.restore())
    return plan


@pytest.mark.parametrize(("location", "mode"), CASES, indirect=["location"])
def test_fault_at_every_call_of_a_save_and_its_retention(
    location: Location, mode: str, record_property: Callable[[str, object], None]
) -> None:
    make = faulty(location)
    injected, kinds = 0, set()
    for k in itertools.count(1):
        plan = one_fault(make, f"{mode}-{k}", k, MODES[mode])
        if plan is None:
            break
        injected += plan.fired
        kinds.add(plan.log[k - 1][0])
    record_property("faults_injected", injected)
    # Every kind of call was failed at least once: data writes, syncs or uploads, renames, deletions.
    expected = {
        "local": {"mkdir", "create", "write", "fsync", "fsync_dir", "rename", "unlink", "rmdir"},
        "memory": {"open", "write", "put", "delete"},
        "s3": {"put", "delete"},  # s3fs: each upload is a PUT (or multipart calls), each delete a call
    }
    assert kinds >= expected[location.kind], kinds
    assert k > 5
