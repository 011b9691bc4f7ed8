"""Where checkpoints live, and how one is committed there.

Two backends, chosen by what the filesystem can do, not by the URL's scheme:

* :class:`LocalStorage` (a POSIX directory; atomic rename). A save writes into a hidden temp directory
  ``.tmp-<step>-<token>`` in the root, fsyncs every file, writes the manifest, fsyncs the directory,
  renames it to ``step_XXXXXXXX`` and fsyncs the root. A partial directory is never visible under a step
  name. A file lock in the root serialises commits, deletions and clean-ups between processes.
* :class:`FsspecStorage` (any fsspec filesystem: S3, GCS, memory://, ...; no atomic rename). Data objects
  go straight under the final prefix; the manifest is written last in one PUT, as an exclusive create
  where the filesystem offers one (S3: ``If-None-Match: *``), so two writers cannot both commit one step.

Both expose the same small interface, used by :mod:`ckptstore.store`. Paths given to a backend are
relative to the store root, with '/' separators.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import shutil
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, BinaryIO

import filelock
import fsspec
import fsspec.implementations.local

from . import knobs, multipart, retry
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StorageError,
)
from .manifest import MANIFEST_NAME
from .tensorio import Readable

STEP_RE = re.compile(r"step_([0-9]{8,20})")
LOCK_NAME = ".ckptstore.lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


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


def new_token() -> str:
    """A writer token: unique per save, recorded in the manifest and in data file names."""
    return uuid.uuid4().hex[:16]


class Staging(ABC):
    """One save in progress: a place to write data files, then commit or abort."""

    #: Relative directory the data files go to (``open`` takes names inside it).
    dir: str

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A new data file; it is made durable by :meth:`close_file`."""

    @abstractmethod
    def close_file(self, f: BinaryIO) -> None:
        """Flush, make durable (fsync where the filesystem has it) and close a data file."""

    @abstractmethod
    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        """Publish the checkpoint atomically. Raises CheckpointExistsError if the step is taken."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever this save wrote (best effort; leftovers are cleaned by a later writer)."""

    def adopt(self, names: list[str]) -> None:  # noqa: B027 - optional hook; local staging needs nothing
        """Count data files that other processes wrote into :attr:`dir` (the other ranks of a distributed
        save) as this save's own: commit keeps them, abort removes them."""


class Storage(ABC):
    """A store root on some filesystem."""

    #: Whether a directory can be published by one atomic rename.
    atomic_rename: bool
    #: The root as the user should see it (path or URL).
    url: str

    @abstractmethod
    def url_of(self, rel: str) -> str:
        """Path or URL of something under the root, as a user would pass it back to ckptstore."""

    @abstractmethod
    def begin(self, name: str, token: str) -> Staging:
        """Start writing a checkpoint directory ``name`` (relative to the root)."""

    def join(self, name: str, token: str) -> Staging:
        """Write data files into the save that another process began with ``begin(name, token)`` (another
        rank of a distributed save). That process alone commits or aborts the checkpoint: this staging's
        ``commit`` is refused and its ``abort`` removes only the files it wrote."""
        raise CkptStoreError(f"{type(self).__name__} cannot take part in a save across processes")

    @abstractmethod
    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialise commits, deletions and clean-ups (between processes where the filesystem allows)."""

    @abstractmethod
    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists, ascending, listed fresh (no cached listing)."""

    @abstractmethod
    def read_bytes(self, rel: str, limit: int) -> bytes:
        """A whole small file (a manifest); raises CheckpointNotFoundError if it does not exist."""

    @abstractmethod
    def open_read(self, rel: str) -> Readable:
        """A file for ranged reads (``seek`` + ``readinto``); the caller closes it."""

    @abstractmethod
    def sizes(self, rel_dir: str) -> dict[str, int]:
        """Names and sizes of the files in a directory."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint directory: its manifest first, then its data. Call under
        :meth:`lock`. Deleting what does not exist does nothing."""

    @abstractmethod
    def is_committed(self, name: str) -> bool:
        """Whether the checkpoint directory ``name`` has its manifest."""

    @abstractmethod
    def clean_leftovers(self) -> list[str]:
        """Remove what crashed writers left (temp data, half-deleted steps); return what was removed.
        Call under :meth:`lock`."""


# --- local disk -------------------------------------------------------------------------------------


class LocalOps:
    """The filesystem calls that change a local store, one method each.

    Durability comes from exactly these calls: :meth:`fsync` of every file written, :meth:`fsync_dir` of a
    directory after its entries changed. They are methods so that a test can put a wrapper in between
    (fault injection at the k-th call, power-loss simulation: see tests/faults.py).
    """

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def create(self, path: str) -> BinaryIO:
        """A new file for writing; fails if ``path`` exists."""
        return open(path, "xb", buffering=1 << 20)

    def fsync(self, f: BinaryIO) -> None:
        """Flush a file written through :meth:`create` and make its data durable."""
        f.flush()
        os.fsync(f.fileno())

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries (files created, renamed or removed in it) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmtree(self, path: str) -> None:
        """Remove a directory tree, best effort (a later clean-up finishes what is left)."""
        shutil.rmtree(path, ignore_errors=True)


class _ProcessLock:
    """A lock between threads of this process and, through a lock file, between processes."""

    def __init__(self, path: str) -> None:
        self._thread_lock = threading.RLock()
        self._file_lock = filelock.FileLock(path, thread_local=False, preserve_lock_file=True)

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            self._file_lock.acquire()
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._file_lock.release()
        finally:
            self._thread_lock.release()


class _LocalStaging(Staging):
    def __init__(self, storage: LocalStorage, name: str, token: str) -> None:
        self.storage = storage
        self.final_name = name
        self.dir = f"{TMP_PREFIX}{name}-{token}"
        self.path = os.path.join(storage.root, self.dir)
        self.ops = storage.ops
        # Held for as long as this writer lives: a cleaner that can take it knows the writer is dead.
        self._alive_fd = os.open(self.path + ".alive", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._alive_fd, fcntl.LOCK_EX)
        try:
            self.ops.mkdir(self.path)
        except BaseException:
            self.abort()  # the directory may exist all the same (an error reported after the fact)
            raise

    def open(self, name: str) -> BinaryIO:
        return self.ops.create(os.path.join(self.path, name))

    def close_file(self, f: BinaryIO) -> None:
        try:
            self.ops.fsync(f)
        finally:
            f.close()

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        f = self.ops.create(os.path.join(self.path, MANIFEST_NAME))
        try:
            f.write(manifest)
            self.ops.fsync(f)
        finally:
            f.close()
        self.ops.fsync_dir(self.path)
        final = os.path.join(self.storage.root, self.final_name)
        with self.storage.lock():
            if os.path.exists(os.path.join(final, MANIFEST_NAME)):
                if not overwrite:
                    raise CheckpointExistsError(f"{final} is already committed")
                self.storage.delete(self.final_name)
            elif os.path.exists(final):  # a half-deleted step: its manifest is gone already
                self.storage._remove_tree(final)
            self.ops.rename(self.path, final)
            try:
                self.ops.fsync_dir(self.storage.root)
            except BaseException:
                # Not durable, so not committed: a save that raises leaves no checkpoint behind.
                with contextlib.suppress(Exception):
                    self.storage.delete(self.final_name)
                raise
        self._release()

    def abort(self) -> None:
        self.ops.rmtree(self.path)
        self._release()

    def _release(self) -> None:
        if self._alive_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".alive")
            os.close(self._alive_fd)
            self._alive_fd = -1


class _LocalJoined(Staging):
    """A share of a save begun by another process, in its temp directory (shared disk)."""

    def __init__(self, storage: LocalStorage, name: str, token: str) -> None:
        self.dir = f"{TMP_PREFIX}{name}-{token}"
        self.path = os.path.join(storage.root, self.dir)
        self.ops = storage.ops
        self.written: list[str] = []

    def open(self, name: str) -> BinaryIO:
        path = os.path.join(self.path, name)
        self.written.append(path)
        return self.ops.create(path)

    def close_file(self, f: BinaryIO) -> None:
        try:
            self.ops.fsync(f)
        finally:
            f.close()

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        raise CkptStoreError(f"{self.path}: only the process that began a save commits it")

    def abort(self) -> None:
        for path in self.written:
            with contextlib.suppress(OSError):
                os.unlink(path)


class LocalStorage(Storage):
    """A store on a local (POSIX) filesystem; commits by atomic rename."""

    atomic_rename = True

    def __init__(self, root: str | os.PathLike[str], ops: LocalOps | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root
        self.ops = ops or LocalOps()
        self._lock = _ProcessLock(os.path.join(self.root, LOCK_NAME))

    def url_of(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def begin(self, name: str, token: str) -> Staging:
        os.makedirs(self.root, exist_ok=True)  # only writers create the root; readers never do
        return _LocalStaging(self, name, token)

    def join(self, name: str, token: str) -> Staging:
        return _LocalJoined(self, name, token)

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        os.makedirs(self.root, exist_ok=True)  # the lock file lives in the root
        return self._lock

    def committed_steps(self) -> list[int]:
        steps = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise StorageError(f"{self.root} is a file, not a store directory") from None
        for entry in entries:
            step = parse_step(entry.name)
            if step is not None and os.path.exists(os.path.join(entry.path, MANIFEST_NAME)):
                steps.append(step)
        return sorted(steps)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def read_bytes(self, rel: str, limit: int) -> bytes:
        try:
            with self._open_file(rel) as f:
                # Read what is there, not limit + 1 bytes: a read of n bytes allocates n bytes up front.
                data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.url_of(rel)} does not exist") from None
        if len(data) > limit:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is larger than {limit} bytes")
        return data

    def open_read(self, rel: str) -> Readable:
        try:
            return self._open_file(rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is missing") from None

    def _open_file(self, rel: str) -> io.FileIO:
        """A regular file of a checkpoint, opened for reading. A symlink (which could point anywhere) or
        anything but a regular file is refused: a checkpoint's files are its own."""
        path = self._path(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as e:
            why = "is a symlink" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
            raise CorruptCheckpointError(f"{path} {why}; refused") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptCheckpointError(f"{path} is not a regular file; refused")
        return open(fd, "rb", buffering=0)

    def sizes(self, rel_dir: str) -> dict[str, int]:
        try:
            entries = list(os.scandir(self._path(rel_dir)))
        except FileNotFoundError:
            return {}
        return {e.name: e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False)}

    def is_committed(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.root, name, MANIFEST_NAME))

    def delete(self, name: str) -> None:
        path = os.path.join(self.root, name)
        try:
            self.ops.unlink(os.path.join(path, MANIFEST_NAME))
        except FileNotFoundError:
            return
        self.ops.fsync_dir(path)  # the manifest is gone for good before any data goes
        self._remove_tree(path)

    def _remove_tree(self, path: str) -> None:
        # Rename first, so a crash half-way leaves a .trash- directory, never a step name with half its files.
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{os.path.basename(path)}-{new_token()}")
        self.ops.rename(path, trash)
        self.ops.rmtree(trash)

    def clean_leftovers(self) -> list[str]:
        removed = []
        for entry in list(os.scandir(self.root)):
            name = entry.name
            if name.startswith(TRASH_PREFIX):
                self.ops.rmtree(entry.path)
            elif name.startswith(TMP_PREFIX):
                tmp = entry.path.removesuffix(".alive")
                if not self._writer_dead(tmp):
                    continue
                self.ops.rmtree(tmp)
                with contextlib.suppress(FileNotFoundError):
                    self.ops.unlink(tmp + ".alive")
            elif parse_step(name) is not None and entry.is_dir() and not self.is_committed(name):
                # Never a save in progress (those live in .tmp- directories): a deletion cut short.
                self._remove_tree(entry.path)
            else:
                continue
            removed.append(name)
        return removed

    @staticmethod
    def _writer_dead(tmp_path: str) -> bool:
        try:
            fd = os.open(tmp_path + ".alive", os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        finally:
            os.close(fd)
        return True


# --- any fsspec filesystem --------------------------------------------------------------------------

_FS_LOCKS: dict[str, threading.RLock] = {}
_FS_LOCKS_GUARD = threading.Lock()


class _FsspecStaging(Staging):
    def __init__(self, storage: FsspecStorage, name: str, token: str) -> None:
        self.storage = storage
        self.token = token
        self.dir = name
        self.written: list[str] = []
        self._manifest: bytes | None = None  # set once the manifest PUT has been tried

    def open(self, name: str) -> BinaryIO:
        path = self.storage._path(f"{self.dir}/{name}")
        self.written.append(path)
        return self.storage._open_write(path)

    def close_file(self, f: BinaryIO) -> None:
        f.close()  # object stores: the object exists, complete, once close returns

    def adopt(self, names: list[str]) -> None:
        self.written.extend(self.storage._path(f"{self.dir}/{n}") for n in names)

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        fs = self.storage.fs
        path = self.storage._path(f"{self.dir}/{MANIFEST_NAME}")
        with self.storage.lock():
            if overwrite and self.storage.is_committed(self.dir):
                self.storage.delete(self.dir, keep=set(self.written))
            self._manifest = manifest
            try:
                # One PUT with If-None-Match: *; retried (by botocore, and by retry.call) when it fails
                # transiently, which is how the trap below is met.
                retry.call(fs.pipe_file, path, manifest, mode="create", what=f"writing {self.storage.url_of(path)}")
            except Exception as e:
                if not retry.is_precondition_failed(e):
                    raise
                # The retry trap: our own PUT may have succeeded with its response lost, and its retry got
                # 412. The manifest holds this writer's token, so equal bytes mean ours.
                if not self._is_ours(path, manifest):
                    self._manifest = None  # somebody else's: abort must leave it alone
                    raise CheckpointExistsError(f"{self.storage.url_of(self.dir)} is already committed") from None

    def _is_ours(self, path: str, manifest: bytes) -> bool:
        try:
            # cat_file is a plain GET: no cached size or ETag of an earlier listing is involved.
            found = retry.call(self.storage.fs.cat_file, path, what=f"reading {self.storage.url_of(path)}")
        except FileNotFoundError:
            return False
        return bool(found == manifest)

    def abort(self) -> None:
        if self._manifest is not None:
            # The manifest PUT failed, or seemed to: it may have landed all the same. Remove it first if it
            # is ours; if we cannot tell, remove nothing, since a committed checkpoint must keep its data
            # (an uncommitted one is a leftover that a later writer cleans).
            path = self.storage._path(f"{self.dir}/{MANIFEST_NAME}")
            try:
                if self._is_ours(path, self._manifest):
                    self.storage.fs.rm_file(path)
            except Exception:
                return
        for path in self.written:
            with contextlib.suppress(Exception):
                self.storage.fs.rm_file(path)


class FsspecStorage(Storage):
    """A store on any fsspec filesystem; commits by writing the manifest last.

    Not safe for concurrent *deletions* from several processes (there is no cross-process lock on an
    object store); concurrent commits are, where the filesystem has an exclusive create (S3, local).
    """

    atomic_rename = False

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = fs.unstrip_protocol(self.root)
        key = f"{type(fs).__module__}.{type(fs).__qualname__}:{self.url}"
        with _FS_LOCKS_GUARD:
            self._lock = _FS_LOCKS.setdefault(key, threading.RLock())

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        return str(self.fs.unstrip_protocol(self._path(rel)))

    def begin(self, name: str, token: str) -> Staging:
        return _FsspecStaging(self, name, token)

    def join(self, name: str, token: str) -> Staging:
        return _FsspecStaging(self, name, token)  # never committed by its holder: abort removes its own files

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock

    def _refresh(self) -> None:
        self.fs.invalidate_cache(self.root)

    def _find(self) -> list[str]:
        """Every object under the root, relative, listed fresh."""
        self._refresh()
        try:
            # s3fs lists a whole prefix (no delimiter) afresh on every find; only per-directory listings
            # are cached, and the invalidation above drops those of the root and its parents.
            found = retry.call(self.fs.find, self.root, withdirs=False, what=f"listing {self.url}")
        except FileNotFoundError:
            return []
        prefix = self.root + "/"
        return [p[len(prefix) :] for p in found if p.startswith(prefix)]

    def committed_steps(self) -> list[int]:
        steps = set()
        for rel in self._find():
            parent, _, name = rel.partition("/")
            if name == MANIFEST_NAME and (step := parse_step(parent)) is not None:
                steps.add(step)
        return sorted(steps)

    def read_bytes(self, rel: str, limit: int) -> bytes:
        path = self._path(rel)
        try:
            # A plain GET (no cached size or ETag: fs.open would check them, and a manifest replaced by
            # another process since our last listing would fail as "expired").
            data = retry.call(self.fs.cat_file, path, start=0, end=limit + 1, what=f"reading {self.url_of(rel)}")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.url_of(rel)} does not exist") from None
        if len(data) > limit:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is larger than {limit} bytes")
        return bytes(data)

    def open_read(self, rel: str) -> Readable:
        try:
            return self.fs.open(self._path(rel), "rb")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is missing") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file, in one ranged GET (retried when it fails transiently)."""
        try:
            data = retry.call(
                self.fs.cat_file, self._path(rel), start=start, end=end, what=f"reading {self.url_of(rel)}"
            )
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is missing") from None
        return bytes(data)

    def _open_write(self, path: str) -> BinaryIO:
        if multipart.supported(self.fs):
            return multipart.ParallelUpload(self.fs, path)  # type: ignore[return-value]
        try:
            return self.fs.open(path, "wb")
        except FileNotFoundError:
            # A filesystem with real directories (file://, sftp): the step's directory comes first.
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            return self.fs.open(path, "wb")

    def sizes(self, rel_dir: str) -> dict[str, int]:
        path = self._path(rel_dir)
        self.fs.invalidate_cache(path)
        try:
            entries = retry.call(self.fs.ls, path, detail=True, what=f"listing {self.url_of(rel_dir)}")
        except FileNotFoundError:
            return {}
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    def is_committed(self, name: str) -> bool:
        path = self._path(f"{name}/{MANIFEST_NAME}")
        self.fs.invalidate_cache(self._path(name))
        return bool(retry.call(self.fs.exists, path, what=f"looking up {self.url_of(name)}"))

    def delete(self, name: str, keep: set[str] | None = None) -> None:
        base = self._path(name)
        if not self.is_committed(name):
            return
        # The manifest first: from here on no reader lists or opens this checkpoint.
        retry.call(self.fs.rm_file, f"{base}/{MANIFEST_NAME}", what=f"deleting {self.url_of(name)}")
        self._refresh()
        paths = [p for p in self._list_dir(base) if not keep or p not in keep]
        if paths:
            retry.call(self.fs.rm, paths, what=f"deleting {self.url_of(name)}")

    def _list_dir(self, base: str) -> list[str]:
        self.fs.invalidate_cache(base)
        try:
            return [str(p) for p in retry.call(self.fs.find, base, withdirs=False, what=f"listing {base}")]
        except FileNotFoundError:
            return []

    def clean_leftovers(self) -> list[str]:
        """Remove step prefixes without a manifest whose objects are all older than the grace period
        (a writer may still be uploading into a younger one)."""
        removed = []
        by_step: dict[str, list[str]] = {}
        for rel in self._find():
            parent, _, name = rel.partition("/")
            if parse_step(parent) is not None:
                by_step.setdefault(parent, []).append(name)
        now = time.time()
        for parent, names in by_step.items():
            if MANIFEST_NAME in names:
                continue
            paths = [self._path(f"{parent}/{n}") for n in names]
            if all(now - self._modified(p) > knobs.current.stale_after_s for p in paths):
                retry.call(self.fs.rm, paths, what=f"removing leftovers of {self.url_of(parent)}")
                removed.append(parent)
        return removed

    def _modified(self, path: str) -> float:
        try:
            return float(self.fs.modified(path).timestamp())
        except (NotImplementedError, FileNotFoundError, AttributeError):
            return 0.0


def open_storage(
    url_or_path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
) -> Storage:
    """The backend for a path or URL: local directories commit by rename, everything else manifest-last.
    A :class:`Storage` object is used as it is (tests pass wrappers that inject faults)."""
    if isinstance(url_or_path, Storage):
        return url_or_path
    if isinstance(url_or_path, os.PathLike) or ("://" not in str(url_or_path) and "::" not in str(url_or_path)):
        return LocalStorage(url_or_path)
    fs, root = url_to_fs(str(url_or_path), storage_options)
    return storage_for(fs, root)


def url_to_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url}: {e}") from e
    return fs, str(path)


def storage_for(fs: fsspec.AbstractFileSystem, root: str) -> Storage:
    """The backend for a directory of a filesystem, by what the filesystem can do."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return LocalStorage(root)
    return FsspecStorage(fs, root)
