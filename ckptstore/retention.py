"""Retention, in one place: which committed checkpoints to keep (a pure policy), and how the others are
deleted (:class:`Retention`: leftovers of crashed writers cleaned, readers' pins honoured, each deletion
announced by a mark first, see :mod:`.leases`).

What survives is the union of the policies given (as in TensorFlow's CheckpointManager):

* ``max_to_keep=N``: the newest N checkpoints (None keeps all);
* ``keep_every_n_steps=K``: every step divisible by K, forever;
* ``keep_every_n_hours=H``: one checkpoint per H hours: walking from the oldest, a checkpoint is kept when
  it was created at least H hours after the last one kept this way (the oldest is kept). The choice is
  stable: applied again to the survivors it keeps the same ones.

Checkpoints that a reader has pinned are never deleted while the pin lasts.

:meth:`Retention.apply` runs after each committed save, under the store's lock: it removes what crashed
writers left, lists the committed steps, asks the policy, and deletes the unpinned rest (manifest first).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

from . import knobs, leases, load
from .errors import CkptStoreError
from .storage import Storage, new_token, step_name


@dataclasses.dataclass(frozen=True, slots=True)
class StepInfo:
    """What retention knows of a committed checkpoint."""

    step: int
    created: float  # seconds since the epoch


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """The retention options of a store; all None keeps everything."""

    max_to_keep: int | None = None
    keep_every_n_steps: int | None = None
    keep_every_n_hours: float | None = None

    def __post_init__(self) -> None:
        for name, kinds in (("max_to_keep", int), ("keep_every_n_steps", int), ("keep_every_n_hours", (int, float))):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
                what = "a positive int" if kinds is int else "a positive number"
                raise CkptStoreError(f"{name} must be {what} or None, got {value!r}")

    @property
    def keeps_all(self) -> bool:
        return self.max_to_keep is None

    def to_keep(self, infos: Sequence[StepInfo]) -> set[int]:
        """The steps this policy keeps among ``infos``."""
        ordered = sorted(infos, key=lambda i: i.step)
        if self.max_to_keep is None:
            return {i.step for i in ordered}
        keep = {i.step for i in ordered[-self.max_to_keep :]}
        if self.keep_every_n_steps is not None:
            keep.update(i.step for i in ordered if i.step % self.keep_every_n_steps == 0)
        if self.keep_every_n_hours is not None:
            spacing = self.keep_every_n_hours * 3600.0
            last: float | None = None
            for i in ordered:
                if last is None or i.created - last >= spacing:
                    keep.add(i.step)
                    last = i.created
        return keep

    def to_delete(self, infos: Sequence[StepInfo], pinned: Iterable[int] = ()) -> list[int]:
        """The steps to delete, oldest first: all that no policy keeps and no reader pins."""
        keep = self.to_keep(infos) | set(pinned)
        return sorted(i.step for i in infos if i.step not in keep)


class Retention:
    """A store's retention: its policy, applied to the store's storage after each save.

    Creation times (for ``keep_every_n_hours``) are read from manifests once and remembered.
    """

    def __init__(self, policy: RetentionPolicy) -> None:
        self.policy = policy
        self._created: dict[int, float] = {}

    def saved(self, step: int, created: float) -> None:
        """Note a checkpoint just committed (its creation time needs no manifest read)."""
        self._created[step] = created

    def forget(self, step: int) -> None:
        """Note a checkpoint deleted by other means (``CheckpointStore.delete``)."""
        self._created.pop(step, None)

    def apply(self, storage: Storage) -> list[int]:
        """Clean leftovers, then delete what the policy no longer keeps and no reader pins; return the
        steps deleted."""
        with storage.lock():
            storage.clean_leftovers()
            if self.policy.keeps_all:
                return []
            steps = storage.committed_steps()
            infos = [StepInfo(s, self._created_of(storage, s)) for s in steps]
            doomed = self.policy.to_delete(infos, pinned=leases.pinned_steps(storage))
            deleted = delete_unpinned(storage, doomed)  # a reader may pin one meanwhile
            for s in deleted:
                self._created.pop(s, None)
            return deleted

    def _created_of(self, storage: Storage, step: int) -> float:
        if self.policy.keep_every_n_hours is None:
            return 0.0
        if step not in self._created:
            self._created[step] = load.read_manifest(storage, step_name(step)).created
        return self._created[step]


def delete_unpinned(storage: Storage, steps: Iterable[int]) -> list[int]:
    """Delete the committed ``steps`` that no reader pins, safely against readers pinning at the same time;
    return the steps deleted: the deleting side of the protocol in :mod:`.leases` (mark, then look). Call
    under ``storage.lock()``: it assumes it is the only deleter, and so also removes deletion marks that a
    crashed deleter left, and leases that expired."""
    steps = list(steps)
    if not steps:
        return []
    files = leases.LeaseDir(storage)
    marks = {s: f"{step_name(s)}.{new_token()}.{leases.MARK}" for s in steps}
    for mark in marks.values():
        files.put(mark)
    deleted = []
    try:
        names = files.names()  # looked at after the marks were written (see the module docstring)
        pinned = leases.live_pins(names, time.time())
        for s in steps:
            if step_name(s) not in pinned:
                storage.delete(step_name(s))
                deleted.append(s)
    finally:
        for mark in marks.values():
            files.remove(mark)
    now = time.time()
    for n in names:
        p = leases.parse_entry(n)
        stale_mark = p is not None and p[1] == leases.MARK and n not in marks.values()
        if stale_mark or (p is not None and p[1] == leases.LEASE and p[2] < now - knobs.current.lease_ttl_s):
            files.remove(n)
    return deleted
