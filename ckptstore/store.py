"""CheckpointStore: versioned step directories under one root, with retention. Orchestration only: the
work is done by :mod:`.pipeline` (saving), :mod:`.load` (restoring), :mod:`.storage` (commit protocols,
listing) and :mod:`.retention` (which steps to keep, and deleting the others)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

from . import distributed, knobs, leases, load, pipeline, tensorio, tree, watch
from .asyncsave import SaveHandle, Saver
from .decisions import Decisions, SavePolicy
from .errors import (
    AccessDeniedError,
    CheckpointNotFoundError,
    CkptStoreError,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    StorageError,
)
from .manifest import Manifest
from .progress import ProgressArg
from .retention import Retention, RetentionPolicy
from .storage import Storage, open_storage, step_name
from .subset import KeyMap
from .verify import verify_checkpoint

__all__ = ["CheckpointInfo", "CheckpointStore"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as read from its manifest (no tensor is read)."""

    step: int
    #: Path (local) or URL (remote) of the checkpoint directory; ``ckptstore.restore(path)`` opens it.
    path: str
    #: Creation time, seconds since the epoch.
    created: float
    #: Bytes of the checkpoint's tensor files.
    nbytes: int
    metadata: dict[str, Any]
    #: Returned by ``save``: why the retention pass after the previous save failed (it was logged as a
    #: warning, and retried before this save), or None.
    retention_failure: str | None = None
    #: Returned by ``save``: seconds this process spent in each phase ("prepare", "plan", "write",
    #: "commit"; see :class:`ckptstore.pipeline.Committed`) and in all ("total"); on rank 0 also waiting for
    #: the retention pass of the save before ("retention_wait": zero when the training between two saves
    #: outlasts it) and running this save's pass ("retention": starting its thread, or the whole pass with
    #: ``knobs.retention_in_background`` off).
    timings: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)


def _info(storage: Storage, name: str, m: Manifest) -> CheckpointInfo:
    return CheckpointInfo(m.step, storage.url_of(name), m.created, sum(f.size for f in m.files), m.metadata)


#: The newest step each store root (by URL) was seen to hold by this process: a listing that runs before
#: a commit, or one torn by a deletion, must not make the latest step go backwards (see CheckpointStore.steps).
_newest_seen: dict[str, int] = {}
_newest_lock = threading.Lock()

#: What restore(fallback=True) skips: a checkpoint that is damaged, gone, or that this reader may not read.
_SKIPPABLE = (CorruptCheckpointError, CheckpointNotFoundError, AccessDeniedError)


class _RetentionThread:
    """Retention off the save's critical path: one pass at a time, on a thread of its own, started after a
    commit and waited for by the next save, by this store object's own listings and by ``close``. A pass
    that fails is logged as a warning; the next save reports it (:attr:`CheckpointInfo.retention_failure`)
    and runs a pass again before its commit (:meth:`Retention.catch_up`)."""

    def __init__(self, retention: Retention, storage: Storage) -> None:
        self._retention, self._storage = retention, storage
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def start(self, step: int) -> None:
        if not knobs.current.retention_in_background:
            self._run(step)
            return
        # Not a daemon: an interpreter exiting after a save finishes the deletions it began.
        self._thread = threading.Thread(target=self._run, args=(step,), name="ckptstore-retention")
        self._thread.start()

    def _run(self, step: int) -> None:
        try:
            self._retention.apply(self._storage)
        except Exception as e:
            self._failure = str(e) or type(e).__name__
            log.warning(
                "retention of %s after step %d failed (the checkpoint is committed; the next save retries): %s",
                self._storage.url,
                step,
                self._failure,
            )

    def wait(self) -> None:
        """Wait for the pass in flight, if any."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def take_failure(self) -> str | None:
        """Why the last pass failed, if it did and no save has reported it yet (it is then forgotten)."""
        failure, self._failure = self._failure, None
        return failure


def _check_step(step: Any) -> int:
    """``step`` as an int: an int (not a bool), or a NumPy, torch or JAX integer scalar (``np.int64(5)``, a
    0-d integer tensor or array); floats and bools are refused whatever their type."""
    value = step
    if not isinstance(step, int):
        # An integer scalar of a framework, recognised without importing one: a 0-d value whose dtype is an
        # integer type (numpy and JAX dtypes print as "int64", torch's as "torch.int64").
        dtype = str(getattr(step, "dtype", "")).removeprefix("torch.")
        if getattr(step, "shape", None) == () and dtype.startswith(("int", "uint")) and dtype[-1].isdigit():
            try:
                value = int(step)
            except Exception:  # an abstract (traced) value
                value = step
    # The upper bound keeps the step in an int64 (and the directory name within what listing parses).
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise CkptStoreError(
            f"step must be an int in [0, 2**63) (or a NumPy, torch or JAX integer scalar), got {step!r}"
        )
    return int(value)


class CheckpointStore:
    """Versioned checkpoints of one training run under ``url_or_path``.

    Args:
        url_or_path: a local directory (created if needed) or any fsspec URL (``s3://bucket/run1``), or a
            :class:`~ckptstore.storage.Storage` object.
        max_to_keep: keep the newest N checkpoints (None keeps all; with ``keep_best``, the newest one).
        keep_every_n_steps: also keep every step divisible by K, forever.
        keep_every_n_hours: also keep one checkpoint per H hours.
        keep_best: also keep the N checkpoints whose ``metadata[best_metric]`` is best (ties: the newer);
            one without the metric as an int or float (or with NaN) is kept by the other rules only.
        best_metric: the metadata key that ranks checkpoints (needed by ``keep_best`` and :meth:`best_step`).
        best_mode: ``"min"`` (the lowest value is best, as for a loss) or ``"max"``.
        save_interval_steps: :meth:`should_save` is true at every step divisible by K.
        save_interval_secs: :meth:`should_save` is true once this many seconds passed since the last save
            began.
        save_on_preemption: handle ``preemption_signals`` (from the main thread, until :meth:`close`): the
            next :meth:`should_save` is true, then :meth:`reached_preemption` (docs/training-loop.md).
        preemption_signals: a signal number or several; SIGTERM by default.
        storage_options: passed to the fsspec filesystem (``endpoint_url``, credentials, ...).
        coordinator: how the processes of a distributed job save together (docs/distributed.md). Default:
            torch.distributed's world when it is initialised at save time, else this process alone. A store
            that only rank 0 saves through needs ``ckptstore.distributed.SINGLE``.

    Example::

        store = ckptstore.CheckpointStore("ckpts", max_to_keep=3, save_interval_steps=1000)
        state, last = store.resume(like={"model": model, "opt": opt, "step": 0})
        ...
        if store.should_save(step):
            store.save(step, {"model": model, "opt": opt, "step": step})
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike[str] | Storage,
        *,
        max_to_keep: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_every_n_hours: float | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        save_interval_steps: int | None = None,
        save_interval_secs: float | None = None,
        save_on_preemption: bool = False,
        preemption_signals: int | Sequence[int] = (signal.SIGTERM,),
        storage_options: dict[str, Any] | None = None,
        coordinator: distributed.Coordinator | None = None,
    ) -> None:
        self.policy = RetentionPolicy(
            max_to_keep,
            keep_every_n_steps,
            keep_every_n_hours,
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
        )
        self.save_policy = SavePolicy(
            save_interval_steps,
            save_interval_secs,
            save_on_preemption,
            (preemption_signals,) if isinstance(preemption_signals, int) else tuple(preemption_signals),
        )
        self._retention = Retention(self.policy)
        self.coordinator = coordinator
        self._twin: tuple[Any, distributed.Coordinator] | None = None  # see _background_twin
        self.storage = open_storage(url_or_path, storage_options)
        self._saver = Saver()
        self._retention_thread = _RetentionThread(self._retention, self.storage)
        self._decisions = Decisions(self.save_policy, lambda: distributed.resolve(self.coordinator))

    @property
    def url(self) -> str:
        """The store's root, as a path or URL."""
        return self.storage.url

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, {self.policy})"

    # --- writing ------------------------------------------------------------------------------------

    @overload
    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = ...,
        overwrite: bool = ...,
        blocking: Literal[True] = ...,
    ) -> CheckpointInfo: ...
    @overload
    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = ...,
        overwrite: bool = ...,
        blocking: Literal[False],
    ) -> SaveHandle[CheckpointInfo]: ...
    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        blocking: bool = True,
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
        """Save ``state`` as checkpoint ``step``, atomically; then apply retention.

        Args:
            step: a non-negative int; the directory is ``step_XXXXXXXX``.
            state: a tree of dicts, lists, tuples, arrays (numpy, torch, ...), plain Python values and
                stateful objects (anything with ``state_dict()`` / ``load_state_dict()``).
            metadata: a small dict of plain values, readable through :meth:`info` without reading tensors.
            overwrite: replace a committed checkpoint of the same step.
            blocking: with False, return once every array is copied to host memory (a snapshot: the
                caller may update its arrays in place at once) and write in a background thread. At most
                ``knobs.async_max_in_flight`` (1) saves are in flight; a further save waits for one to
                finish first. See :meth:`wait_until_finished`.

        Returns:
            The committed checkpoint's :class:`CheckpointInfo`; with ``blocking=False``, a
            :class:`~ckptstore.asyncsave.SaveHandle` whose ``result()`` returns it.

        Raises:
            UnsupportedTypeError: a leaf cannot be saved (nothing is written).
            CheckpointExistsError: ``step`` is committed already and ``overwrite`` is False.
            AsyncSaveError: an earlier background save failed and its handle did not report it.
        """
        step = _check_step(step)
        coord = distributed.resolve(self.coordinator)
        self._decisions.started(step)
        if blocking:
            self._saver.wait()  # saves commit in the order they were asked for
            return self._save(step, lambda: pipeline.prepare(state, metadata), overwrite, coord, staged=True)
        if coord.world_size > 1:
            if knobs.current.async_max_in_flight != 1:  # two saves' collectives would interleave
                raise ConfigError("saves across ranks with blocking=False need knobs.async_max_in_flight == 1")
            coord = self._background_twin(coord)

        def prepare() -> pipeline.Prepared:  # on the caller's thread, before the snapshot is taken
            prepared = pipeline.prepare(state, metadata, defer_devices=True)
            pipeline.ensure_free(self.storage, step_name(step), overwrite)
            return prepared

        return self._saver.start(step, prepare, lambda snap: self._save(step, lambda: snap, overwrite, coord))

    def _background_twin(self, coord: distributed.Coordinator) -> distributed.Coordinator:
        """A coordinator of ``coord``'s ranks whose collectives run on a gloo group of their own, for the
        background half of saves across ranks: issued from the save's thread, they never meet the
        training's collectives on ``coord``'s group (issued meanwhile from the training's thread), nor the
        save decisions' (:mod:`.decisions`, on the caller's thread too). Made at the first background save,
        on the caller's thread (making a group is itself a collective: every rank makes it at the same
        save), and kept for the next ones."""
        key = (type(coord), getattr(coord, "group", None))
        if self._twin is not None and self._twin[0] == key:
            return self._twin[1]
        twin: distributed.Coordinator
        make = getattr(coord, "background", None)
        if make is not None:
            twin = make()
        elif isinstance(coord, distributed.TorchDistributed):
            import torch.distributed as dist

            ranks = None if coord.group is None else dist.get_process_group_ranks(coord.group)
            twin = distributed.TorchDistributed(dist.new_group(ranks, backend="gloo"))
        else:
            raise ConfigError(
                f"blocking=False across ranks needs a coordinator whose collectives can run on a group of their "
                f"own (torch.distributed's, or one with a background() method); {type(coord).__name__} has none"
            )
        self._twin = (key, twin)
        return twin

    def should_save(self, step: int) -> bool:
        """Whether to save ``step`` now, by the store's save policy.

        True when ``step`` is past the step of the last save this store object started (``save(step)``
        makes ``should_save(step)`` false) and: ``step`` is a multiple of ``save_interval_steps``, or
        ``save_interval_secs`` have passed since that save started (before any save: since the first
        ``should_save`` call), or a preemption signal arrived (``save_on_preemption=True``) and no save has
        started since. With no interval and no ``save_on_preemption``, true for every new step; with
        ``save_on_preemption`` alone, only on preemption. Checkpoints committed by other store objects or
        processes do not count.

        Across ranks (torch.distributed) every rank gets the same answer, so every rank must call it at the
        same steps: step intervals are decided locally; the time interval (rank 0's clock) and preemption
        (a signal on any rank) are agreed by one small all-reduce on a gloo group of ckptstore's own every
        few calls (``knobs.preemption_sync_every``; by default as often as costs at most 0.5% of the
        training's time), so they are decided at those calls only (docs/distributed.md).

        Example::

            for step in range(start, total):
                train_step()
                if store.should_save(step):
                    store.save(step, state)
                if store.reached_preemption(step):
                    store.wait_until_finished()
                    sys.exit(0)

        Raises:
            DistributedError: the agreement across ranks failed (a rank died or timed out).
        """
        return self._decisions.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption was decided (``should_save`` answered it) and a save of ``step`` or of a
        later step has started after it; it then stays true. Time to :meth:`wait_until_finished` (an async
        save in flight commits) and exit. In one process a signal that arrives after the save of ``step``
        started counts too (that save holds the state of ``step``). Every rank answers alike.

        With ``save_on_preemption=True`` the store handles ``preemption_signals`` (SIGTERM by default) from
        its creation, which must be in the main thread, until :meth:`close`: the handler records the signal
        (no I/O) and then calls the handler it replaced if that was a Python function; the default action
        and SIG_IGN are not acted on (the process is not killed: the loop must save and exit). ``close()``
        puts the replaced handlers back."""
        return self._decisions.reached_preemption(step)

    def best_step(self) -> int | None:
        """The committed step whose ``metadata[best_metric]`` is best (``best_mode``), or None: computed
        from the committed manifests, so every process agrees."""
        return self._retention.best_step(self.storage)

    def wait_until_finished(self) -> None:
        """Wait until every background save has committed (or failed), and the retention pass after the
        last save has finished (a failure of that pass is logged, and reported by the next save).

        Raises:
            AsyncSaveError: a background save failed and its handle did not report it.
        """
        try:
            self._saver.wait()
        finally:
            self._retention_thread.wait()

    def close(self) -> None:
        """Wait for background saves and free their snapshot memory, and the calling thread's staging
        buffers of blocking saves (``knobs.staged_writes``). The store stays usable.

        Raises:
            AsyncSaveError: a background save failed and its handle did not report it.
        """
        try:
            self._saver.wait()
        finally:
            self._retention_thread.wait()
            self._saver.release_snapshots()
            tensorio.release_staging()
            self._decisions.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save(
        self,
        step: int,
        source: Callable[[], pipeline.Prepared],
        overwrite: bool,
        coord: distributed.Coordinator,
        staged: bool = False,
    ) -> CheckpointInfo:
        """Every rank writes its share, rank 0 commits (:func:`ckptstore.pipeline.save`); then rank 0 alone
        applies retention (after the commit it depends on). ``staged``: a blocking save (on the caller's
        time: its direct writes go through staging buffers, ``knobs.staged_writes``)."""
        name = step_name(step)
        failure = None
        started = time.perf_counter()
        extra: dict[str, float] = {}
        if coord.rank == 0:
            self._retention_thread.wait()  # the pass the previous save started
            failure = self._retention_thread.take_failure()
            # A pass left undone (cut short, or failed) first: a disk it left full fails the save before its
            # commit, and so before the pass after it. Never raises.
            self._retention.catch_up(self.storage)
            extra["retention_wait"] = time.perf_counter() - started
        done = pipeline.save(self.storage, name, step, source, overwrite=overwrite, coordinator=coord, staged=staged)
        if coord.rank == 0:
            _remember(self.url, step)
            self._retention.saved(step, done.created)
            before = time.perf_counter()
            self._retention_thread.start(step)  # deletions off the critical path: see _RetentionThread
            extra["retention"] = time.perf_counter() - before
        timings = {**extra, **done.timings, "total": time.perf_counter() - started}
        log.info(
            "saved step %d to %s: %d bytes in %.3f s (%.2f GB/s; %s)",
            step,
            self.storage.url_of(name),
            done.nbytes,
            timings["total"],
            done.nbytes / max(timings["total"], 1e-9) / 1e9,
            ", ".join(f"{k} {v:.3f} s" for k, v in done.timings.items()),
        )
        return CheckpointInfo(
            step, self.storage.url_of(name), done.created, done.nbytes, done.metadata, failure, timings
        )

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (its manifest first, then its data).

        Raises:
            CheckpointNotFoundError: no committed checkpoint has this step.
        """
        step = _check_step(step)
        name = step_name(step)
        self._retention_thread.wait()
        with self.storage.lock():
            if not self.storage.is_committed(name):
                raise CheckpointNotFoundError(f"no committed checkpoint at {self.storage.url_of(name)}")
            self.storage.delete(name)
        self._retention.forget(step)
        with _newest_lock:
            if _newest_seen.get(self.url) == step:
                del _newest_seen[self.url]

    # --- reading ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending (listed fresh from the filesystem).

        Within a process the newest step never goes backwards unless it was deleted: a listing whose newest
        step is older than one this process saw in this store (a listing made just before that step was
        committed, or one that raced with retention) gets it back if a lookup by name finds it committed.
        """
        self._retention_thread.wait()  # this store object's own deletions are done before it lists
        steps = self.storage.committed_steps()
        key = self.url
        with _newest_lock:
            known = _newest_seen.get(key)
        for _ in range(_RELISTINGS):
            if known is None or (steps and steps[-1] >= known):
                break
            # One lookup by name (atomic against renames), only when the listing is behind.
            if self.storage.is_committed(step_name(known)):
                return [*steps, known]
            # Gone since: deleted outright, or by retention after a newer commit, which the listing (not a
            # snapshot: torn between that commit and the deletions) may have missed. A fresh listing finds
            # the newer one; one that reads the same as before says it was deleted outright.
            again = self.storage.committed_steps()
            if again == steps:
                break
            steps = again
        else:
            steps = self.storage.committed_steps()
        if known is not None and (not steps or steps[-1] < known):
            with _newest_lock:  # deleted (explicitly, or by another process): forget it
                if _newest_seen.get(key) == known:
                    del _newest_seen[key]
        if steps:
            _remember(key, steps[-1])
        return steps

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none. It never goes backwards within a process
        unless a checkpoint is deleted (:meth:`steps`)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _resolve(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.url}")
            return latest
        return _check_step(step)

    def info(self, step: int | None = None) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of ``step`` (default: the latest), from its manifest alone."""
        name = step_name(self._resolve(step))
        return _info(self.storage, name, _manifest(self.storage, name))

    def iter_new(
        self,
        min_interval_secs: float = 0,
        timeout: float | None = None,
        timeout_fn: Callable[[], bool] | None = None,
        *,
        every_checkpoint: bool = False,
        pin: bool = True,
    ) -> Iterator[CheckpointInfo]:
        """Yield the :class:`CheckpointInfo` of each new committed checkpoint as it appears, pinned while the
        caller works on it: ``ckptstore.checkpoints_iterator`` on this store (same arguments, same rules)."""
        return watch.watch(
            self.storage,
            self.info,
            min_interval_secs=min_interval_secs,
            timeout=timeout,
            timeout_fn=timeout_fn,
            every_checkpoint=every_checkpoint,
            pin=pin,
        )

    def pin(self, step: int | None = None, *, ttl: float | None = None) -> leases.Lease:
        """Pin checkpoint ``step`` (default: the latest) against retention until the lease is released (or
        expires, ``ttl`` seconds after its holder stopped renewing it); a context manager.

        Raises:
            CheckpointNotFoundError: no such committed checkpoint, or it is being deleted.
        """
        name = step_name(self._resolve(step))
        lease = leases.acquire(self.storage, name, ttl=ttl)
        if lease is None:
            raise CheckpointNotFoundError(f"{self.storage.url_of(name)} is not committed, or is being deleted")
        return lease

    def restore(
        self,
        step: int | None = None,
        *,
        like: Any = tree.MISSING,
        framework: str | None = None,
        verify: bool = True,
        fallback: bool = False,
        keys: Sequence[str] | str | None = None,
        mmap: bool = False,
        strict: bool = True,
        key_map: KeyMap | None = None,
        progress: ProgressArg = None,
    ) -> Any:
        """Restore checkpoint ``step`` (default: the latest committed).

        Args:
            step: the step: an int, or a NumPy, torch or JAX integer scalar.
            like: a template tree. Each array comes back with the type, dtype and device of its
                counterpart; each stateful object in it gets ``load_state_dict`` in place and is returned.
                A plain value (``0``, ``None``, ``{"lr": 0.1}``) is a placeholder: the saved value comes
                back, except that a 0-d array or tensor saved where ``like`` holds a Python number comes
                back as a Python number (of the placeholder's type: ``float``, or ``int`` for an integer).
                A torch module's saved state dict fits the module whether it was saved or is restored
                compiled (``_orig_mod.``) or wrapped in DDP / DataParallel (``module.``).
            framework: arrays without a counterpart come back as ``"numpy"`` (default) or ``"torch"``,
                ``"jax"``, ``"tf"`` arrays.
            verify: check every tensor's checksum (xxh3-64) while reading (file sizes are always
                checked). It costs about 15% of a restore from the page cache, less from disk or network;
                pass False to skip it. Tensors are checked before anything is rebuilt, except those of
                ``like``'s stateful objects (without ``mmap``): a torch module's or optimizer's are read
                straight into its existing tensors (on a GPU through a reused bounce buffer), and a Keras
                model's, a Flax NNX object's (and any array converted to a framework's) are read one at
                a time as they are assigned, so that the state is never twice in memory. Those are
                checked as they are read, so a damaged one leaves the objects partly overwritten, and the
                CorruptCheckpointError says so ("the objects in `like` were partly overwritten"): restore
                an intact checkpoint into them (``fallback=True`` does) before using them.
            fallback: if the checkpoint is damaged, unreadable (permission denied) or deleted while being
                read, restore the newest intact older one instead, with a warning naming each one skipped.
                When the ones tried vanished under the reader (a trainer's retention), the store is listed
                again and what is new is tried, pinned where the reader may write leases: it fails only if
                no intact checkpoint is left. Implies ``verify``. Objects of ``like`` partly overwritten by a
                damaged checkpoint are then overwritten in full by the intact one, provided it holds the
                same keys (with ``strict=False``, a key the older checkpoint lacks keeps what the damaged
                one wrote into it; docs/frameworks.md).
            keys: restore only these subtrees: paths of dict keys joined by '/' (``["model"]``,
                ``"model/encoder"``). The result keeps only what they select, and only their tensors'
                bytes are read (ranged reads on object stores). ``like`` then matches that subset.
            mmap: local disk only (elsewhere ignored): NumPy arrays come back mapped on the tensor files
                (private, copy-on-write: writable, and writes never reach the file) instead of read into
                fresh memory; pages are read on first touch. A mapped file stays valid after retention
                deletes the checkpoint on a local POSIX disk; do not use it on NFS-like mounts, where a
                file deleted by another host faults its readers. Arrays converted to another framework,
                dtype or device through ``like`` are copies as usual.
            strict: False restores what matches ``like`` instead of raising StructureMismatchError for dict
                keys that differ (a scheduler added to the state, an entry or a layer removed): a key path
                of ``like`` that the checkpoint lacks keeps ``like``'s value (an object there is left as it
                is), one only the checkpoint has is dropped, and a
                :class:`~ckptstore.errors.PartialRestoreWarning` names both (``.missing``, ``.unexpected``).
                Keys inside a stateful object's state dict are matched the same way (a torch module:
                ``load_state_dict(..., strict=False)``). Shapes, dtypes, types and list lengths must still
                fit (docs/frameworks.md, "Resuming a changed state").
            key_map: rename the checkpoint's key paths (dict keys joined by '/', as in ``keys``, which
                selects by the saved names) before they meet ``like``: a dict ``{saved prefix: new
                prefix}`` (``{"model": "net"}``; a new prefix of None drops what it covers) or a function
                of a saved path giving its new path or None (dropped).
            progress: the bytes read, as they land: True for a progress bar on stderr (when it is a
                terminal and tqdm is installed), or a function ``(done_bytes, total_bytes)`` called from
                the reading threads, one call at a time (see :mod:`ckptstore.progress`). Blocks of sharded
                arrays are not counted. With ``fallback``, each checkpoint tried counts anew.

        Raises:
            CheckpointNotFoundError: no such committed checkpoint.
            CorruptCheckpointError: the manifest or a tensor file is damaged (with ``fallback``: all are).
            StructureMismatchError: ``like`` does not fit the checkpoint.
        """
        coord = distributed.resolve(self.coordinator)
        if step is None and coord.world_size > 1:  # every rank restores the same step: rank 0's latest
            step = distributed.agree(coord, lambda: self._resolve(None))
        if fallback:
            return self._restore_fallback(
                step, like, framework, keys, strict=strict, key_map=key_map, progress=progress, coord=coord
            )[0]
        name = step_name(self._resolve(step))
        started = time.perf_counter()
        m = _manifest(self.storage, name)
        state = load.read(
            self.storage,
            name,
            like=like,
            framework=framework,
            verify=verify,
            m=m,
            keys=keys,
            mmap=mmap,
            strict=strict,
            key_map=key_map,
            stacklevel=2,
            progress=progress,
            rank=coord.rank,
            world_size=coord.world_size,
        )
        _log_restore(self.storage.url_of(name), m, keys, time.perf_counter() - started)
        return state

    def _restore_fallback(
        self,
        step: int | None,
        like: Any,
        framework: str | None,
        keys: Sequence[str] | str | None = None,
        *,
        strict: bool = True,
        key_map: KeyMap | None = None,
        progress: ProgressArg = None,
        coord: distributed.Coordinator = distributed.SINGLE,
    ) -> tuple[Any, int]:
        """The newest intact checkpoint at or before ``step`` (default: the latest) restored, and its step
        (for ``coord``'s rank: see ``load.read``)."""
        newest = self._resolve(step)
        # Asked for the latest, a checkpoint committed meanwhile is fair game when the ones tried vanished.
        bound = newest if step is not None else None
        skipped: list[str] = []
        tried: set[int] = set()
        candidates = [s for s in self.steps() if s <= newest] or [newest]
        relisted = False
        while candidates:
            for s in reversed(candidates):
                tried.add(s)
                name = step_name(s)
                # After a re-listing, pin what is tried (where this reader may write leases): retention,
                # which deleted the ones tried before under this reader, then leaves it alone.
                lease = self._try_pin(name) if relisted else None
                started = time.perf_counter()
                try:
                    m = _manifest(self.storage, name)
                    # Every tensor is checked before the tree is rebuilt, except those read into `like`'s
                    # stateful objects as the rebuild goes: a damaged one leaves them partly overwritten,
                    # and the next checkpoint tried overwrites them again in full (the same keys).
                    state = load.read(
                        self.storage,
                        name,
                        like=like,
                        framework=framework,
                        verify=True,
                        m=m,
                        keys=keys,
                        strict=strict,
                        key_map=key_map,
                        stacklevel=3,
                        progress=progress,
                        rank=coord.rank,
                        world_size=coord.world_size,
                    )
                except _SKIPPABLE as e:
                    skipped.append(f"step {s}: {e}")
                    log.warning("restore of %s: skipped step %d (falling back to an older one): %s", self.url, s, e)
                    continue
                finally:
                    if lease is not None:
                        lease.release()
                if skipped:
                    warnings.warn(
                        f"restored step {s} of {self.url}; skipped newer damaged checkpoints: " + "; ".join(skipped),
                        CorruptCheckpointWarning,
                        stacklevel=3,
                    )
                _log_restore(self.storage.url_of(name), m, keys, time.perf_counter() - started)
                return state, s
            # Every candidate failed. Some may have vanished under this reader (retention deleting them as a
            # newer one was committed): list again, and try what was not tried yet.
            candidates = [s for s in self.steps() if (bound is None or s <= bound) and s not in tried]
            relisted = True
        raise CorruptCheckpointError(
            f"no intact checkpoint at or before step {newest} in {self.url}: " + "; ".join(skipped)
        )

    def resume(
        self,
        like: Any,
        *,
        framework: str | None = None,
        strict: bool = True,
        key_map: KeyMap | None = None,
    ) -> tuple[Any, int | None]:
        """Resume a run: ``(state, step)`` of the latest intact checkpoint restored into ``like`` (as
        ``restore(like=like, fallback=True)``: a damaged newest checkpoint is skipped, with a warning), or
        ``(like, None)``, ``like`` untouched (each ``PerRank`` in it as its value), when nothing is committed
        yet. Under torch.distributed every rank resumes rank 0's latest step. ``strict=False`` and
        ``key_map`` as for :meth:`restore`.

        Example::

            state, step = store.resume(like={"model": model, "opt": opt, "step": 0})
            start = 0 if step is None else step + 1

        A damaged newest checkpoint may have overwritten part of ``like``'s torch modules and optimizers
        (tensors are read into them in place, see :meth:`restore`'s ``verify``) before it was skipped: the
        intact one restored then overwrites them in full (where it holds the same keys).

        Raises:
            CorruptCheckpointError: checkpoints are committed, but none is intact (nothing is started over
                silently); the objects in ``like`` may then be partly overwritten (the message says so).
        """
        coord = distributed.resolve(self.coordinator)
        latest = distributed.agree(coord, self.latest_step) if coord.world_size > 1 else self.latest_step()
        if latest is None:
            return tree.without_per_rank(like), None
        step = latest if coord.world_size > 1 else None  # (alone: whatever is latest when it is read)
        return self._restore_fallback(step, like, framework, strict=strict, key_map=key_map, coord=coord)

    def _try_pin(self, name: str) -> leases.Lease | None:
        """A lease on checkpoint ``name`` if this reader can write one (None otherwise: it reads unpinned)."""
        try:
            return leases.acquire(self.storage, name)
        except StorageError:
            return None

    def verify(self, step: int | None = None, *, progress: ProgressArg = None) -> list[int]:
        """Check every byte of checkpoint ``step``, or of every committed checkpoint when ``step`` is None:
        each tensor file's size, safetensors header (against the manifest) and each tensor's checksum.
        ``progress``: the bytes checked, per checkpoint, as for :meth:`restore`.

        Returns:
            The steps verified, ascending. A checkpoint deleted meanwhile (retention) is left out.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            CorruptCheckpointError: a checkpoint is damaged; the message names each damaged step, its file
                and, where one is to blame, its tensor (every checkpoint is checked before this is raised).
        """
        if step is not None:
            step = _check_step(step)
            name = step_name(step)
            verify_checkpoint(self.storage, name, _manifest(self.storage, name), progress=progress)
            return [step]
        done: list[int] = []
        damaged: list[str] = []
        for s in self.steps():
            name = step_name(s)
            try:
                verify_checkpoint(self.storage, name, _manifest(self.storage, name), progress=progress)
            except _SKIPPABLE as e:  # one this reader may not read is reported with the damaged ones
                if isinstance(e, AccessDeniedError) or self.storage.is_committed(name):
                    damaged.append(str(e))
                continue
            done.append(s)
        if damaged:
            raise CorruptCheckpointError(f"{len(damaged)} damaged checkpoint(s) in {self.url}: " + "; ".join(damaged))
        return done


def _log_restore(url: str, m: Manifest, keys: Sequence[str] | str | None, seconds: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    if keys is None:
        nbytes = sum(t.nbytes for t in m.tensors)
        log.info(
            "restored step %d from %s: %d bytes in %.3f s (%.2f GB/s)",
            m.step,
            url,
            nbytes,
            seconds,
            nbytes / max(seconds, 1e-9) / 1e9,
        )
    else:
        log.info("restored step %d from %s (keys %r) in %.3f s", m.step, url, keys, seconds)


#: Listings :meth:`CheckpointStore.steps` makes at most when one is behind the newest step seen and that
#: step is gone: each further one follows a commit and deletion that tore the one before.
_RELISTINGS = 4


def _remember(url: str, step: int) -> None:
    with _newest_lock:
        if step > _newest_seen.get(url, -1):
            _newest_seen[url] = step


def _manifest(storage: Storage, name: str) -> Manifest:
    try:
        return load.read_manifest(storage, name)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url_of(name)}") from None
