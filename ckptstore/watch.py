"""Watching a store for new checkpoints, as an evaluator next to a trainer does.

:func:`checkpoints_iterator` and :func:`wait_for_new_checkpoint` keep the semantics of TensorFlow's
``tf.train.checkpoints_iterator`` / ``wait_for_new_checkpoint``, which users rely on, and improve on them:

* only committed checkpoints (manifest present) are ever seen, on every filesystem, and every look lists the
  store afresh (no stale listing cache on object stores);
* a timeout is waited in full (TensorFlow gives up up to one poll interval early);
* ``every_checkpoint=True`` yields every committed checkpoint still present, in step order;
* the checkpoint being worked on is pinned by a lease (:mod:`.leases`), so retention cannot delete it
  under the reader's feet;
* once ``timeout_fn`` says no more checkpoints will come, what is already committed and not yet yielded
  (the trainer's final checkpoint, typically) is still yielded, without waiting, before the iterator stops.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import knobs, leases
from .errors import CkptStoreError
from .storage import Storage, open_storage, parse_step, step_name

__all__ = ["checkpoints_iterator", "wait_for_new_checkpoint", "watch"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def _check_seconds(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
        raise CkptStoreError(f"{name} must be a non-negative number{' or None' if allow_none else ''}, got {value!r}")


def _poll(look: Callable[[], T], interval: float, timeout: float | None) -> T | None:
    """Call ``look`` until it returns something truthy, sleeping ``interval`` between calls; None once
    ``timeout`` seconds have passed. The last look happens at the deadline, not one interval before it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = look()
        if found:
            return found
        if deadline is None:
            time.sleep(interval)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(interval, left))


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _listing(storage: Storage, last: int | None) -> list[int]:
    """The committed steps, listed again at once when the listing looks torn: empty, or behind the step
    last yielded (a listing that raced with a commit and retention's deletion). A torn listing must not
    cost a poll interval."""
    steps = storage.committed_steps()
    if not steps or (last is not None and steps[-1] < last):
        steps = storage.committed_steps()
    return steps


def _pending(storage: Storage, last: int | None, every: bool, skip: set[int]) -> list[int]:
    """The steps to yield next: all committed steps after ``last`` (every), or the newest if not ``last``."""
    steps = [s for s in _listing(storage, last) if s not in skip]
    if every:
        return [s for s in steps if last is None or s > last]
    if steps and last is not None and steps[-1] < last and storage.is_committed(step_name(last)):
        return []  # a listing behind the step last yielded, which is still there: nothing new
    return steps[-1:] if steps and steps[-1] != last else []


def watch(
    storage: Storage,
    item: Callable[[int], T],
    *,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    every_checkpoint: bool = False,
    pin: bool = True,
) -> Iterator[T]:
    """The engine of :func:`checkpoints_iterator` and ``CheckpointStore.iter_new``: yields ``item(step)``
    for each new committed step, holding a lease on it (``pin``) until control comes back. Arguments are
    checked at once, not at the first ``next``."""
    _check_seconds("min_interval_secs", min_interval_secs)
    _check_seconds("timeout", timeout, allow_none=True)
    if timeout_fn is not None and not callable(timeout_fn):
        raise CkptStoreError(f"timeout_fn must be callable or None, got {timeout_fn!r}")
    return _watch(storage, item, min_interval_secs, timeout, timeout_fn, every_checkpoint, pin)


def _watch(
    storage: Storage,
    item: Callable[[int], T],
    min_interval_secs: float,
    timeout: float | None,
    timeout_fn: Callable[[], bool] | None,
    every_checkpoint: bool,
    pin: bool,
) -> Iterator[T]:
    last: int | None = None
    skip: set[int] = set()  # steps found being deleted: they are gone, whatever the listing says a moment
    done = False  # timeout_fn said no more checkpoints will come: one last look, no more waiting
    not_before = 0.0  # no yield before this time (min_interval_secs)

    def look() -> list[int]:
        return _pending(storage, last, every_checkpoint, skip)

    while True:
        if done:
            pending = look()
        else:
            log.info("waiting for a new checkpoint in %s", storage.url)
            pending = _poll(look, knobs.current.poll_interval_s, timeout) or []
        if not pending:
            if done or timeout_fn is None:
                return
            done = bool(timeout_fn())
            continue
        for step in pending:
            _sleep_until(not_before)
            lease = leases.acquire(storage, step_name(step)) if pin else None
            if pin and lease is None:
                skip.add(step)
                continue
            not_before = time.monotonic() + min_interval_secs  # the caller's time counts towards it
            try:
                yield item(step)
            finally:
                if lease is not None:
                    lease.release()
            last = step
            if not done and timeout_fn is not None:
                done = bool(timeout_fn())
        if not done:
            _sleep_until(not_before)  # as TensorFlow: the min interval passes before the next look


def checkpoints_iterator(
    checkpoint_dir: str | os.PathLike[str],
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    every_checkpoint: bool = False,
    pin: bool = True,
) -> Iterator[str]:
    """Yield the path (URL on remote filesystems) of each new committed checkpoint in a store, as it appears.

    ``ckptstore.restore(path, storage_options=...)`` opens what it yields. Like TensorFlow's iterator, it
    looks for new checkpoints only when control comes back to it: checkpoints written faster than the
    caller works on them are skipped (only the newest is yielded) unless ``every_checkpoint`` is True.

    Args:
        checkpoint_dir: the store root (``CheckpointStore(checkpoint_dir).url``), a path or fsspec URL.
        min_interval_secs: the least time between two yields (the caller's time counts towards it).
        timeout: the most seconds to wait for a new checkpoint (None: forever). Waited in full, looking
            every ``knobs.poll_interval_s`` seconds or less.
        timeout_fn: called when a timeout expires, and after each yielded checkpoint; returning True means
            no new checkpoint will come: the checkpoints committed and not yet yielded are still yielded,
            without waiting, and the iterator stops. Returning False after a timeout waits again. Without
            ``timeout_fn``, the iterator stops at the first timeout.
        storage_options: passed to the fsspec filesystem.
        every_checkpoint: yield every committed checkpoint still present, oldest first, instead of the
            newest only. The first yield is then the oldest present, not the newest.
        pin: hold a lease on the yielded checkpoint until the caller asks for the next one (or closes the
            iterator), so that the trainer's retention does not delete it meanwhile. Needs write access to
            ``<checkpoint_dir>/.leases/``.

    Yields:
        Paths of committed checkpoint directories; the first is the newest already present, if any.

    Example::

        for path in ckptstore.checkpoints_iterator("s3://bucket/run", timeout=600, timeout_fn=trainer_done):
            state = ckptstore.restore(path, like=template)
    """
    storage = open_storage(checkpoint_dir, storage_options)
    return watch(
        storage,
        lambda step: storage.url_of(step_name(step)),
        min_interval_secs=min_interval_secs,
        timeout=timeout,
        timeout_fn=timeout_fn,
        every_checkpoint=every_checkpoint,
        pin=pin,
    )


def _normalize(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str | os.PathLike):
        raise CkptStoreError(f"last_checkpoint must be a path or URL (str) or None, got {path!r}")
    text = os.fspath(path)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(text).rstrip(os.sep)


def wait_for_new_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    last_checkpoint: str | os.PathLike[str] | None = None,
    seconds_to_sleep: float = 1,
    timeout: float | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Wait until the newest committed checkpoint in a store is another than ``last_checkpoint``.

    Args:
        checkpoint_dir: the store root, a path or fsspec URL.
        last_checkpoint: the path last returned (None: any committed checkpoint will do).
        seconds_to_sleep: seconds between two looks (shortened to end at the timeout).
        timeout: the most seconds to wait, in full (None: forever).

    Returns:
        The newest checkpoint's path (URL on remote filesystems), or None at the timeout. It is not pinned:
        ``with ckptstore.pin(path):`` keeps retention off it while you read it.
    """
    _check_seconds("seconds_to_sleep", seconds_to_sleep)
    _check_seconds("timeout", timeout, allow_none=True)
    storage = open_storage(checkpoint_dir, storage_options)
    last = _normalize(last_checkpoint)

    # The step of ``last_checkpoint`` when it is a checkpoint of this store (a listing behind it is no news).
    last_step = None
    if last is not None:
        base = last.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
        step = parse_step(base)
        if step is not None and _normalize(storage.url_of(step_name(step))) == last:
            last_step = step

    def newest() -> str | None:
        steps = _listing(storage, last_step)
        if not steps:
            return None
        if last_step is not None and steps[-1] < last_step and storage.is_committed(step_name(last_step)):
            return None
        path = storage.url_of(step_name(steps[-1]))
        return path if _normalize(path) != last else None

    log.info("waiting for a new checkpoint in %s", storage.url)
    return _poll(newest, seconds_to_sleep, timeout)
