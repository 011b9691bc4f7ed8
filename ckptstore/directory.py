"""``ckptstore.save`` / ``ckptstore.restore``: one checkpoint directory, no store around it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import distributed, load, pipeline, tree
from .errors import CheckpointExistsError, CheckpointNotFoundError
from .progress import ProgressArg
from .storage import open_parent, parse_step
from .subset import KeyMap


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
    prepared = pipeline.prepare(state, metadata)
    storage, name = open_parent(path, storage_options)
    pipeline.ensure_free(storage, name, overwrite)
    if not storage.is_committed(name) and storage.is_occupied(name):
        # The local commit replaces an uncommitted directory of that name (a store's half-deleted step);
        # here the name is the user's, and what lies there is theirs.
        raise CheckpointExistsError(f"{storage.url_of(name)} exists and is not a checkpoint; not replacing it")
    step = prepared.metadata.get("step", 0)  # as checked: a NumPy or torch integer scalar is an int there
    step = step if type(step) is int and 0 <= step < 1 << 63 else 0  # bool is an int, but not a step
    named = parse_step(name)  # a directory named like a step: its manifest must say that step (load.py checks)
    step = named if named is not None else step
    pipeline.save(storage, name, step, lambda: prepared, overwrite=overwrite, coordinator=distributed.SINGLE)


def restore(
    path: str | os.PathLike[str],
    *,
    like: Any = tree.MISSING,
    framework: str | None = None,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
    keys: Sequence[str] | str | None = None,
    mmap: bool = False,
    strict: bool = True,
    key_map: KeyMap | None = None,
    progress: ProgressArg = None,
) -> Any:
    """Restore the checkpoint directory at ``path`` (as yielded by ``checkpoints_iterator``, or given by
    ``CheckpointInfo.path``). ``like``, ``framework``, ``verify``, ``keys``, ``mmap``, ``strict``,
    ``key_map`` and ``progress`` are as for ``CheckpointStore.restore``: with ``strict=False``, dict keys of
    ``like`` and of the checkpoint that differ are tolerated and named by a ``PartialRestoreWarning``;
    ``key_map`` renames the checkpoint's key paths first; a torch module fits a checkpoint saved compiled or
    DDP-wrapped.

    Raises:
        CheckpointNotFoundError: ``path`` holds no committed checkpoint.
    """
    storage, name = open_parent(path, storage_options)
    try:
        m = load.read_manifest(storage, name)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {storage.url_of(name)} (a store root? use CheckpointStore(path).restore())"
        ) from None
    return load.read(
        storage,
        name,
        like=like,
        framework=framework,
        verify=verify,
        m=m,
        keys=keys,
        mmap=mmap,
        strict=strict,
        key_map=key_map,
        stacklevel=2,
        progress=progress,
    )
