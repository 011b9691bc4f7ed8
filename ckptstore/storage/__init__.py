"""Where checkpoints live, and how one is committed there.

Two backends, chosen by what the filesystem can do, not by the URL's scheme:

* :class:`LocalStorage` (a POSIX directory; atomic rename). A save writes into a hidden temp directory
  ``.tmp-<step>-<token>`` in the root, fsyncs every file, writes the manifest, fsyncs the directory,
  renames it to ``step_XXXXXXXX`` and fsyncs the root. A partial directory is never visible under a step
  name. A file lock in the root serialises commits, deletions and clean-ups between processes.
* :class:`FsspecStorage` (any fsspec filesystem: S3, GCS, memory://, ...; no atomic rename). Data objects
  go straight under the final prefix; the manifest is written last in one PUT, as an exclusive create
  where the filesystem offers one (S3: ``If-None-Match: *``), so two writers cannot both commit one step.

Both keep the contract of :mod:`._base` (``Storage``, ``Staging``): every failure a named error, what they
can do beyond the basics said by capability flags. :func:`open_storage` and :func:`open_parent` are the one
place a path or URL becomes a storage.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
import fsspec.implementations.local

from ..errors import CkptStoreError, StorageError
from . import _s3
from ._base import (
    LOCK_NAME,
    MAX_READ_BUFFERS,
    STEP_RE,
    TMP_PREFIX,
    TRASH_PREFIX,
    Readable,
    Staging,
    Storage,
    new_token,
    parse_step,
    step_name,
)
from ._fsspec import FsspecStorage
from ._local import LocalOps, LocalStorage

__all__ = [
    "LOCK_NAME",
    "MAX_READ_BUFFERS",
    "STEP_RE",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "FsspecStorage",
    "LocalOps",
    "LocalStorage",
    "Readable",
    "Staging",
    "Storage",
    "new_token",
    "open_parent",
    "open_storage",
    "parse_step",
    "step_name",
    "storage_for",
    "url_to_fs",
]


def _is_local(url_or_path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> bool:
    """Whether a path or URL names a local directory; a value of the wrong type is a named error."""
    if not isinstance(url_or_path, str | os.PathLike) or not os.fspath(url_or_path):
        raise CkptStoreError(f"a store or checkpoint is a path or URL (str or os.PathLike), got {url_or_path!r}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise CkptStoreError(f"storage_options must be a dict or None, got {storage_options!r}")
    return isinstance(url_or_path, os.PathLike) or ("://" not in str(url_or_path) and "::" not in str(url_or_path))


def open_storage(
    url_or_path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
) -> Storage:
    """The backend for a store root given as a path or URL: local directories commit by rename, everything
    else manifest-last. A :class:`Storage` object is used as it is (tests pass wrappers that inject
    faults)."""
    if isinstance(url_or_path, Storage):
        return url_or_path
    if _is_local(url_or_path, storage_options):
        return LocalStorage(url_or_path)
    fs, root = url_to_fs(str(url_or_path), storage_options)
    return storage_for(fs, root)


def open_parent(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[Storage, str]:
    """The storage of a checkpoint directory's parent, and the directory's name in it (same rules as
    :func:`open_storage`).

    Raises:
        StorageError: ``path`` names no directory (a bucket's root, ``s3://b/``).
    """
    if _is_local(path, storage_options):
        parent, name = os.path.split(os.path.abspath(os.fspath(path)).rstrip(os.sep))
        return LocalStorage(parent), name
    fs, full = url_to_fs(str(path), storage_options)
    parent, name = posixpath.split(full.rstrip("/"))
    if not name:
        raise StorageError(f"{path} names no checkpoint directory")
    return storage_for(fs, parent), name


def url_to_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path within it; S3 gets a bounded connect time
    (``knobs.connect_timeout_s``, ``knobs.connect_retries``: see :mod:`._s3`)."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fs, path = fsspec.core.url_to_fs(url, **_s3.client_options(protocol, storage_options))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url}: {e}") from e
    return fs, str(path)


def storage_for(fs: fsspec.AbstractFileSystem, root: str) -> Storage:
    """The backend for a directory of a filesystem, by what the filesystem can do."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return LocalStorage(root)
    return FsspecStorage(fs, root)
