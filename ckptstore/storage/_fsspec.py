"""Any fsspec filesystem (object stores): data first, the manifest last with an exclusive create."""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from typing import Any, BinaryIO

import fsspec
import fsspec.implementations.local

from .. import knobs
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from ..manifest import MANIFEST_NAME
from . import _multipart as multipart
from . import _retry as retry
from . import _s3
from ._base import NamedReader, Readable, Staging, Storage, parse_step, steps_of_stable_scans

_FS_LOCKS: dict[str, threading.RLock] = {}
_FS_LOCKS_GUARD = threading.Lock()


class _FsspecStaging(Staging):
    storage: FsspecStorage

    def __init__(self, storage: FsspecStorage, name: str, token: str) -> None:
        self.storage = storage
        self.token = token
        self.dir = name
        self.written: list[str] = []
        self._manifest: bytes | None = None  # set once the manifest PUT has been tried

    def _open(self, name: str) -> BinaryIO:
        path = self.storage._path(f"{self.dir}/{name}")
        self.written.append(path)
        return self.storage._open_write(path)

    def _close(self, f: BinaryIO) -> None:
        f.close()  # object stores: the object exists, complete, once close returns

    def _discard(self, f: BinaryIO) -> None:
        # A buffered upload (fsspec's, or ours in parts) is abandoned, never completed by close().
        discard = getattr(f, "discard", None)
        if callable(discard):
            discard()
        else:
            f.close()

    def adopt(self, names: list[str]) -> None:
        self.written.extend(self.storage._path(f"{self.dir}/{n}") for n in names)

    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        with self.storage.named_errors(f"committing {self.storage.url_of(self.dir)}"):
            self._commit(manifest, overwrite)

    def _commit(self, manifest: bytes, overwrite: bool) -> None:
        fs = self.storage.fs
        path = self.storage._path(f"{self.dir}/{MANIFEST_NAME}")
        with self.storage.lock():
            if overwrite and self.storage.is_committed(self.dir):
                self.storage._delete(self.dir, keep=set(self.written))
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

    ranged_reads = True
    # Client libraries raise their own exception types (botocore's, aiohttp's): all are named here.
    failures = (Exception,)

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        # The filesystem's own form of the path: absolute for a local one ("rel" -> "/cwd/rel"), without
        # the protocol for others; listings return paths in this form.
        self.root = str(fs._strip_protocol(root)).rstrip("/")
        self.url = fs.unstrip_protocol(self.root)
        key = f"{type(fs).__module__}.{type(fs).__qualname__}:{self.url}"
        with _FS_LOCKS_GUARD:
            self._lock = _FS_LOCKS.setdefault(key, threading.RLock())
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        #: A filesystem with symlinks (fsspec's local one; its info() says "islink"): an entry of the root
        #: that is a link is never written, listed or deleted through (object stores have none).
        self._has_links = bool(protocols & {"file", "local"})

    def _is_link(self, rel: str) -> bool:
        """Whether the root's entry ``rel`` (one component) is a symlink (never, on an object store)."""
        if not self._has_links:
            return False
        try:
            return bool(self.fs.info(self._path(rel)).get("islink"))
        except FileNotFoundError:
            return False

    def _refuse_link(self, rel: str) -> None:
        """Raise if the first component of ``rel`` is a symlink (a ``.leases`` planted to point anywhere)."""
        top = rel.split("/", 1)[0]
        if top and self._is_link(top):
            raise StorageError(errno.ELOOP, f"{self.url_of(top)} is a symlink; refused")

    def describe_failure(self, e: BaseException, what: str) -> StorageError | None:
        return _s3.describe(e, self.url, what)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        return str(self.fs.unstrip_protocol(self._path(rel)))

    def begin(self, name: str, token: str) -> Staging:
        if self._is_link(name):  # a link where the step goes: the entry is replaced, never written through
            with self.named_errors(f"saving {self.url_of(name)}"):
                self.fs.rm_file(self._path(name))
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
        """Step prefixes holding a manifest, from listings that agree (:func:`steps_of_stable_scans`: on a
        filesystem whose listing walks directories, a commit and a deletion can fall between its reads)."""
        with self.named_errors(f"listing {self.url}"):
            return steps_of_stable_scans(self._scan)

    def _scan(self) -> tuple[frozenset[str], list[int]]:
        found = self._find()
        steps = set()
        for rel in found:
            parent, _, name = rel.partition("/")
            if name == MANIFEST_NAME and (step := parse_step(parent)) is not None:
                steps.add(step)
        return frozenset(found), sorted(steps)

    def read_bytes(self, rel: str, limit: int) -> bytes:
        path = self._path(rel)
        with self.named_errors(f"reading {self.url_of(rel)}"):
            try:
                # A plain GET (no cached size or ETag: fs.open would check them, and a manifest replaced by
                # another process since our last listing would fail as "expired").
                data = self._get(path, 0, limit + 1, f"reading {self.url_of(rel)}")
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.url_of(rel)} does not exist") from None
        if len(data) > limit:
            raise CorruptCheckpointError(f"{self.url_of(rel)} is larger than {limit} bytes")
        return bytes(data)

    def open_read(self, rel: str) -> Readable:
        with self.named_errors(f"opening {self.url_of(rel)}"):
            try:
                f = self.fs.open(self._path(rel), "rb")
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.url_of(rel)} is missing") from None
        return NamedReader(f, f"reading {self.url_of(rel)}", self)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file, in one ranged GET (retried when it fails transiently)."""
        if end <= start:
            return b""  # (an empty range asked of S3 would return the whole object)
        with self.named_errors(f"reading {self.url_of(rel)}"):
            try:
                return self._get(self._path(rel), start, end, f"reading {self.url_of(rel)}")
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.url_of(rel)} is missing") from None

    def _get(self, path: str, start: int, end: int, what: str) -> bytes:
        """Bytes ``[start, end)`` of an object (fewer at its end, none past it), in one ranged GET."""
        try:
            return bytes(retry.call(self.fs.cat_file, path, start=start, end=end, what=what))
        except Exception as e:
            if retry.is_invalid_range(e):  # S3: a range at or past the end (of an empty object too)
                return b""
            raise

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
        with self.named_errors(f"listing {self.url_of(rel_dir)}"):
            self._refuse_link(rel_dir)
            self.fs.invalidate_cache(path)
            try:
                entries = retry.call(self.fs.ls, path, detail=True, what=f"listing {self.url_of(rel_dir)}")
            except FileNotFoundError:
                return {}
        # Some servers (SeaweedFS) list an emptied prefix as a file named like the prefix itself: not a file.
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file" and e["name"].rstrip("/") != path
        }

    def is_committed(self, name: str) -> bool:
        path = self._path(f"{name}/{MANIFEST_NAME}")
        with self.named_errors(f"looking up {self.url_of(name)}"):
            self.fs.invalidate_cache(self._path(name))
            return bool(retry.call(self.fs.exists, path, what=f"looking up {self.url_of(name)}"))

    def delete(self, name: str) -> None:
        with self.named_errors(f"deleting {self.url_of(name)}"):
            self._delete(name)

    def _delete(self, name: str, keep: set[str] | None = None) -> None:
        """Delete a committed checkpoint, keeping the objects ``keep`` (an overwriting writer's own)."""
        base = self._path(name)
        if self._is_link(name):  # (a link to another store's checkpoint): the link goes, not what it points to
            self.fs.rm_file(base)
            return
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
        (a writer may still be uploading into a younger one), and abort the multipart uploads into step
        prefixes begun longer ago than that (a writer killed in the middle of one leaves it open: invisible,
        but its parts are stored and billed until it is aborted).

        An object named like a step prefix itself, a prefix that cannot be removed, or uploads that cannot be
        listed (a policy without ``s3:ListBucketMultipartUploads``) are reported once (logged) and left: they
        never make a save or retention fail. Only a root that cannot be listed raises.
        """
        with self.named_errors(f"cleaning {self.url}"):
            removed = self._clean_leftovers()
        if multipart.supported(self.fs):
            removed += self._abort_stale_uploads()
        return removed

    def _clean_leftovers(self) -> list[str]:
        removed = []
        by_step: dict[str, list[str]] = {}
        for rel in self._find():
            parent, _, name = rel.partition("/")
            if parse_step(parent) is None:
                continue
            if name:
                by_step.setdefault(parent, []).append(name)
            else:
                self._report_leftover(parent, "is an object named like a step directory")
        now = time.time()
        for parent, names in by_step.items():
            if MANIFEST_NAME in names:
                continue
            paths = [self._path(f"{parent}/{n}") for n in names]
            try:
                if all(now - self._modified(p) > knobs.current.stale_after_s for p in paths):
                    retry.call(self.fs.rm, paths, what=f"removing leftovers of {self.url_of(parent)}")
                    removed.append(parent)
            except Exception as e:  # best effort: the next clean-up tries again
                self._report_leftover(parent, f"could not be removed ({e})")
        return removed

    def _abort_stale_uploads(self) -> list[str]:
        """Abort the multipart uploads into step prefixes begun more than ``knobs.stale_after_s`` ago."""

        def ours(rel: str) -> bool:
            parent, _, name = rel.partition("/")
            return bool(name) and parse_step(parent) is not None

        try:
            aborted = multipart.abort_stale(self.fs, self.root, knobs.current.stale_after_s, ours)
        except Exception as e:
            self._report_leftover("", f"multipart uploads could not be listed or aborted ({e})")
            return []
        return [f"{rel} (an upload that was never completed)" for rel in aborted]

    def _report_leftover(self, rel: str, why: str) -> None:
        """Log a warning about an entry that clean-up leaves alone, once per entry."""
        import logging  # (the only logging of this module)

        reported: set[str] = vars(self).setdefault("_reported_leftovers", set())
        if rel not in reported:  # once per entry
            reported.add(rel)
            logging.getLogger(__name__).warning("%s %s; left alone", self.url_of(rel), why)

    def _modified(self, path: str) -> float:
        try:
            return float(self.fs.modified(path).timestamp())
        except (NotImplementedError, FileNotFoundError, AttributeError):
            return 0.0

    def put(self, rel: str, data: bytes = b"") -> None:
        path = self._path(rel)
        with self.named_errors(f"writing {self.url_of(rel)}"):
            self._refuse_link(rel)
            try:
                retry.call(self.fs.pipe_file, path, data, what=f"writing {self.url_of(rel)}")
            except FileNotFoundError:  # a filesystem with real directories, and no directory there yet
                self.fs.makedirs(self.fs._parent(path), exist_ok=True)
                retry.call(self.fs.pipe_file, path, data, what=f"writing {self.url_of(rel)}")

    def listdir(self, rel_dir: str) -> list[str]:
        path = self._path(rel_dir)
        with self.named_errors(f"listing {self.url_of(rel_dir)}"):
            self._refuse_link(rel_dir)
            self.fs.invalidate_cache(path)
            try:
                found = retry.call(self.fs.ls, path, detail=False, what=f"listing {self.url_of(rel_dir)}")
            except FileNotFoundError:
                return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in found if str(p).rstrip("/") != path]

    def remove(self, rel: str) -> None:
        with self.named_errors(f"removing {self.url_of(rel)}"), contextlib.suppress(FileNotFoundError):
            self._refuse_link(rel)
            retry.call(self.fs.rm_file, self._path(rel), what=f"removing {self.url_of(rel)}")
