"""Leases: a reader's pin on a checkpoint, so that retention does not delete it while the reader works on it.

Everything lives in small empty files under ``<store root>/.leases/``; their names say it all, so a single
listing tells who holds what (no file is read)::

    step_00000042.1767225600000.<token>.lease   a reader's pin on step_00000042, live until the time in ms
    step_00000042.<token>.deleting              retention is about to delete step_00000042

The protocol needs no lock shared by the processes, only a filesystem whose listings see what was written
before (local POSIX disk; S3, which is strongly consistent since 2020):

* a reader writes its lease, then looks: if the checkpoint is marked for deletion or no longer committed,
  it drops the lease and skips the checkpoint;
* retention writes a deletion mark, then looks: if a live lease exists, it drops the mark and keeps the
  checkpoint; otherwise it deletes the checkpoint (manifest first), then the mark.

Each side writes before it looks, so at least one of them sees the other: never both go ahead. A held lease
is renewed in the background every third of its time to live (``knobs.lease_ttl_s``), so a reader that dies
blocks deletion for at most that long. Expiry times are wall-clock times: the clocks of readers and trainer
must agree to well within ``lease_ttl_s``. Explicit deletions (``CheckpointStore.delete``) ignore leases.
The deleting side of the protocol is :func:`ckptstore.retention.delete_unpinned`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import knobs
from .errors import CheckpointNotFoundError, CkptStoreError, StorageError, storage_error
from .storage import Storage, new_token, open_parent, parse_step

__all__ = [
    "LEASE",
    "LEASE_DIR",
    "MARK",
    "Lease",
    "LeaseDir",
    "acquire",
    "live_pins",
    "parse_entry",
    "pin",
    "pinned_steps",
]

LEASE_DIR = ".leases"
LEASE, MARK = "lease", "deleting"
log = logging.getLogger(__name__)


class LeaseDir:
    """The lease directory of a store, as a flat set of empty files."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.url_of(LEASE_DIR)

    def put(self, name: str) -> None:
        try:
            self.storage.put(f"{LEASE_DIR}/{name}")
        except StorageError as e:
            raise storage_error(
                e, "a reader needs write access to pin checkpoints (pass pin=False to watch without pinning)"
            ) from e

    def names(self) -> list[str]:
        """The names in the directory, listed fresh."""
        return self.storage.listdir(LEASE_DIR)

    def remove(self, name: str) -> None:
        self.storage.remove(f"{LEASE_DIR}/{name}")


def parse_entry(name: str) -> tuple[str, str, float] | None:
    """(checkpoint name, kind, expiry in seconds) of a lease-directory entry; expiry is inf for marks."""
    if name.endswith("." + LEASE):
        parts = name.rsplit(".", 3)
        if len(parts) == 4 and parts[1].isdigit():
            return parts[0], LEASE, int(parts[1]) / 1000.0
    elif name.endswith("." + MARK):
        parts = name.rsplit(".", 2)
        if len(parts) == 3:
            return parts[0], MARK, float("inf")
    return None


def live_pins(names: Iterable[str], now: float) -> dict[str, float]:
    """The checkpoint names that some unexpired lease pins, each with the latest expiry of its leases."""
    pins: dict[str, float] = {}
    for p in map(parse_entry, names):
        if p is not None and p[1] == LEASE and p[2] > now:
            pins[p[0]] = max(pins.get(p[0], 0.0), p[2])
    return pins


class Lease:
    """A reader's pin on one checkpoint directory; retention keeps the checkpoint until :meth:`release`
    (or until the lease expires, ``knobs.lease_ttl_s`` after the holder stopped renewing it, e.g. died).

    A context manager. Made by :func:`pin`, :meth:`CheckpointStore.pin` and ``checkpoints_iterator``.
    """

    def __init__(self, files: LeaseDir, name: str, path: str, ttl: float) -> None:
        self._files = files
        self.name = name
        #: Path or URL of the pinned checkpoint directory.
        self.path = path
        self.ttl = ttl
        self._file = self._write()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def step(self) -> int | None:
        """The pinned step (None for a checkpoint directory that is not named after a step)."""
        return parse_step(self.name)

    def _write(self) -> str:
        expires_ms = int((time.time() + self.ttl) * 1000)
        file = f"{self.name}.{expires_ms}.{new_token()}.{LEASE}"
        self._files.put(file)
        return file

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name=f"ckptstore-lease-{self.name}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # a transient storage failure: try again next time, before expiry
                log.warning("could not renew the lease on %s: %s", self.path, e)

    def renew(self) -> None:
        """Extend the lease by its time to live (done in the background while it is held)."""
        old, self._file = self._file, self._write()  # the new one first: the pin never lapses
        self._files.remove(old)

    def release(self) -> None:
        """Unpin the checkpoint. Releasing twice does nothing."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        if self._file:
            self._files.remove(self._file)
            self._file = ""

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.path!r}, ttl={self.ttl})"


def acquire(storage: Storage, name: str, *, ttl: float | None = None) -> Lease | None:
    """Pin the checkpoint directory ``name`` of ``storage``; None if it is gone or being deleted."""
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf):
        raise CkptStoreError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
    files = LeaseDir(storage)
    lease = Lease(files, name, storage.url_of(name), knobs.current.lease_ttl_s if ttl is None else ttl)
    try:
        # Written first, looked second (see the module docstring): the order is what makes the pin safe.
        marked = any(p is not None and p[0] == name and p[1] == MARK for p in map(parse_entry, files.names()))
        usable = not marked and storage.is_committed(name)
    except BaseException:
        lease.release()
        raise
    if not usable:
        lease.release()
        return None
    lease._start_renewing()
    return lease


def pin(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None, ttl: float | None = None
) -> Lease:
    """Pin the checkpoint directory at ``path`` (as returned by ``wait_for_new_checkpoint``) against
    retention, until the lease is released; use it as a context manager::

        path = ckptstore.wait_for_new_checkpoint("s3://bucket/run", timeout=600)
        with ckptstore.pin(path):
            state = ckptstore.restore(path)

    Raises:
        CheckpointNotFoundError: ``path`` is no longer committed, or is being deleted.
    """
    storage, name = open_parent(path, storage_options)
    lease = acquire(storage, name, ttl=ttl)
    if lease is None:
        raise CheckpointNotFoundError(f"{storage.url_of(name)} is not committed, or is being deleted")
    return lease


def pinned_steps(storage: Storage) -> set[int]:
    """Steps that a live lease pins (one listing)."""
    pinned = (parse_step(n) for n in live_pins(LeaseDir(storage).names(), time.time()))
    return {s for s in pinned if s is not None}
