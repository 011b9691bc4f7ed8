"""The storage contract: step directory names, :class:`Storage` (a store root on some filesystem) and
:class:`Staging` (one save in progress on it).

Every method of both raises only :mod:`ckptstore.errors` types: a backend runs its filesystem calls inside
:meth:`Storage.named_errors` (the one wrapper, :func:`ckptstore.errors.storage_errors`), so callers never
see an ``OSError`` or a client library's own exception. What a backend can do beyond the basics is said
by its capability flags (:attr:`Storage.ranged_reads`, :attr:`Storage.supports_mmap`); callers branch on
those, never on a backend's class.

Paths given to a backend are relative to the store root, with '/' separators.

Nothing outside the root is ever deleted or written: a backend never follows a symlink found in the store
when it deletes, renames, creates or writes (deleting a link removes the link), and never lists a symlinked
step directory as a checkpoint. The root itself, and a checkpoint path the user names (their own link to a
checkpoint directory), are theirs: those are followed for reading.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, BinaryIO, ClassVar, Protocol, TypeVar

from ..errors import CkptStoreError, StorageError, storage_error, storage_errors

STEP_RE = re.compile(r"step_([0-9]{8,20})")
LOCK_NAME = ".ckptstore.lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

_T = TypeVar("_T")


def step_name(step: int) -> str:
    """The directory name of a step: ``step_`` and the step zero-padded to at least 8 digits."""
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a directory name, or None unless the name is exactly what :func:`step_name` gives."""
    m = STEP_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_name(step) == name else None


#: The most scans one listing makes while it finds no checkpoint and the root keeps changing.
MAX_SCANS = 8


def steps_of_stable_scans(scan: Callable[[], tuple[Hashable, list[int]]]) -> list[int]:
    """The committed steps of ``scan()`` (which returns what it read of the root, and the steps found). A scan
    is no snapshot: a commit and the deletion of the step before it can fall between its reads, so that it
    finds no checkpoint at a moment when one was committed throughout. An empty result is therefore only
    returned once two scans in a row read the same (each commit and each deletion changes what a scan reads,
    so a scan torn by one is followed by one that differs, and is repeated, at most :data:`MAX_SCANS` times
    for a root that never stops changing). A non-empty result is returned at once: each step in it was
    committed when it was looked at. An empty store costs two scans, any other one."""
    seen: Hashable = None
    steps: list[int] = []
    for _ in range(MAX_SCANS):
        read, steps = scan()
        if steps or read is None or read == seen:
            break
        seen = read
    return steps


def new_token() -> str:
    """A writer token: unique per save, recorded in the manifest and in data file names."""
    return uuid.uuid4().hex[:16]


class Readable(Protocol):
    """A file opened for ranged reads (what :meth:`Storage.open_read` returns)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def read(self, size: int = -1, /) -> bytes: ...
    def readinto(self, buffer: Any, /) -> int | None: ...
    def readinto_at(self, buffers: Sequence[memoryview], offset: int, /) -> int:
        """Fill ``buffers`` (writable byte views), in order, from the file's bytes at ``offset``, until they
        are full or the file ends; return the bytes read. Positional: several threads may call it at once
        (on a local file, each call is one ``preadv``, which releases the GIL), and the file position is
        left undefined."""
        ...

    def close(self) -> None: ...


#: Most buffers one positional read fills (Linux's IOV_MAX); longer lists are read in several calls.
MAX_READ_BUFFERS = 1024


class Storage(ABC):
    """A store root on some filesystem: the contract every backend keeps."""

    #: The root as the user should see it (path or URL).
    url: str
    #: Capability: every read is a request with a latency of its own (object stores). Readers then fetch
    #: byte ranges through :meth:`read_range`, coalesced and several at once, rather than seek and read.
    ranged_reads: ClassVar[bool] = False
    #: Capability: :meth:`map_file` maps a file into memory (local disks).
    supports_mmap: ClassVar[bool] = False
    #: Data files are files of this machine's filesystem, which a direct write (``O_DIRECT``) can go to:
    #: a tensor file then puts each large tensor at its page offset, behind padding (``tensorio.plan_files``).
    local_files: ClassVar[bool] = False
    #: The exceptions of this backend's filesystem calls that :meth:`named_errors` turns into StorageError.
    failures: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    def named_errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """The wrapper a backend runs its filesystem calls in: failures come out as StorageError naming
        ``what`` (the operation and the path or URL), with errno kept."""
        return storage_errors(what, catch=self.failures, describe=self.describe_failure)

    def describe_failure(self, e: BaseException, what: str) -> StorageError | None:
        """A more telling error than the generic one for a failure this backend knows (credentials,
        permissions, an unreachable endpoint), or None."""
        return None

    @abstractmethod
    def url_of(self, rel: str) -> str:
        """Path or URL of something under the root, as a user would pass it back to ckptstore."""

    # --- writing checkpoints ------------------------------------------------------------------------

    @abstractmethod
    def begin(self, name: str, token: str) -> Staging:
        """Start writing a checkpoint directory ``name`` (relative to the root)."""

    def join(self, name: str, token: str) -> Staging:
        """Write data files into the save that another process began with ``begin(name, token)`` (another
        rank of a save across processes). That process alone commits or aborts the checkpoint: this
        staging's ``commit`` is refused and its ``abort`` removes only the files it wrote."""
        raise CkptStoreError(f"{type(self).__name__} cannot take part in a save across processes")

    @abstractmethod
    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialise commits, deletions and clean-ups (between processes where the filesystem allows)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint directory: its manifest first, then its data. Call under
        :meth:`lock`. Deleting what does not exist does nothing; deleting a symlink removes the link, never
        what it points to."""

    @abstractmethod
    def clean_leftovers(self) -> list[str]:
        """Remove what crashed writers left (temp data, half-deleted steps); return what was removed.
        Call under :meth:`lock`."""

    # --- listing and reading ------------------------------------------------------------------------

    @abstractmethod
    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists, ascending, listed fresh (no cached listing). While any checkpoint
        is committed, the listing shows at least one, even when a commit and a deletion run during it (a
        directory read is no snapshot: see ``LocalStorage.committed_steps``)."""

    @abstractmethod
    def is_committed(self, name: str) -> bool:
        """Whether the checkpoint directory ``name`` has its manifest."""

    def is_occupied(self, name: str) -> bool:
        """Whether something other than a committed checkpoint lies at ``name`` that a commit there would
        replace (a local commit replaces what it finds; a manifest-last commit leaves other objects be)."""
        return False

    @abstractmethod
    def read_bytes(self, rel: str, limit: int) -> bytes:
        """A whole small file (a manifest). Raises CheckpointNotFoundError if it does not exist,
        CorruptCheckpointError if it is larger than ``limit``."""

    @abstractmethod
    def open_read(self, rel: str) -> Readable:
        """A file for ranged reads (``seek`` + ``readinto``); the caller closes it. Raises
        CorruptCheckpointError if it does not exist."""

    @abstractmethod
    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (fewer at its end): one request on an object store. Raises
        CorruptCheckpointError if it does not exist."""

    def map_file(self, rel: str) -> Any:
        """A whole file mapped into memory, private and copy-on-write (an ``mmap`` object; pages are read
        on first touch). Only where :attr:`supports_mmap`."""
        raise CkptStoreError(f"{type(self).__name__} cannot map files into memory")

    @abstractmethod
    def sizes(self, rel_dir: str) -> dict[str, int]:
        """Names and sizes of the files in a directory ({} if it does not exist, or vanishes meanwhile)."""

    # --- small files beside the checkpoints (readers' leases) ---------------------------------------

    @abstractmethod
    def put(self, rel: str, data: bytes = b"") -> None:
        """Write a small file (creating its directory); never follows a symlink, the file's or its
        directory's (StorageError)."""

    @abstractmethod
    def listdir(self, rel_dir: str) -> list[str]:
        """Names in a directory, listed fresh ([] if it does not exist); a directory that is a symlink is
        refused (StorageError)."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Remove a small file; a missing one is no error; never through a symlinked directory."""


#: :meth:`Staging.write_all` keeps at most this many files open before making them durable.
_MAX_UNSYNCED = 32


class Staging(ABC):
    """One save in progress: a place to write data files, then commit or abort."""

    #: Relative directory the data files go to (``write`` takes names inside it).
    dir: str
    storage: Storage
    #: :meth:`write_all` makes its files durable together, after the last is filled (a local disk).
    sync_together: ClassVar[bool] = False

    def write(self, name: str, fill: Callable[[BinaryIO], _T]) -> _T:
        """Create the data file ``name``, let ``fill(f)`` write it, and make it durable (fsync, or the
        upload completed); return what ``fill`` returned.

        If ``fill`` raises, the file is discarded (an upload in parts is aborted, not completed) and the
        error passes on, except that failures of the filesystem (an OSError out of ``fill``: its writes to
        ``f``) become StorageErrors naming the file, errno kept.
        """
        return self._write(name, fill, None)

    def write_all(self, files: Sequence[tuple[str, Callable[[BinaryIO], _T]]]) -> list[_T]:
        """:meth:`write` each of ``files`` in turn; every one is durable once this returns (and none is
        known to be before). Where :attr:`sync_together`, the files are made durable together after the
        last is filled (on a local disk one journal commit then serves them all, where a sync each would
        cost one each); on any failure the files not yet durable are closed and left to :meth:`abort`."""
        if not self.sync_together:
            return [self._write(name, fill, None) for name, fill in files]
        unsynced: list[tuple[str, BinaryIO]] = []
        try:
            results = []
            for name, fill in files:
                results.append(self._write(name, fill, unsynced))
                if len(unsynced) == _MAX_UNSYNCED:
                    self._sync(unsynced)
            self._sync(unsynced)
            return results
        finally:
            for _, raw in unsynced:
                with contextlib.suppress(Exception):
                    self._discard(raw)

    def _sync(self, unsynced: list[tuple[str, BinaryIO]]) -> None:
        """Make each file of ``unsynced`` durable and close it, taking it off the list first (a failed sync
        has closed it already)."""
        while unsynced:
            name, raw = unsynced.pop(0)
            with self.storage.named_errors(self._what(name)):
                self._close(raw)

    def _what(self, name: str) -> str:
        return f"writing {self.storage.url_of(f'{self.dir}/{name}')}"

    def _write(self, name: str, fill: Callable[[BinaryIO], _T], unsynced: list[tuple[str, BinaryIO]] | None) -> _T:
        """:meth:`write`; with ``unsynced``, the filled file is added to it, open, rather than closed."""
        what = self._what(name)
        with self.storage.named_errors(what):
            raw = self._open(name)
        # A file whose failures are all OSErrors is handed over as it is (a Python layer on each of 100,000
        # small writes costs more than the writes); others (client libraries) are wrapped to name theirs.
        f = raw if self.storage.failures == (OSError,) else _NamedFile(raw, what, self.storage)
        try:
            result = fill(f)  # type: ignore[arg-type]
        except BaseException as e:
            with contextlib.suppress(Exception):
                self._discard(raw)
            if isinstance(e, OSError) and not isinstance(e, CkptStoreError):
                raise storage_error(e, what) from e  # the file's own failure
            raise
        if unsynced is not None:
            unsynced.append((name, raw))
            return result
        with self.storage.named_errors(what):
            self._close(raw)
        return result

    @abstractmethod
    def _open(self, name: str) -> BinaryIO:
        """A new data file."""

    @abstractmethod
    def _close(self, f: BinaryIO) -> None:
        """Flush, make durable and close a data file."""

    def _discard(self, f: BinaryIO) -> None:
        """Close a data file that will not be used (its content is removed by :meth:`abort`)."""
        f.close()

    @abstractmethod
    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        """Publish the checkpoint atomically. Raises CheckpointExistsError if the step is taken."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever this save wrote (best effort; leftovers are cleaned by a later writer)."""

    def adopt(self, names: list[str]) -> None:  # noqa: B027 - optional hook; local staging needs nothing
        """Count data files that other processes wrote into :attr:`dir` (the other ranks of a save
        across processes) as this save's own: commit keeps them, abort removes them."""


class _NamedFile:
    """A data file being written whose failures are StorageErrors naming it (the writer calls ``write``,
    ``flush`` and ``fileno`` only)."""

    __slots__ = ("_f", "_failures", "_what")

    def __init__(self, f: BinaryIO, what: str, storage: Storage) -> None:
        self._f, self._what, self._failures = f, what, storage.failures

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e

    def flush(self) -> None:
        try:
            self._f.flush()
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e

    def fileno(self) -> int:
        return self._f.fileno()  # a hint only (writeback); a file without one raises, and that is fine


class NamedReader:
    """A file being read whose failures are StorageErrors naming it."""

    __slots__ = ("_f", "_failures", "_fd", "_lock", "_what")

    def __init__(self, f: Any, what: str, storage: Storage) -> None:
        self._f, self._what, self._failures = f, what, storage.failures
        # An OS file's positional reads need no lock; any other file's are a seek and reads under one.
        self._fd = f.fileno() if isinstance(f, io.FileIO) and hasattr(os, "preadv") else None
        self._lock = threading.Lock()

    def seek(self, offset: int, whence: int = 0, /) -> int:
        try:
            return int(self._f.seek(offset, whence))
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e

    def read(self, size: int = -1, /) -> bytes:
        try:
            return bytes(self._f.read(size))
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e

    def readinto(self, buffer: Any, /) -> int | None:
        try:
            n = self._f.readinto(buffer)
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e
        return None if n is None else int(n)

    def readinto_at(self, buffers: Sequence[memoryview], offset: int, /) -> int:
        try:
            if self._fd is not None:
                return _preadv_all(self._fd, buffers, offset)
            with self._lock:
                self._f.seek(offset)
                got = 0
                for buf in buffers:
                    filled = 0
                    while filled < len(buf):
                        n = self._f.readinto(buf[filled:])
                        if not n:
                            return got + filled
                        filled += n
                    got += filled
                return got
        except CkptStoreError:
            raise
        except self._failures as e:
            raise storage_error(e, self._what) from e

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()

    def __enter__(self) -> NamedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _preadv_all(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    """``os.preadv`` until ``buffers`` are full or the file ends (a call may return fewer bytes)."""
    views = list(buffers)
    got, i = 0, 0
    while i < len(views):
        n = os.preadv(fd, views[i : i + MAX_READ_BUFFERS], offset + got)
        if not n:
            break
        got += n
        while n and i < len(views):  # skip the buffers filled; cut the one filled in part
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return got
