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

import os
from typing import Any

import fsspec
import fsspec.implementations.local

from ..errors import StorageError
from ._base import (
    LOCK_NAME,
    STEP_RE,
    TMP_PREFIX,
    TRASH_PREFIX,
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
    "STEP_RE",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "FsspecStorage",
    "LocalOps",
    "LocalStorage",
    "Staging",
    "Storage",
    "new_token",
    "open_storage",
    "parse_step",
    "step_name",
    "storage_for",
    "url_to_fs",
]


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
