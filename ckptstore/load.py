"""Restore one checkpoint directory: manifest -> tensors -> tree (the save is :mod:`.pipeline`).

The manifest is read and validated (:func:`read_manifest`); the tensors are read by the reader the storage
calls for (:func:`load_tensors`: mapped on a local file, ranged requests on an object store, seek and read
otherwise), blocks of sharded arrays only where wanted (:mod:`.block_read`); then the tree is rebuilt
(:func:`ckptstore.tree.rebuild`). :class:`ckptstore.CheckpointStore` and ``ckptstore.restore`` use this.
"""

from __future__ import annotations

import functools
import posixpath
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import block_read, bounce, dtypes, knobs, manifest, remote_read, subset, tensorio, tree
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    PartialRestoreWarning,
)
from .manifest import MANIFEST_NAME, Manifest, TensorEntry
from .progress import ProgressArg
from .progress import scope as progress_scope
from .skeleton import ShardedRef, TensorRef, render_path
from .storage import Storage, parse_step
from .subset import KeyMap


def read_manifest(storage: Storage, name: str) -> Manifest:
    """Read and validate the manifest of checkpoint directory ``name``.

    A directory named like a store's step (``step_00000009``) must hold that step's manifest: one copied or
    moved from another step would be listed as a step it is not (``info(9).step == 1``), and restored as it.

    Raises:
        CorruptCheckpointError: the manifest is damaged, crafted, or of another step than its directory's.
    """
    rel = f"{name}/{MANIFEST_NAME}"
    data = storage.read_bytes(rel, knobs.current.max_manifest_bytes)
    m = manifest.decode(data, source=storage.url_of(rel))
    step = parse_step(posixpath.basename(name))
    if step is not None and m.step != step:
        raise CorruptCheckpointError(
            f"{storage.url_of(rel)} is the manifest of step {m.step}, in the directory of step {step} "
            "(copied or moved there?)"
        )
    return m


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
    advance: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Read tensors (all, or those at ``indices``) of a checkpoint into host arrays, file by file in
    offset order. Sizes of the files are always checked; checksums when ``verify``. ``advance(nbytes)``
    counts the bytes as they land (a restore's progress)."""
    wanted = range(len(m.tensors)) if indices is None else sorted(set(indices))
    by_file: dict[int, list[int]] = {}
    for i in wanted:
        by_file.setdefault(m.tensors[i].file, []).append(i)
    sizes = storage.sizes(name) if by_file else {}
    out: dict[int, np.ndarray] = {}
    for file_index, idx in by_file.items():
        rel, source = checked_file(storage, name, m.files[file_index], sizes)
        idx.sort(key=lambda i: m.tensors[i].offset)
        items = [(i, m.tensors[i]) for i in idx]
        if mmap and storage.supports_mmap:  # arrays on the mapped file: nothing copied
            out.update(tensorio.map_tensors(storage.map_file(rel), items, verify=verify, source=source))
            if advance is not None:
                advance(sum(e.nbytes for _, e in items))
        elif storage.ranged_reads:  # parallel ranged requests of just these tensors' bytes
            fetch = functools.partial(storage.read_range, rel)
            out.update(remote_read.read_tensors(fetch, items, verify=verify, source=source, advance=advance))
        else:
            f = storage.open_read(rel)
            try:
                out.update(tensorio.read_tensors(f, items, verify=verify, source=source, advance=advance))
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
    strict: bool = True,
    key_map: KeyMap | None = None,
    stacklevel: int = 2,
    progress: ProgressArg = None,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """Restore the state tree of checkpoint directory ``name`` (only the subtrees ``keys`` select, and
    only their tensors read, when given: see :mod:`.subset`). With ``mmap`` on local disk, arrays are
    mapped on the tensor files rather than read (see :func:`tensorio.map_tensors`).

    ``key_map`` renames the (selected) checkpoint's key paths before they meet ``like``
    (:func:`subset.remap`); with ``strict=False`` dict keys that differ from ``like``'s are tolerated
    (:func:`tree.rebuild`) and named by a :class:`PartialRestoreWarning` (``stacklevel`` as for
    ``warnings.warn``, counted from this function). ``progress`` (:mod:`.progress`) counts the bytes of
    the tensors read (the blocks of sharded arrays are not counted). ``rank`` of ``world_size``: the
    per-rank values (``ckptstore.PerRank``) this process gets (:func:`tree.select_rank`)."""
    if m is None:
        m = read_manifest(storage, name)
    skeleton = m.tree if keys is None else subset.select(m.tree, keys)
    if key_map is not None:
        skeleton = subset.remap(skeleton, key_map)
    selected = keys is not None or key_map is not None or m.version >= 2
    if selected or like is not tree.MISSING:
        skeleton, like = tree.select_rank(skeleton, like, rank, world_size, saved_per_rank=m.version >= 2)
    # Blocks of sharded arrays, and plain tensors that `like` wants as blocks: read later, only where wanted.
    sharded = block_read.block_indices(skeleton, like)
    wanted = sorted(set(subset.tensor_indices(skeleton))) if selected else range(len(m.tensors))
    # Tensors of `like`'s torch modules and optimizers are read straight into their memory by the rebuild,
    # and so are the blocks of their DTensors: not here.
    deferred: set[int] = set()
    into_blocks: set[int] = set()
    views: dict[tuple[int, int], Any] | None = None
    block_spec = functools.partial(_block_spec, m)
    if like is not tree.MISSING and in_place_possible(storage, mmap=mmap):
        views = {}  # fill_view's answers, asked for again by the rebuild
        deferred, into_blocks = tree.in_place_indices(
            skeleton, like, functools.partial(_spec, m), strict=strict, views=views, block_spec=block_spec
        )
        deferred -= set(sharded)
    # Tensors that the rebuild converts or assigns into `like`'s objects are read one by one as it asks for
    # them (local files: one read each costs little there), so the state is never whole in memory twice.
    assigned: set[int] = set()
    streamed: set[int] = set()
    if like is not tree.MISSING and not storage.ranged_reads and not mmap:
        assigned, streamed = tree.streamed_indices(skeleton, like)
        streamed = (streamed | assigned) - deferred - set(sharded)
    later = deferred | streamed
    eager = [i for i in wanted if i not in sharded and i not in later] if sharded or selected or later else None
    total = sum(m.tensors[i].nbytes for i in wanted if i not in sharded)
    unmatched = tree.Unmatched()
    with progress_scope(progress, total, f"restore step {m.step}") as shown:
        advance = None if progress is None or progress is False else shown.advance
        tensors = _Tensors(storage, name, m, verify, deferred, advance, streamed, assigned)
        tensors.views = views
        tensors.block_spec = block_spec if into_blocks else _no_blocks
        tensors.arrays.update(load_tensors(storage, name, m, eager, verify=verify, mmap=mmap, advance=advance))
        with block_read.BlockReader(storage, name, m, tensors.load, verify=verify, ranged=sharded) as blocks:
            if sharded:  # (not the blocks read into `like`'s DTensors)
                wanted_blocks = block_read.wanted_blocks(skeleton, like)
                blocks.prefetch([w for w in wanted_blocks if id(w[0]) not in into_blocks])
            state = tree.rebuild(
                skeleton,
                tensors.load,
                like=like,
                framework=framework,
                blocks=blocks,
                strict=strict,
                unmatched=unmatched,
                in_place=tensors if later or into_blocks else None,
            )
    if unmatched:
        warnings.warn(_partial_warning(storage.url_of(name), unmatched), stacklevel=stacklevel + 1)
    return state


def in_place_possible(storage: Storage, *, mmap: bool) -> bool:
    """Whether a restore reads the tensors of ``like``'s stateful objects straight into their memory: on
    every storage, unless ``mmap`` on one that maps files (the tensors are then mapped, as asked)."""
    return not (mmap and storage.supports_mmap)


def _spec(m: Manifest, index: int) -> tuple[np.dtype, tuple[int, ...]] | None:
    if not 0 <= index < len(m.tensors):
        return None
    e = m.tensors[index]
    return dtypes.dtype_of(e.dtype), tuple(e.shape)


def _block_spec(m: Manifest, node: TensorRef | ShardedRef) -> tuple[np.dtype, tuple[int, ...]] | None:
    if type(node) is ShardedRef:
        return dtypes.dtype_of(node.dtype), tuple(node.global_shape)
    return _spec(m, node.index) if type(node) is TensorRef else None


def _no_blocks(node: TensorRef | ShardedRef) -> None:
    return None


class _Tensors:
    """A checkpoint's tensors for :func:`tree.rebuild`: those read up front (``arrays``), those ``deferred``
    for the rebuild to read in place (:class:`tree.InPlaceReader`), and those ``streamed``: read when the
    rebuild asks for them and not kept (it converts them or assigns them into an object of ``like``:
    those ``assigned``). A deferred tensor that the rebuild does not read in place after all is read when
    it is asked for."""

    def __init__(
        self,
        storage: Storage,
        name: str,
        m: Manifest,
        verify: bool,
        deferred: set[int],
        advance: Callable[[int], None] | None,
        streamed: set[int] = frozenset(),  # type: ignore[assignment]
        assigned: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.storage, self.name, self.m, self.verify = storage, name, m, verify
        self.arrays: dict[int, np.ndarray] = {}
        self.deferred, self.advance = deferred, advance
        self.streamed, self.assigned = streamed, assigned
        self.touched = False
        self.views: dict[tuple[int, int], Any] | None = None
        #: tree.InPlaceReader.block_spec: whether blocks may be read into `like`'s DTensors
        self.block_spec: tree.BlockSpec = _no_blocks
        self._sizes: dict[str, int] | None = None

    def load(self, index: int) -> np.ndarray:
        arr = self.arrays.get(index)
        if arr is not None:
            return arr
        if index in self.streamed:
            arr = self._read_one(index)
            self.touched = self.touched or index in self.assigned
            return arr
        if index in self.deferred:  # not read in place after all (or asked for again): read it now
            self.deferred.discard(index)
            self.arrays.update(
                load_tensors(self.storage, self.name, self.m, [index], verify=self.verify, advance=self.advance)
            )
            return self.arrays[index]
        raise CorruptCheckpointError(
            f"{self.storage.url_of(self.name)}: the tree refers to tensor #{index}, the manifest lists "
            f"{len(self.m.tensors)}"
        )

    def _read_one(self, index: int) -> np.ndarray:
        e = self.m.tensors[index]
        if self._sizes is None:
            self._sizes = self.storage.sizes(self.name)
        rel, source = checked_file(self.storage, self.name, self.m.files[e.file], self._sizes)
        f = self.storage.open_read(rel)
        try:
            return tensorio.read_tensors(f, [(index, e)], verify=self.verify, source=source, advance=self.advance)[
                index
            ]
        finally:
            f.close()

    def spec(self, index: int) -> tuple[np.dtype, tuple[int, ...]] | None:
        return _spec(self.m, index) if index in self.deferred and index not in self.arrays else None

    def fill(self, targets: Sequence[tuple[int, np.ndarray | bounce.DeviceTarget]]) -> None:
        by_file: dict[int, list[tuple[int, np.ndarray | bounce.DeviceTarget]]] = {}
        for index, target in targets:
            by_file.setdefault(self.m.tensors[index].file, []).append((index, target))
        if self._sizes is None:
            self._sizes = self.storage.sizes(self.name)
        for file_index, items in by_file.items():
            rel, source = checked_file(self.storage, self.name, self.m.files[file_index], self._sizes)
            items.sort(key=lambda item: self.m.tensors[item[0]].offset)
            host: list[tuple[TensorEntry, np.ndarray]] = []
            device: list[tuple[TensorEntry, bounce.DeviceTarget]] = []
            for index, target in items:
                e = self.m.tensors[index]
                if isinstance(target, np.ndarray):
                    self.deferred.discard(index)  # filled: a later load() gets the array in `like`, not a copy
                    self.arrays[index] = target.view(dtypes.dtype_of(e.dtype)).reshape(e.shape)
                    host.append((e, target))
                else:  # (a later load() of it reads it again, to host memory)
                    device.append((e, target))
            check, adv = self.verify, self.advance
            if self.storage.ranged_reads and host:  # parallel ranged GETs, each part copied into its tensor
                fetch = functools.partial(self.storage.read_range, rel)
                remote_read.fill_tensors(fetch, host, verify=check, source=source, advance=adv)
            f = self.storage.open_read(rel)
            try:
                if host and not self.storage.ranged_reads:
                    tensorio.fill_tensors(f, host, verify=check, source=source, advance=adv)
                if device:
                    bounce.fill(f, device, verify=check, source=source, advance=adv)
            finally:
                f.close()


#: Paths a PartialRestoreWarning's message names of each kind (its attributes hold them all).
_NAMED_PATHS = 20


def _partial_warning(where: str, unmatched: tree.Unmatched) -> PartialRestoreWarning:
    missing = [render_path(p) for p in unmatched.missing]
    unexpected = [render_path(p) for p in unmatched.unexpected]
    parts = []
    for paths, what in (
        (missing, "missing from the checkpoint (kept as in `like`)"),
        (unexpected, "in the checkpoint only (dropped)"),
    ):
        if paths:
            more = f" and {len(paths) - _NAMED_PATHS} more" if len(paths) > _NAMED_PATHS else ""
            parts.append(f"{what}: {', '.join(paths[:_NAMED_PATHS])}{more}")
    return PartialRestoreWarning(f"restored {where} with strict=False; " + "; ".join(parts), missing, unexpected)


def require_committed(storage: Storage, name: str) -> None:
    if not storage.is_committed(name):
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url_of(name)}")
