"""``ckptstore.save`` / ``ckptstore.restore``: one checkpoint directory, no store around it."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from typing import Any

from . import checkpoint, tree
from .errors import CheckpointExistsError, CheckpointNotFoundError, CkptStoreError
from .storage import LocalStorage, Storage, storage_for, url_to_fs


def _split(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Storage, str]:
    """The storage of a checkpoint directory's parent, and the directory's name in it."""
    if isinstance(path, os.PathLike) or "://" not in str(path):
        full = os.path.abspath(os.fspath(path))
        parent, name = os.path.split(full.rstrip(os.sep))
        return LocalStorage(parent), name
    fs, full = url_to_fs(str(path), storage_options)
    parent, name = posixpath.split(full.rstrip("/"))
    if not name:
        raise CkptStoreError(f"{path} names no checkpoint directory")
    return storage_for(fs, parent), name


def _occupied(path: str) -> bool:
    """Whether something other than an empty directory lies at ``path``."""
    if not os.path.lexists(path):
        return False
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except NotADirectoryError:
        return True


def save(
    path: str | os.PathLike[str],
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Save ``state`` as one checkpoint directory at ``path`` (local path or fsspec URL), atomically.

    Raises:
        CheckpointExistsError: a checkpoint is committed at ``path`` and ``overwrite`` is False.
        UnsupportedTypeError: a leaf cannot be saved (nothing is written).
    """
    prepared = checkpoint.prepare(state, metadata)
    storage, name = _split(path, storage_options)
    committed = storage.is_committed(name)
    if not overwrite and committed:
        raise CheckpointExistsError(f"{storage.url_of(name)} is already committed (pass overwrite=True)")
    if not committed and isinstance(storage, LocalStorage) and _occupied(storage.url_of(name)):
        # The local commit replaces an uncommitted directory of that name (a store's half-deleted step);
        # here the name is the user's, and what lies there is theirs.
        raise CheckpointExistsError(f"{storage.url_of(name)} exists and is not a checkpoint; not replacing it")
    step = metadata.get("step", 0) if isinstance(metadata, dict) else 0
    step = step if type(step) is int and 0 <= step < 1 << 63 else 0  # bool is an int, but not a step
    checkpoint.write(storage, name, step, prepared, overwrite=overwrite)


def restore(
    path: str | os.PathLike[str],
    *,
    like: Any = tree.MISSING,
    framework: str | None = None,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
    keys: Sequence[str] | str | None = None,
    mmap: bool = False,
) -> Any:
    """Restore the checkpoint directory at ``path`` (as yielded by ``checkpoints_iterator``, or given by
    ``CheckpointInfo.path``). ``like``, ``framework``, ``verify``, ``keys`` and ``mmap`` are as for
    ``CheckpointStore.restore``.

    Raises:
        CheckpointNotFoundError: ``path`` holds no committed checkpoint.
    """
    storage, name = _split(path, storage_options)
    try:
        m = checkpoint.read_manifest(storage, name)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {storage.url_of(name)} (a store root? use CheckpointStore(path).restore())"
        ) from None
    return checkpoint.read(storage, name, like=like, framework=framework, verify=verify, m=m, keys=keys, mmap=mmap)
