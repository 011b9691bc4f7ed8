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
writers left (and deletion marks of deleters that died), lists the committed steps, asks the policy, and
deletes the unpinned rest (manifest first). It cannot get stuck: a damaged or foreign entry is skipped and
reported once (logged), a disk out of space or inodes is met with a reserve (:data:`RESERVE`), and a pass
cut short is done by the next one (:meth:`Retention.catch_up`, before a save).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence

from . import knobs, leases, load
from .errors import AccessDeniedError, CheckpointNotFoundError, CkptStoreError, ConfigError, StorageError
from .storage import Storage, new_token, parse_step, step_name

log = logging.getLogger(__name__)


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
    #: Also keep the N checkpoints whose ``metadata[best_metric]`` is best (``best_mode`` "min" or "max").
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

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

    Nothing that a damaged or foreign entry does stops it (see :meth:`apply`); a pass cut short by a failure
    of the storage itself is run again by the next one (:attr:`behind`, :meth:`catch_up`).
    """

    def __init__(self, policy: RetentionPolicy) -> None:
        self.policy = policy
        self._created: dict[int, float] = {}
        self._damaged: set[int] = set()  # steps whose creation time cannot be read (reported once)
        self._reserved = False  # whether this process has made sure the reserve exists
        #: True until a pass has completed in this process, and again after one failed: :meth:`catch_up`
        #: then runs a pass before the next save (whose room it may be what frees).
        self.behind = True

    def saved(self, step: int, created: float) -> None:
        """Note a checkpoint just committed (its creation time needs no manifest read)."""
        self._created[step] = created
        self._damaged.discard(step)

    def forget(self, step: int) -> None:
        """Note a checkpoint deleted by other means (``CheckpointStore.delete``)."""
        self._created.pop(step, None)
        self._damaged.discard(step)

    def apply(self, storage: Storage) -> list[int]:
        """Clean leftovers, then delete what the policy no longer keeps and no reader pins; return the
        steps deleted.

        A damaged or foreign entry never stops it: a leftover that cannot be removed (the storage reports
        it), a deletion mark or expired lease that cannot be removed, a checkpoint whose creation time cannot
        be read (with ``keep_every_n_hours``; left alone, neither counted nor deleted) are each reported
        once (logged) and skipped. Deletion marks of a deleter that died are removed on every pass. A disk
        out of space or inodes does not stop it either: it keeps a reserve (:data:`RESERVE`) that it gives
        up to write its first deletion mark. Failures of the storage itself (I/O errors, an unreachable
        endpoint) raise ``StorageError``, and the next pass does what this one could not.
        """
        try:
            deleted = self._apply(storage)
        except BaseException:
            self.behind = True
            raise
        self.behind = False
        return deleted

    def catch_up(self, storage: Storage) -> list[int]:
        """Run a pass now if none has completed in this process yet, or the last one failed (before a save:
        a disk left full by a pass cut short, or by a writer that died, fails the save before its commit,
        and so before the pass after it). Never raises: a failure is logged, and the save goes on."""
        if not self.behind:
            return []
        try:
            return self.apply(storage)
        except Exception as e:
            log.warning("retention of %s could not run before the save: %s", storage.url, e)
            return []

    def best_step(self, storage: Storage) -> int | None:
        """The committed step with the best metric (being built: issue #14)."""
        raise NotImplementedError

    def plan(self, storage: Storage) -> list[int]:
        """The committed steps a pass would delete now if no reader pinned them (nothing is changed; a
        pass then keeps those pinned at the moment it deletes)."""
        if self.policy.keeps_all:
            return []
        return self.policy.to_delete(self._infos(storage, storage.committed_steps()))

    def _apply(self, storage: Storage) -> list[int]:
        with storage.lock():
            storage.clean_leftovers()
            files = leases.LeaseDir(storage)
            names = sweep_lease_dir(files, files_names(files))
            if self.policy.keeps_all or names is None:  # None: no lease directory to mark in (reported)
                return []
            infos = self._infos(storage, storage.committed_steps())
            pinned = {s for s in map(parse_step, leases.live_pins(names, time.time())) if s is not None}
            doomed = self.policy.to_delete(infos, pinned=pinned)
            self._reserve(storage)
            deleted = self._delete(storage, doomed)  # a reader may pin one meanwhile
            for s in deleted:
                self._created.pop(s, None)
            self._reserve(storage)  # again, if the deletions needed it
            return deleted

    def _infos(self, storage: Storage, steps: list[int]) -> list[StepInfo]:
        infos = []
        for s in steps:
            created = self._created_of(storage, s)
            if created is not None:
                infos.append(StepInfo(s, created))
        return infos

    def _created_of(self, storage: Storage, step: int) -> float | None:
        """The creation time of a committed step; None if it cannot be known (the step is then left out)."""
        if self.policy.keep_every_n_hours is None:
            return 0.0
        if step in self._created:
            return self._created[step]
        if step in self._damaged:
            return None
        name = step_name(step)
        try:
            created = load.read_manifest(storage, name).created
        except CheckpointNotFoundError:
            return None  # deleted meanwhile (CheckpointStore.delete in another process)
        except AccessDeniedError as e:
            why = str(e)
        except (StorageError, ConfigError):
            raise  # the storage failed (or a setting is bad), not the checkpoint: the next pass reads it again
        except Exception as e:  # damaged, hostile or of a newer format: its decoder's error, whatever it is
            why = str(e) or type(e).__name__
        else:
            if isinstance(created, (int, float)) and math.isfinite(created) and 0 <= created <= _latest_plausible():
                self._created[step] = float(created)
                return float(created)
            why = f"{created!r} is not a plausible time"
        self._damaged.add(step)
        report_once(
            ("damaged", storage.url, name),
            "retention of %s: step %d is left alone (neither counted nor deleted by keep_every_n_hours; "
            "CheckpointStore.delete removes it): its creation time cannot be read: %s",
            storage.url,
            step,
            why,
        )
        return None

    def _reserve(self, storage: Storage) -> None:
        """Make sure the reserve exists (once per process, and again after it was given up)."""
        if self._reserved:
            return
        try:
            for name in RESERVE:
                storage.put(name)  # an existing file is truncated: no new inode, on a full disk too
        except StorageError:
            return  # a full disk (or a read-only one): tried again at the next pass
        self._reserved = True

    def _delete(self, storage: Storage, doomed: list[int]) -> list[int]:
        try:
            return delete_unpinned(storage, doomed)
        except StorageError as e:
            if e.errno not in _NO_SPACE:
                raise
            # No room for a deletion mark: give up the reserve, and delete one step at a time (each one
            # deleted frees more room than the next one's mark takes).
            for name in RESERVE:
                storage.remove(name)
            self._reserved = False
            deleted: list[int] = []
            for s in doomed:
                deleted += delete_unpinned(storage, [s])
            return deleted


#: Empty files in the store root that retention keeps (where its policy deletes anything), and gives up when a
#: deletion mark cannot be written for lack of space or inodes: two, so that the lease directory and one
#: mark always fit. Without it, a disk filled to the last inode could never be freed: retention writes a
#: mark before it deletes, and a save fails before its commit, so before retention.
RESERVE = (".ckptstore.reserve-0", ".ckptstore.reserve-1")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

#: A manifest's creation time later than this many seconds from now is not believed (a damaged one: a time
#: of 1e300 would make every later checkpoint look older than it, and none would be kept by the hour again).
_FUTURE_SLACK_S = 366 * 24 * 3600.0


def _latest_plausible() -> float:
    return time.time() + _FUTURE_SLACK_S


_reported: set[tuple[str, ...]] = set()
_reported_lock = threading.Lock()


def report_once(key: tuple[str, ...], message: str, *args: object) -> None:
    """Log a warning about a damaged or foreign entry, once per process (``key`` says which entry)."""
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    log.warning(message, *args)


def files_names(files: leases.LeaseDir) -> list[str] | None:
    """The names in the lease directory; None (reported) if something other than a directory is there."""
    try:
        return files.names()
    except StorageError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP, errno.EMLINK):  # a file, or a symlink (refused)
            raise
        report_once(
            ("lease-dir", files.url),
            "%s is not a directory (%s): retention cannot mark checkpoints for deletion, so it deletes none "
            "until it is removed",
            files.url,
            e,
        )
        return None


def sweep_lease_dir(files: leases.LeaseDir, names: list[str] | None, ours: Iterable[str] = ()) -> list[str] | None:
    """Remove the deletion marks among ``names`` (but ``ours``) and the leases expired for longer than their
    time to live; return the names left. Call under ``storage.lock()``: it assumes it is the only deleter,
    so every mark but its own was left by a deleter that died (its checkpoint could not be pinned any more,
    and the iterator would skip it). An entry that cannot be removed (a directory named like a mark) is
    reported once and left."""
    if names is None:
        return None
    ours = set(ours)
    now = time.time()
    left = []
    for n in names:
        p = leases.parse_entry(n)
        stale = p is not None and n not in ours and (p[1] == leases.MARK or p[2] < now - knobs.current.lease_ttl_s)
        if stale:
            try:
                files.remove(n)
                continue
            except StorageError as e:
                report_once(("lease-entry", files.url, n), "%s/%s cannot be removed; left alone: %s", files.url, n, e)
        left.append(n)
    return left


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
    written: list[str] = []
    deleted = []
    try:
        for mark in marks.values():
            files.put(mark)
            written.append(mark)
        names = files.names()  # looked at after the marks were written (see the module docstring)
        pinned = leases.live_pins(names, time.time())
        for s in steps:
            if step_name(s) not in pinned and _delete_or_report(storage, step_name(s)):
                deleted.append(s)
    finally:
        for mark in written:
            try:
                files.remove(mark)
            except StorageError as e:  # left for the next pass's sweep; never hides what went wrong above
                log.warning("could not remove the deletion mark %s/%s: %s", files.url, mark, e)
    sweep_lease_dir(files, names, ours=written)
    return deleted


def _delete_or_report(storage: Storage, name: str) -> bool:
    """Delete the committed checkpoint ``name``; False if this process may not (a directory of another
    user's, of mode 0): reported once and left, and the other deletions go on."""
    try:
        storage.delete(name)
    except StorageError as e:
        if not (isinstance(e, AccessDeniedError) or e.errno in (errno.EACCES, errno.EPERM)):
            raise
        if not storage.is_committed(name):
            return True  # its manifest went: deleted; what is left is a leftover for the next clean-up
        report_once(
            ("undeletable", storage.url, name), "retention cannot delete %s; left alone: %s", storage.url_of(name), e
        )
        return False
    return True
