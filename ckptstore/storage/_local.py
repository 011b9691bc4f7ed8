"""Local (POSIX) directories: commit by fsync + atomic rename, a file lock between processes."""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import shutil
import stat
import threading
from typing import Any, BinaryIO

import filelock

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StorageError,
)
from ..manifest import MANIFEST_NAME
from ._base import LOCK_NAME, TMP_PREFIX, TRASH_PREFIX, NamedReader, Readable, Staging, Storage, new_token, parse_step

try:
    import fcntl
except ImportError:  # not POSIX (Windows): importing works, writing a local store is refused
    fcntl = None  # type: ignore[assignment]


def _flock(fd: int, flags: int) -> None:
    if fcntl is None:
        raise StorageError("local stores need POSIX file locks (flock): Linux or macOS")
    fcntl.flock(fd, flags)


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

    def sync_close(self, f: BinaryIO) -> None:
        """Make a data file durable, then close it (closed even when the sync fails)."""
        try:
            self.fsync(f)
        finally:
            f.close()

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
        self._path = path
        self._thread_lock = threading.RLock()
        self._file_lock: filelock.BaseFileLock | None = None  # made on first use: readers never lock

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._file_lock is None:
                self._file_lock = filelock.FileLock(self._path, thread_local=False, preserve_lock_file=True)
            self._file_lock.acquire()
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            assert self._file_lock is not None
            self._file_lock.release()
        finally:
            self._thread_lock.release()


class _LocalStaging(Staging):
    storage: LocalStorage

    def __init__(self, storage: LocalStorage, name: str, token: str) -> None:
        self.storage = storage
        self.final_name = name
        self.dir = f"{TMP_PREFIX}{name}-{token}"
        self.path = os.path.join(storage.root, self.dir)
        self.ops = storage.ops
        # Held for as long as this writer lives: a cleaner that can take it knows the writer is dead.
        self._alive_fd = -1
        with storage.named_errors(f"saving {storage.url_of(name)}"):
            self._alive_fd = os.open(self.path + ".alive", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                _flock(self._alive_fd, fcntl.LOCK_EX if fcntl else 0)
                self.ops.mkdir(self.path)
            except BaseException:
                self.abort()  # the directory may exist all the same (an error reported after the fact)
                raise

    def _open(self, name: str) -> BinaryIO:
        return self.ops.create(os.path.join(self.path, name))

    def _close(self, f: BinaryIO) -> None:
        self.ops.sync_close(f)

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        final = os.path.join(self.storage.root, self.final_name)
        with self.storage.named_errors(f"committing {final}"):
            f = self.ops.create(os.path.join(self.path, MANIFEST_NAME))
            try:
                f.write(manifest)
                self.ops.fsync(f)
            finally:
                f.close()
            self.ops.fsync_dir(self.path)
            with self.storage.lock():
                if os.path.exists(os.path.join(final, MANIFEST_NAME)):
                    if not overwrite:
                        raise CheckpointExistsError(f"{final} is already committed")
                    self.storage.delete(self.final_name)
                elif os.path.lexists(final):  # a half-deleted step: its manifest is gone already
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

    storage: LocalStorage

    def __init__(self, storage: LocalStorage, name: str, token: str) -> None:
        self.dir = f"{TMP_PREFIX}{name}-{token}"
        self.path = os.path.join(storage.root, self.dir)
        self.ops = storage.ops
        self.storage = storage
        self.written: list[str] = []

    def _open(self, name: str) -> BinaryIO:
        path = os.path.join(self.path, name)
        self.written.append(path)
        return self.ops.create(path)

    def _close(self, f: BinaryIO) -> None:
        self.ops.sync_close(f)

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        raise CkptStoreError(f"{self.path}: only the process that began a save commits it")

    def abort(self) -> None:
        for path in self.written:
            with contextlib.suppress(OSError):
                os.unlink(path)


class LocalStorage(Storage):
    """A store on a local (POSIX) filesystem; commits by atomic rename, files can be mapped."""

    supports_mmap = True

    def __init__(self, root: str | os.PathLike[str], ops: LocalOps | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root
        self.ops = ops or LocalOps()
        self._lock = _ProcessLock(os.path.join(self.root, LOCK_NAME))

    def url_of(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def _path(self, rel: str) -> str:
        return self.url_of(rel)

    def begin(self, name: str, token: str) -> Staging:
        with self.named_errors(f"creating {self.root}"):
            os.makedirs(self.root, exist_ok=True)  # only writers create the root; readers never do
        return _LocalStaging(self, name, token)

    def join(self, name: str, token: str) -> Staging:
        return _LocalJoined(self, name, token)

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        with self.named_errors(f"creating {self.root}"):
            os.makedirs(self.root, exist_ok=True)  # the lock file lives in the root
        return _NamedLock(self._lock, self)

    def committed_steps(self) -> list[int]:
        steps = []
        with self.named_errors(f"listing {self.root}"):
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

    def read_bytes(self, rel: str, limit: int) -> bytes:
        with self.named_errors(f"reading {self.url_of(rel)}"):
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
        return NamedReader(self._open_data(rel), f"reading {self.url_of(rel)}", self)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with self._open_data(rel) as f, self.named_errors(f"reading {self.url_of(rel)}"):
            return os.pread(f.fileno(), max(0, end - start), start)

    def map_file(self, rel: str) -> mmap.mmap:
        with self._open_data(rel) as f, self.named_errors(f"mapping {self.url_of(rel)}"):
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def _open_data(self, rel: str) -> io.FileIO:
        with self.named_errors(f"opening {self.url_of(rel)}"):
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
        out = {}
        with self.named_errors(f"listing {self.url_of(rel_dir)}"):
            try:
                entries = list(os.scandir(self._path(rel_dir)))
            except FileNotFoundError:
                return {}
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        out[e.name] = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # deleted meanwhile (retention): as if it was never listed
                    continue
        return out

    def is_committed(self, name: str) -> bool:
        with self.named_errors(f"looking up {self.url_of(name)}"):
            return os.path.exists(os.path.join(self.root, name, MANIFEST_NAME))

    def is_occupied(self, name: str) -> bool:
        path = os.path.join(self.root, name)
        with self.named_errors(f"looking up {path}"):
            if not os.path.lexists(path):
                return False
            try:
                with os.scandir(path) as entries:
                    return next(entries, None) is not None
            except NotADirectoryError:
                return True

    def delete(self, name: str) -> None:
        path = os.path.join(self.root, name)
        with self.named_errors(f"deleting {path}"):
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
        with self.named_errors(f"cleaning {self.root}"):
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
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if fcntl else 0)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        finally:
            os.close(fd)
        return True

    def put(self, rel: str, data: bytes = b"") -> None:
        path = self._path(rel)
        with self.named_errors(f"writing {path}"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with open(fd, "wb") as f:
                f.write(data)

    def listdir(self, rel_dir: str) -> list[str]:
        with self.named_errors(f"listing {self.url_of(rel_dir)}"):
            try:
                return os.listdir(self._path(rel_dir))
            except FileNotFoundError:
                return []

    def remove(self, rel: str) -> None:
        with self.named_errors(f"removing {self.url_of(rel)}"), contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(rel))


class _NamedLock:
    """The store lock, its failures named (a lock file that cannot be created or locked)."""

    def __init__(self, lock: _ProcessLock, storage: LocalStorage) -> None:
        self._lock, self._storage = lock, storage

    def __enter__(self) -> None:
        with self._storage.named_errors(f"locking {self._storage.root}"):
            self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)
