"""Write and read one checkpoint directory: the tree -> plan -> write -> commit flow, and its reverse.

:class:`ckptstore.CheckpointStore` adds steps, listing and retention on top; ``ckptstore.save`` and
``ckptstore.restore`` use these functions on a single directory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import block_read, distributed, knobs, manifest, remote_read, subset, tensorio, tree
from .errors import (
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StorageError,
    UnsupportedTypeError,
)
from .manifest import MANIFEST_NAME, Manifest
from .skeleton import ArrayLeaf, NamedTuple, Scalar, Stateful, render_path
from .storage import LocalStorage, Storage, new_token


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A state taken apart and checked, ready to be written (nothing has touched storage yet)."""

    skeleton: Any
    arrays: list[ArrayLeaf]
    metadata: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(a.array.nbytes for a in self.arrays)


def prepare(state: Any, metadata: dict[str, Any] | None, *, snapshot: bool = False) -> Prepared:
    """Walk the state and check the metadata; raise before anything is written if either is unsupported."""
    skeleton, arrays = tree.flatten(state, snapshot=snapshot)
    meta = _check_metadata(metadata)
    problem = manifest.nesting_problem(skeleton) or manifest.nesting_problem(meta)
    if problem:  # refused now, or saved and never restorable
        raise UnsupportedTypeError(f"the state cannot be saved: {problem}")
    return Prepared(skeleton, arrays, meta)


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedTypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        skeleton, arrays = tree.flatten(metadata)
    except UnsupportedTypeError as e:  # flatten names paths from "state"; here they lie in "metadata"
        msg = str(e)
        raise UnsupportedTypeError("metadata" + msg.removeprefix("state") if msg.startswith("state") else msg) from None
    if arrays:
        raise UnsupportedTypeError(
            f"{render_path(arrays[0].path, 'metadata')} is an array; metadata holds small plain "
            "values (put arrays in the state)"
        )
    if any(isinstance(v, Stateful | Scalar | NamedTuple) for v in _walk_values(skeleton)):
        raise UnsupportedTypeError("metadata holds plain Python values only (numbers, strings, lists, dicts)")
    return dict(skeleton)


def _walk_values(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk_values(v)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _walk_values(v)


def write(storage: Storage, name: str, step: int, prepared: Prepared, *, overwrite: bool) -> Manifest:
    """Write a prepared state as the checkpoint directory ``name`` and commit it.

    On any failure the partial data is removed and nothing is committed.
    """
    if any(a.global_shape is not None for a in prepared.arrays):  # Shards: the sharded layout, one process
        done = distributed.save(
            storage, name, step, None, overwrite=overwrite, coordinator=distributed.SINGLE, prepared=prepared
        )
        assert done.manifest is not None
        return done.manifest
    token = new_token()
    arrays = prepared.arrays
    names = tensorio.tensor_names(arrays)
    plans = tensorio.plan_files(arrays, f"tensors-{token}", knobs.current.max_file_bytes)
    try:
        staging = storage.begin(name, token)
    except OSError as e:
        if isinstance(e, CkptStoreError):
            raise
        raise storage_error(e, f"saving {storage.url_of(name)} failed; nothing was written") from e
    try:
        files: list[manifest.FileEntry] = []
        entries: list[manifest.TensorEntry | None] = [None] * len(arrays)
        for plan, size, written in tensorio.write_files(staging, arrays, names, plans):
            files.append(manifest.FileEntry(plan.name, size))
            for i, entry in zip(plan.indices, written):
                entries[i] = entry
        m = Manifest(
            step=step,
            created=time.time(),
            writer=token,
            metadata=prepared.metadata,
            tree=prepared.skeleton,
            files=tuple(files),
            tensors=tuple(e for e in entries if e is not None),
        )
        staging.commit(manifest.encode(m), overwrite=overwrite)
    except BaseException as e:
        staging.abort()
        if isinstance(e, OSError) and not isinstance(e, CkptStoreError):
            raise storage_error(e, f"saving {storage.url_of(name)} failed; {_outcome(storage, name)}") from e
        raise
    return m


def _outcome(storage: Storage, name: str) -> str:
    """What a failed save left, in words: the failure may have come after the checkpoint was published
    (a sync of the root, a lost response) and its removal failed too."""
    try:
        committed = storage.is_committed(name)
    except Exception:
        return "it may or may not be committed (check with CheckpointStore.verify)"
    if committed:
        return "it is committed all the same (its data was complete before it was published)"
    return "nothing was committed"


def storage_error(e: OSError, what: str) -> StorageError:
    """A filesystem failure as a StorageError that keeps its errno (``e.errno == errno.ENOSPC`` still works)."""
    if e.errno is None:
        return StorageError(f"{what}: {e}")
    where = f" ({e.filename})" if e.filename else ""
    return StorageError(e.errno, f"{what}: {e.strerror or e}{where}")


def read_manifest(storage: Storage, name: str) -> Manifest:
    """Read and validate the manifest of checkpoint directory ``name``."""
    rel = f"{name}/{MANIFEST_NAME}"
    data = storage.read_bytes(rel, knobs.current.max_manifest_bytes)
    return manifest.decode(data, source=storage.url_of(rel))


def checked_file(storage: Storage, name: str, fe: manifest.FileEntry, sizes: dict[str, int]) -> tuple[str, str]:
    """The relative path and URL of a tensor file, after checking that it exists with the manifest's size.

    Raises:
        CorruptCheckpointError: the file is missing, or truncated (or grown).
    """
    rel = f"{name}/{fe.name}"
    source = storage.url_of(rel)
    actual = sizes.get(fe.name)
    if actual is None:
        raise CorruptCheckpointError(f"{source} is missing")
    if actual != fe.size:
        raise CorruptCheckpointError(f"{source} has {actual} bytes, the manifest says {fe.size} (truncated?)")
    return rel, source


def load_tensors(
    storage: Storage,
    name: str,
    m: Manifest,
    indices: Sequence[int] | None = None,
    *,
    verify: bool = False,
    mmap: bool = False,
) -> dict[int, np.ndarray]:
    """Read tensors (all, or those at ``indices``) of a checkpoint into host arrays, file by file in
    offset order. Sizes of the files are always checked; checksums when ``verify``."""
    wanted = range(len(m.tensors)) if indices is None else sorted(set(indices))
    by_file: dict[int, list[int]] = {}
    for i in wanted:
        by_file.setdefault(m.tensors[i].file, []).append(i)
    sizes = storage.sizes(name) if by_file else {}
    out: dict[int, np.ndarray] = {}
    for file_index, idx in by_file.items():
        rel, source = checked_file(storage, name, m.files[file_index], sizes)
        idx.sort(key=lambda i: m.tensors[i].offset)
        read_range = getattr(storage, "read_range", None)
        if read_range is not None:  # remote: parallel ranged GETs of just these tensors' bytes
            fetch = functools.partial(read_range, rel)
            out.update(remote_read.read_tensors(fetch, [(i, m.tensors[i]) for i in idx], verify=verify, source=source))
            continue
        f = storage.open_read(rel)
        try:
            items = [(i, m.tensors[i]) for i in idx]
            if mmap and isinstance(storage, LocalStorage):
                out.update(tensorio.map_tensors(f.fileno(), items, verify=verify, source=source))
            else:
                out.update(tensorio.read_tensors(f, items, verify=verify, source=source))
        finally:
            f.close()
    return out


def read(
    storage: Storage,
    name: str,
    *,
    like: Any = tree.MISSING,
    framework: str | None = None,
    verify: bool = False,
    m: Manifest | None = None,
    keys: Sequence[str] | str | None = None,
    mmap: bool = False,
) -> Any:
    """Restore the state tree of checkpoint directory ``name`` (only the subtrees ``keys`` select, and
    only their tensors read, when given: see :mod:`.subset`). With ``mmap`` on local disk, arrays are
    mapped on the tensor files rather than read (see :func:`tensorio.map_tensors`)."""
    if m is None:
        m = read_manifest(storage, name)
    skeleton = m.tree if keys is None else subset.select(m.tree, keys)
    sharded = block_read.block_indices(skeleton)  # blocks of sharded arrays: read later, only where wanted
    wanted = range(len(m.tensors)) if keys is None else sorted(set(subset.tensor_indices(skeleton)))
    eager = [i for i in wanted if i not in sharded] if sharded or keys is not None else None
    arrays = load_tensors(storage, name, m, eager, verify=verify, mmap=mmap)

    def load(index: int) -> np.ndarray:
        try:
            return arrays[index]
        except KeyError:
            raise CorruptCheckpointError(
                f"{storage.url_of(name)}: the tree refers to tensor #{index}, the manifest lists {len(m.tensors)}"
            ) from None

    with block_read.BlockReader(storage, name, m, load, verify=verify) as blocks:
        if sharded:
            blocks.prefetch(block_read.wanted_blocks(skeleton, like))
        return tree.rebuild(skeleton, load, like=like, framework=framework, blocks=blocks)


def require_committed(storage: Storage, name: str) -> None:
    if not storage.is_committed(name):
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url_of(name)}")
