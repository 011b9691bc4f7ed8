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

from ..errors import (
    AccessDeniedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StorageError,
)
from ..manifest import MANIFEST_NAME
from ._base import (
    LOCK_NAME,
    TMP_PREFIX,
    TRASH_PREFIX,
    NamedReader,
    Readable,
    Staging,
    Storage,
    new_token,
    parse_step,
    steps_of_stable_scans,
)

try:
    import fcntl
except ImportError:  # not POSIX (Windows): importing works, writing a local store is refused
    fcntl = None  # type: ignore[assignment]


def _has_manifest(path: str) -> bool:
    """Whether the directory ``path`` holds a manifest. One that cannot be looked at (permission denied)
    counts as there: a checkpoint the reader cannot read is reported as such, never silently skipped, and
    nothing is written over it."""
    try:
        os.stat(os.path.join(path, MANIFEST_NAME))
    except PermissionError:
        return True
    except OSError:  # missing, a file in place of the directory, a symlink loop, ...
        return False
    return True


def _flock(fd: int, flags: int) -> None:
    if fcntl is None:
        raise StorageError("local stores need POSIX file locks (flock): Linux or macOS")
    fcntl.flock(fd, flags)


def _locked_new_file(path: str) -> int:
    """A descriptor of the file ``path``, created and locked (``flock``), and still at ``path`` once locked.

    A cleaner may open, lock and remove a writer's liveness file between the writer's create and its lock
    (it then looks like a dead writer's): the writer would hold a lock on a file no longer there, and the next
    cleaner would take it for dead and remove the temp directory under it. So the file is created again
    until the one locked is the one at ``path``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX if fcntl else 0)
            st = os.fstat(fd)
            try:
                here = os.lstat(path)
            except FileNotFoundError:
                here = None
        except BaseException:
            os.close(fd)
            raise
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)


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
        """Remove a directory tree, best effort (a later clean-up finishes what is left). Never follows a
        symlink: a link at ``path`` is removed itself (shutil.rmtree refuses one, and it would stay forever),
        and links inside the tree are removed, not their targets."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode):  # shutil.rmtree would open a FIFO (and wait for a writer forever)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        shutil.rmtree(path, ignore_errors=True)  # descends by descriptor, checking each is what lstat saw


class _ProcessLock:
    """A lock between threads of this process and, through an ``flock`` on a lock file, between processes.

    The lock file is opened with ``O_NOFOLLOW`` and never truncated: a symlink planted at its name (to a
    file anywhere) is refused, not written through. filelock, used before, did that only from the fix of
    CVE-2025-68146 (December 2025) on; older releases, which ``filelock>=3.12`` allows, opened the file with
    ``O_TRUNC`` through the link.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._thread_lock = threading.RLock()
        self._fd = -1  # opened on first use and closed on the last release: readers never lock
        self._depth = 0  # re-entrant within a thread (the thread lock is)

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                try:
                    fd = os.open(self._path, flags, 0o644)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise StorageError(errno.ELOOP, f"{self._path} is a symlink; refused") from None
                    raise
                try:
                    _flock(fd, fcntl.LOCK_EX if fcntl else 0)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._depth -= 1
            if self._depth == 0:
                fd, self._fd = self._fd, -1
                os.close(fd)  # closing the last descriptor of the open file releases the flock
        finally:
            self._thread_lock.release()


class _LocalStaging(Staging):
    storage: LocalStorage
    sync_together = True

    def __init__(self, storage: LocalStorage, name: str, token: str) -> None:
        self.storage = storage
        self.final_name = name
        self.dir = f"{TMP_PREFIX}{name}-{token}"
        self.path = os.path.join(storage.root, self.dir)
        self.ops = storage.ops
        # Held for as long as this writer lives: a cleaner that can take it knows the writer is dead.
        self._alive_fd = -1
        with storage.named_errors(f"saving {storage.url_of(name)}"):
            self._alive_fd = _locked_new_file(self.path + ".alive")
            try:
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
    sync_together = True

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
    local_files = True

    def __init__(self, root: str | os.PathLike[str], ops: LocalOps | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root
        self.ops = ops or LocalOps()
        self._lock = _ProcessLock(os.path.join(self.root, LOCK_NAME))

    def url_of(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def describe_failure(self, e: BaseException, what: str) -> StorageError | None:
        if isinstance(e, PermissionError):  # named, and still a PermissionError for those who catch that
            where = f" ({e.filename})" if e.filename else ""
            return AccessDeniedError(e.errno, f"{what}: permission denied{where}")
        return None

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
        """Committed steps, ascending: step directories of this root (never a symlink, which may point at
        another store's checkpoint) whose manifest exists, or cannot be looked at (permission denied: listed,
        so that reading it names the problem and a fallback names what it skipped).

        One scan reads the root, then looks at each manifest: a listing is made of scans that agree
        (:func:`steps_of_stable_scans`; a scan reads the root's names and inode numbers).
        """
        with self.named_errors(f"listing {self.root}"):
            return steps_of_stable_scans(self._scan)

    def _scan(self) -> tuple[frozenset[tuple[str, int]] | None, list[int]]:
        """One scan of the root: its entries (name, inode), None if the root does not exist; the committed
        steps found."""
        try:
            with os.scandir(self.root) as it:
                entries = list(it)
        except FileNotFoundError:
            return None, []
        except NotADirectoryError:
            raise StorageError(f"{self.root} is a file, not a store directory") from None
        steps = []
        for entry in entries:
            step = parse_step(entry.name)
            # entry.is_symlink() comes with the directory read (d_type): no system call in the usual case.
            if step is not None and not entry.is_symlink() and _has_manifest(entry.path):
                steps.append(step)
        return frozenset((e.name, e.inode()) for e in entries), sorted(steps)

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
        except PermissionError as e:
            raise AccessDeniedError(e.errno, f"{path} cannot be read: permission denied") from None
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
        # Follows a symlink at ``name``: a path the user names (their own link to a checkpoint) reads as
        # what it points to. Listing, deleting and committing never follow one.
        with self.named_errors(f"looking up {self.url_of(name)}"):
            return _has_manifest(os.path.join(self.root, name))

    def is_occupied(self, name: str) -> bool:
        path = os.path.join(self.root, name)
        with self.named_errors(f"looking up {path}"):
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    return True  # a commit would replace the link (never what it points to)
            except FileNotFoundError:
                return False
            try:
                with os.scandir(path) as entries:
                    return next(entries, None) is not None
            except NotADirectoryError:
                return True

    def delete(self, name: str) -> None:
        """Delete a step: its directory is renamed out of the way (one atomic step: the checkpoint is gone
        for every reader and listing at once), the root synced (gone for good, before any data goes), then
        the renamed tree removed. Nothing is ever done through a path inside the step directory, so a
        directory swapped for a symlink at any moment (to another store's checkpoint) is never followed: a
        rename moves the link itself, and the tree is removed without following links."""
        path = os.path.join(self.root, name)
        with self.named_errors(f"deleting {path}"):
            self._remove_tree(path, sync=True)

    def _remove_tree(self, path: str, *, sync: bool = False) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):  # a symlink (or a file) in the root: the entry goes, not its target
            self.ops.unlink(path)
            return
        # Renamed first, so a crash half-way leaves a .trash- directory, never a step name with half its files.
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{os.path.basename(path)}-{new_token()}")
        try:
            self.ops.rename(path, trash)
        except FileNotFoundError:
            return  # deleted meanwhile
        if sync:
            self.ops.fsync_dir(self.root)
        self.ops.rmtree(trash)

    def clean_leftovers(self) -> list[str]:
        """Remove what writers that died left: ``.trash-`` directories, ``.tmp-`` directories whose writer is
        dead (its ``.alive`` file is gone or can be locked), and step directories without a manifest (a
        deletion cut short).

        Anything else under those names (a symlink, a file where a directory belongs, a liveness file that is
        not a regular file, an entry that cannot be looked at or removed) is left alone and reported once
        (logged): a foreign entry never makes a save or retention fail. Only a root that cannot be listed
        raises.
        """
        import logging  # (imported here: the only logging of this module)

        reported: set[str] = vars(self).setdefault("_reported_leftovers", set())

        def foreign(path: str, why: str) -> None:
            if path not in reported:  # once per entry
                reported.add(path)
                logging.getLogger(__name__).warning("%s %s; left alone", path, why)

        with self.named_errors(f"cleaning {self.root}"):
            entries = list(os.scandir(self.root))
        removed = []
        for entry in entries:
            name, path = entry.name, entry.path
            is_step = parse_step(name) is not None
            if not (is_step or name.startswith((TRASH_PREFIX, TMP_PREFIX))):
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed with its pair (a temp directory and its liveness file)
                continue
            except OSError as e:
                foreign(path, f"cannot be looked at ({e.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                foreign(path, "is a symlink")
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            try:
                if name.startswith(TRASH_PREFIX):
                    if not is_dir:
                        foreign(path, "is not a directory")
                        continue
                    self.ops.rmtree(path)
                    if os.path.lexists(path):
                        foreign(path, "could not be removed entirely (unreadable, or in use?)")
                        continue
                elif name.startswith(TMP_PREFIX):
                    alive = name.endswith(".alive")
                    if alive != (not is_dir) or (alive and not stat.S_ISREG(st.st_mode)):
                        foreign(path, "is not a writer's liveness file" if alive else "is not a directory")
                        continue
                    tmp = path.removesuffix(".alive")
                    dead = self._writer_dead(tmp)
                    if dead is None:
                        foreign(tmp + ".alive", "is not a liveness file this writer can lock")
                        continue
                    if not dead:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISDIR(os.lstat(tmp).st_mode):  # (anything else is reported as its own entry)
                            self.ops.rmtree(tmp)
                            if os.path.lexists(tmp):  # its liveness file stays: it is tried again
                                foreign(tmp, "could not be removed entirely (unreadable, or in use?)")
                                continue
                    with contextlib.suppress(FileNotFoundError):
                        self.ops.unlink(tmp + ".alive")
                else:
                    if not is_dir:
                        foreign(path, "is not a directory")
                        continue
                    if self.is_committed(name):  # (one that cannot be looked at counts as committed)
                        continue
                    # Never a save in progress (those live in .tmp- directories): a deletion cut short.
                    self._remove_tree(path)
            except (OSError, StorageError) as e:  # best effort: the next clean-up tries again
                foreign(path, f"could not be removed ({e})")
                continue
            removed.append(name)
        return removed

    @staticmethod
    def _writer_dead(tmp_path: str) -> bool | None:
        """Whether the writer of the temp directory ``tmp_path`` is dead: its liveness file is gone, or can
        be locked. None if the liveness file is not one (not a regular file, a symlink, unreadable)."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp_path + ".alive", flags)
        except FileNotFoundError:
            return True
        except OSError:  # a directory, a symlink, a FIFO without a reader, no permission: not ours
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if fcntl else 0)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            return None
        finally:
            os.close(fd)
        return True

    def put(self, rel: str, data: bytes = b"") -> None:
        parent, _, name = rel.rpartition("/")
        with self.named_errors(f"writing {self._path(rel)}"):
            dir_fd = self._open_dir(parent, create=True)
            assert dir_fd is not None
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            with open(fd, "wb") as f:
                f.write(data)

    def listdir(self, rel_dir: str) -> list[str]:
        with self.named_errors(f"listing {self.url_of(rel_dir)}"):
            dir_fd = self._open_dir(rel_dir, create=False)
            if dir_fd is None:
                return []
            try:
                return os.listdir(dir_fd)
            finally:
                os.close(dir_fd)

    def remove(self, rel: str) -> None:
        parent, _, name = rel.rpartition("/")
        with self.named_errors(f"removing {self.url_of(rel)}"), contextlib.suppress(FileNotFoundError):
            dir_fd = self._open_dir(parent, create=False)
            if dir_fd is None:
                return
            try:
                os.unlink(name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)

    def _open_dir(self, rel_dir: str, *, create: bool) -> int | None:
        """A descriptor of the directory ``rel_dir`` under the root (created with ``create``), or None if
        it does not exist. Each component below the root is opened relative to the one before it, without
        following a symlink: small files (leases, deletion marks) are never written, listed or removed
        through a link planted in the store (``.leases`` pointing at a directory anywhere), and a link
        swapped in meanwhile is refused all the same."""
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.root, flags)  # the root is the user's: a link to it is theirs to make
        except FileNotFoundError:
            if not create:
                return None
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.root, flags)
        done = ""
        for part in [p for p in rel_dir.split("/") if p]:
            done = f"{done}/{part}" if done else part
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create:
                    raise
                return None
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                what = "a symlink" if os.path.islink(self._path(done)) else "not a directory"
                raise StorageError(e.errno, f"{self.url_of(done)} is {what}; refused") from None
            finally:
                os.close(fd)
            fd = child
        return fd


class _NamedLock:
    """The store lock, its failures named (a lock file that cannot be created or locked)."""

    def __init__(self, lock: _ProcessLock, storage: LocalStorage) -> None:
        self._lock, self._storage = lock, storage

    def __enter__(self) -> None:
        with self._storage.named_errors(f"locking {self._storage.root}"):
            self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)
