"""Retention, in one place: which committed checkpoints to keep (a pure policy), and how the others are
deleted (:class:`Retention`: leftovers of crashed writers cleaned, readers' pins honoured, each deletion
announced by a mark first, see :mod:`.leases`).

What survives is the union of the policies given (as in TensorFlow's CheckpointManager):

* ``max_to_keep=N``: the newest N checkpoints (None keeps all, unless ``keep_best`` is set: then only the
  newest one, so that a resume never goes back);
* ``keep_every_n_steps=K``: every step divisible by K, forever;
* ``keep_every_n_hours=H``: one checkpoint per H hours: walking from the oldest, a checkpoint is kept when
  it was created at least H hours after the last one kept this way (the oldest is kept). The choice is
  stable: applied again to the survivors it keeps the same ones.
* ``keep_best=N`` (with ``best_metric`` and ``best_mode``): the N checkpoints whose ``metadata[best_metric]``
  is lowest ("min") or highest ("max"); ties go to the newer step. Only an int or float counts (not a bool);
  a checkpoint without one (the key absent, another type, NaN) is kept or dropped by the other rules only.
  +-inf are ordinary values (inf is the worst loss of "min"). The values are read from the committed
  manifests (once per step and process), so every process and host ranks alike (:func:`rank_best`, which
  ``ckptstore ls --best-metric`` uses too).

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
from typing import Any

from . import knobs, leases, load
from .errors import AccessDeniedError, CheckpointNotFoundError, CkptStoreError, ConfigError, StorageError
from .storage import Storage, new_token, parse_step, step_name

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class StepInfo:
    """What retention knows of a committed checkpoint."""

    step: int
    created: float  # seconds since the epoch
    #: ``metadata[best_metric]`` where it ranks (:func:`metric_value`); None without one, or when not asked for.
    metric: float | None = None


def metric_value(metadata: Any, name: str) -> float | None:
    """``metadata[name]`` if it can rank a checkpoint: an int or float (a bool is not), not NaN; else None."""
    value = metadata.get(name) if isinstance(metadata, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def rank_best(candidates: Iterable[tuple[int, float | None]], mode: str) -> list[int]:
    """The steps of ``(step, metric)`` pairs that have a metric, best first: lowest metric first for mode "min",
    highest first for "max"; of equal metrics, the newer step first. Pairs whose metric is None (or NaN) are
    left out. The one ranking of retention's ``keep_best``, ``best_step()`` and ``ckptstore ls``."""
    if mode not in _BEST_MODES:
        raise CkptStoreError(f"best_mode must be 'min' or 'max', got {mode!r}")
    sign = 1 if mode == "min" else -1
    scored = [(v, s) for s, v in candidates if v is not None and v == v]  # v != v: NaN
    scored.sort(key=lambda p: (sign * p[0], -p[1]))  # ints are compared exactly, never rounded to a float
    return [s for _, s in scored]


_BEST_MODES = ("min", "max")


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
        keep_best = self.keep_best
        if keep_best is not None and (isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1):
            raise CkptStoreError(f"keep_best must be a positive int or None, got {keep_best!r}")
        metric = self.best_metric
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise CkptStoreError(f"best_metric must be a non-empty str (a metadata key) or None, got {metric!r}")
        if keep_best is not None and metric is None:
            raise CkptStoreError(
                f"keep_best={keep_best} needs best_metric: the metadata key to rank checkpoints by "
                '(e.g. best_metric="val_loss", best_mode="min")'
            )
        if self.best_mode not in _BEST_MODES:
            raise CkptStoreError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        return self.max_to_keep is None and self.keep_best is None

    def ranked(self, infos: Iterable[StepInfo]) -> list[int]:
        """The steps of ``infos`` that have a metric, best first (:func:`rank_best`)."""
        return rank_best(((i.step, i.metric) for i in infos), self.best_mode)

    def to_keep(self, infos: Sequence[StepInfo]) -> set[int]:
        """The steps this policy keeps among ``infos`` (their ``metric`` read where ``keep_best`` is set)."""
        ordered = sorted(infos, key=lambda i: i.step)
        if self.keeps_all:
            return {i.step for i in ordered}
        # max_to_keep None here means keep_best is set: the newest is kept all the same (a resume never goes back)
        keep = {i.step for i in ordered[-(self.max_to_keep or 1) :]}
        if self.keep_best is not None:
            keep.update(self.ranked(ordered)[: self.keep_best])
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

    Creation times (for ``keep_every_n_hours``) and metrics (for ``keep_best`` and :meth:`best_step`) are read
    from the committed manifests once per step and remembered.

    Nothing that a damaged or foreign entry does stops it (see :meth:`apply`); a pass cut short by a failure
    of the storage itself is run again by the next one (:attr:`behind`, :meth:`catch_up`).
    """

    def __init__(self, policy: RetentionPolicy) -> None:
        self.policy = policy
        self._created: dict[int, float] = {}  # NaN: read, but not a plausible time
        self._metric: dict[int, float | None] = {}  # metric_value of the manifest's metadata (best_metric)
        self._damaged: set[int] = set()  # steps whose manifest cannot be read (reported once)
        self._reserved = False  # whether this process has made sure the reserve exists
        #: True until a pass has completed in this process, and again after one failed: :meth:`catch_up`
        #: then runs a pass before the next save (whose room it may be what frees).
        self.behind = True

    def saved(self, step: int, created: float) -> None:
        """Note a checkpoint just committed (its creation time needs no manifest read; its metric is read
        from its manifest when needed: a step saved again with ``overwrite`` has a new one)."""
        self._created[step] = created
        self._metric.pop(step, None)
        self._damaged.discard(step)

    def forget(self, step: int) -> None:
        """Note a checkpoint deleted by other means (``CheckpointStore.delete``)."""
        self._created.pop(step, None)
        self._metric.pop(step, None)
        self._damaged.discard(step)

    def apply(self, storage: Storage) -> list[int]:
        """Clean leftovers, then delete what the policy no longer keeps and no reader pins; return the
        steps deleted.

        A damaged or foreign entry never stops it: a leftover that cannot be removed (the storage reports
        it), a deletion mark or expired lease that cannot be removed, a checkpoint whose manifest cannot be
        read where the policy needs it (its creation time for ``keep_every_n_hours``, its metric for
        ``keep_best``; left alone, neither counted nor deleted) are each reported once (logged) and
        skipped. Deletion marks of a deleter that died are removed on every pass. A disk
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
        """The committed step whose ``metadata[best_metric]`` is best (:func:`rank_best`: ties go to the newer
        step), or None when no committed checkpoint has the metric as an int or float other than NaN. Read
        from the committed manifests (each once per process), so every process agrees; a manifest that
        cannot be read is left out (reported once).

        Raises:
            CkptStoreError: the policy has no ``best_metric``.
            StorageError: the storage failed (listing, or reading a manifest).
        """
        if self.policy.best_metric is None:
            raise CkptStoreError(
                'best_step() needs best_metric: CheckpointStore(url, best_metric="val_loss", best_mode="min") '
                "(keep_best is not needed for it)"
            )
        ranked = self.policy.ranked(self._infos(storage, storage.committed_steps(), times=False, metrics=True))
        return ranked[0] if ranked else None

    def plan(self, storage: Storage) -> list[int]:
        """The committed steps a pass would delete now if no reader pinned them (nothing is changed; a
        pass then keeps those pinned at the moment it deletes)."""
        if self.policy.keeps_all:
            return []
        return self.policy.to_delete(self._infos(storage, storage.committed_steps(), **self._needs()))

    def _apply(self, storage: Storage) -> list[int]:
        with storage.lock():
            storage.clean_leftovers()
            files = leases.LeaseDir(storage)
            names = sweep_lease_dir(files, files_names(files))
            if self.policy.keeps_all or names is None:  # None: no lease directory to mark in (reported)
                return []
            infos = self._infos(storage, storage.committed_steps(), **self._needs())
            pinned = {s for s in map(parse_step, leases.live_pins(names, time.time())) if s is not None}
            doomed = self.policy.to_delete(infos, pinned=pinned)
            self._reserve(storage)
            deleted = self._delete(storage, doomed)  # a reader may pin one meanwhile
            for s in deleted:
                self._created.pop(s, None)
                self._metric.pop(s, None)
            self._reserve(storage)  # again, if the deletions needed it
            return deleted

    def _needs(self) -> dict[str, bool]:
        """What the policy needs of each manifest: creation times, metrics."""
        return {"times": self.policy.keep_every_n_hours is not None, "metrics": self.policy.keep_best is not None}

    def _infos(self, storage: Storage, steps: list[int], *, times: bool, metrics: bool) -> list[StepInfo]:
        """What is known of ``steps``: creation times where ``times``, metrics where ``metrics`` (else 0.0 and
        None), each manifest read once (:meth:`_read`). A step whose manifest cannot be read, or (where times
        are needed) holds no plausible creation time, is left out: neither counted nor deleted."""
        infos = []
        for s in steps:
            unknown = (times and s not in self._created) or (metrics and s not in self._metric)
            if unknown and not self._read(storage, s):
                continue
            # .get: a pass on another thread (a store's background retention) may have just deleted it
            created = self._created.get(s, math.nan) if times else 0.0
            if math.isnan(created):  # not a plausible time (reported by _read), or deleted meanwhile
                continue
            infos.append(StepInfo(s, created, self._metric.get(s) if metrics else None))
        return infos

    def _read(self, storage: Storage, step: int) -> bool:
        """Read the manifest of a committed step, and remember its creation time (NaN if it is not a plausible
        one) and metric. False if it cannot be read: deleted meanwhile, or damaged (remembered, reported
        once)."""
        if step in self._damaged:
            return False
        name = step_name(step)
        try:
            m = load.read_manifest(storage, name)
        except CheckpointNotFoundError:
            return False  # deleted meanwhile (CheckpointStore.delete in another process)
        except AccessDeniedError as e:
            why = str(e)
        except (StorageError, ConfigError):
            raise  # the storage failed (or a setting is bad), not the checkpoint: the next pass reads it again
        except Exception as e:  # damaged, hostile or of a newer format: its decoder's error, whatever it is
            why = str(e) or type(e).__name__
        else:
            created = m.created
            plausible = isinstance(created, (int, float)) and math.isfinite(created)
            plausible = plausible and 0 <= created <= _latest_plausible()
            self._created[step] = float(created) if plausible else math.nan
            if not plausible and self.policy.keep_every_n_hours is not None:
                _report_damaged(storage, step, f"its creation time cannot be read: {created!r} is not a plausible time")
            if self.policy.best_metric is not None:
                self._metric[step] = metric_value(m.metadata, self.policy.best_metric)
            return True
        self._damaged.add(step)
        _report_damaged(storage, step, f"its manifest cannot be read: {why}")
        return False

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


def _report_damaged(storage: Storage, step: int, why: str) -> None:
    report_once(
        ("damaged", storage.url, step_name(step)),
        "retention of %s: step %d is left alone (neither counted nor deleted by retention; "
        "CheckpointStore.delete removes it): %s",
        storage.url,
        step,
        why,
    )


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
    log.info("retention deleted step %d of %s", parse_step(name), storage.url)
    return True
