"""Reading blocks of sharded arrays: each rank reads only the bytes its block needs.

A sharded array is stored as blocks (one tensor each, row-major, in any of the checkpoint's files); a
rank that restores into a :class:`ckptstore.Shard` or DTensor template wants one block of the global
array, and a JAX process restoring into a template of a global array the blocks of its devices (their
bounding box, read once, where they fill it); each may overlap several stored blocks partly. For each
overlap the reader finds the contiguous byte runs in the stored block (row-major: an overlap that spans
whole trailing dimensions is one run), and reads each run, or one span covering several runs where the
bytes in between are few (a ranged GET costs far more than a few wasted bytes).

With ``verify`` a stored block is read whole once and checked against its checksum before any part of it
is used, so verification costs reading every overlapping stored block whole. Blocks needed only in part are
read into one scratch buffer in turn (fresh memory for each would cost more than the read), and so are
the spans of runs read without ``verify``. A block wanted by a DTensor of a stateful object in ``like``
is assembled in the DTensor's own local memory (``read(..., into=)``), not in a new array.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from . import blocks, dtypes, remote_read, shard, tensorio, tree
from .errors import CorruptCheckpointError, StructureMismatchError
from .manifest import Manifest, TensorEntry
from .skeleton import ShardedRef, Stateful, TensorRef, children, iter_refs
from .storage import Readable, Storage

#: What one more request costs, in bytes read instead: a ranged GET's latency is worth about a megabyte on
#: an object store; a local read call (with its Python around it) about 64 KiB of a read from the page cache.
#: A region is read as one span from its first to its last byte unless splitting it by its first dimension
#: saves more than that per request.
GAP_BYTES = 1 << 20
LOCAL_GAP_BYTES = 64 << 10

Dims = tuple[int, ...]
Ref = TensorRef | ShardedRef


def block_indices(skeleton: Any, like: Any = tree.MISSING) -> set[int]:
    """Indices (in the manifest's tensor list) of the tensors to read block by block, only where wanted:
    the stored blocks of sharded arrays, and, given ``like``, the plain tensors whose template is restored
    block by block (a Shard, a DTensor, a JAX template of a global array): pass them to
    :class:`BlockReader` as ``ranged`` so that a process reads only its blocks' bytes of those too."""
    found = {index for ref in iter_refs(skeleton) if type(ref) is ShardedRef for index, _ in ref.blocks}
    if like is not tree.MISSING and (found or _several_processes()):
        found.update(
            ref.index for ref, at, _ in wanted_blocks(skeleton, like) if type(ref) is TensorRef and at is not None
        )
    return found


def _several_processes() -> bool:
    """Whether this program runs processes that may hold blocks of global arrays (JAX imported, or
    torch.distributed initialised): otherwise a plain tensor's template is no block of one, and looking
    for templates that are (which calls every object's ``state_dict()``) would cost a restore of many
    small tensors a tenth of its time. (A Shard template of a plain tensor in one process is then served
    from the whole tensor, as before.)"""
    if "jax" in sys.modules:
        return True
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def wanted_blocks(skeleton: Any, like: Any) -> list[tuple[Ref, Dims | None, Dims | None]]:
    """The blocks a restore with ``like`` will ask for: ``(ref, offsets, shape)``, ``None`` for a whole
    sharded array. A side-effect-free walk over plain containers and ``state_dict()`` s; what it cannot
    see is read when the rebuild asks for it."""
    out: list[tuple[Ref, Dims | None, Dims | None]] = []
    missing = tree.MISSING

    def visit(node: Any, tmpl: Any) -> None:
        t = type(node)
        if t is TensorRef or t is ShardedRef:
            if type(tmpl) is shard.Shard:
                out.append((node, tmpl.offsets, tmpl.local_shape))
            elif tmpl is not missing and shard.is_dtensor(tmpl):
                offsets, shape, _ = shard.dtensor_block(tmpl)
                out.append((node, offsets, shape))
            elif tmpl is not missing and (found := tree.global_layout(tmpl)) is not None:
                # what tree._shard_like will ask for: this process's devices' blocks, or their bounding box
                out.extend((node, offsets, shape) for offsets, shape in blocks.read_regions(found[2]))
            elif t is ShardedRef:
                out.append((node, None, None))
        elif t is Stateful:
            visit(node.state, tmpl.state_dict() if tree.is_stateful(tmpl) else missing)
        else:
            kids = list(children(node))
            by_key = t is dict and isinstance(tmpl, dict)
            by_index = t is not dict and isinstance(tmpl, list | tuple) and len(tmpl) == len(kids)
            for i, (k, v) in enumerate(kids):
                visit(v, tmpl.get(k, missing) if by_key else tmpl[i] if by_index else missing)

    visit(skeleton, like)
    return out


class BlockReader:
    """Blocks of a checkpoint's arrays, for :func:`ckptstore.tree.rebuild` (a ``BlockSource``).

    ``load`` gives the whole arrays that were loaded eagerly (the replicated ones). :meth:`prefetch` reads
    the blocks the rebuild will want before it starts, so a failed checksum stops the restore before any
    object is touched. Close the reader when done (it keeps files open between blocks).
    """

    def __init__(
        self,
        storage: Storage,
        name: str,
        m: Manifest,
        load: Callable[[int], np.ndarray],
        *,
        verify: bool,
        ranged: Collection[int] = (),
    ) -> None:
        self.storage, self.name, self.m, self.load, self.verify = storage, name, m, load, verify
        #: Plain tensors read as one stored block, only where wanted, never through ``load``.
        self.ranged = ranged
        self._files: dict[int, Readable] = {}
        self._sizes: dict[str, int] | None = None
        self._checked: set[int] = set()
        self._ready: dict[tuple[int, Dims | None, Dims | None], np.ndarray] = {}
        #: Where a stored block needed only in part (read whole and verified), or a span of runs, is read
        #: before its bytes are copied out, one after the other: its memory is touched once per restore, not
        #: once per block (fresh pages cost more than the copy).
        self._scratch: np.ndarray | None = None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._ready.clear()
        self._scratch = None

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefetch(self, wanted: list[tuple[Ref, Dims | None, Dims | None]]) -> None:
        """Read (and verify) these blocks now; :meth:`read` hands each out once. A block that does not fit
        its array (a template of another shape) is left to the rebuild, which names its key path."""
        for ref, offsets, shape in wanted:
            if offsets is not None and shape is not None:
                gshape = self.global_shape(ref)
                if len(offsets) != len(gshape) or any(o + n > g for o, n, g in zip(offsets, shape, gshape)):
                    continue
            self._ready[(id(ref), offsets, shape)] = self._read(ref, offsets, shape)

    def global_shape(self, node: Ref) -> Dims:
        if isinstance(node, ShardedRef):
            return node.global_shape
        return self._entry(node.index).shape

    def read(
        self, node: Ref, offsets: Dims | None = None, shape: Dims | None = None, *, into: np.ndarray | None = None
    ) -> np.ndarray:
        """The block (default: the whole array), or read into ``into`` (of its shape and the saved dtype)."""
        ready = self._ready.pop((id(node), offsets, shape), None)
        if ready is None:
            return self._read(node, offsets, shape, into)
        if into is None:
            return ready
        into[...] = ready
        return into

    # --- internals ----------------------------------------------------------------------------------

    def _entry(self, index: int) -> TensorEntry:
        if index >= len(self.m.tensors):
            raise CorruptCheckpointError(
                f"{self.storage.url_of(self.name)}: the tree refers to tensor #{index}, "
                f"the manifest lists {len(self.m.tensors)}"
            )
        return self.m.tensors[index]

    def _read(self, node: Ref, offsets: Dims | None, shape: Dims | None, into: np.ndarray | None = None) -> np.ndarray:
        gshape = self.global_shape(node)
        if offsets is None or shape is None:
            offsets, shape = (0,) * len(gshape), gshape
        if len(offsets) != len(gshape) or any(o + n > g for o, n, g in zip(offsets, shape, gshape)):
            raise StructureMismatchError(f"block at {offsets} of shape {shape} lies outside the array's {gshape}")
        if isinstance(node, TensorRef) and node.index in self.ranged:  # a stored array of one block
            node = ShardedRef(gshape, self._entry(node.index).dtype, ((node.index, (0,) * len(gshape)),))
        if isinstance(node, TensorRef):
            arr = self.load(node.index)
            if tuple(shape) != tuple(arr.shape):
                arr = arr[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]
                if into is None:
                    return np.ascontiguousarray(arr)
            if into is None:
                return arr
            into[...] = arr
            return into
        return self._assemble(node, offsets, shape, into)

    def _assemble(self, node: ShardedRef, offsets: Dims, shape: Dims, into: np.ndarray | None = None) -> np.ndarray:
        dtype = dtypes.dtype_of(node.dtype)
        parts = []
        for index, block_offsets in node.blocks:
            entry = self._entry(index)
            common = blocks.intersect(offsets, shape, block_offsets, entry.shape)
            if common is not None:
                # The file is there with the manifest's size before any memory is taken for its bytes: a
                # manifest cannot make a reader allocate more than the files it reads hold.
                self._rel(entry.file)
                parts.append((block_offsets, entry, common))
        if into is None:
            out = tensorio.new_buffer(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)
        elif into.dtype != dtype or into.shape != tuple(shape) or not into.flags.c_contiguous:
            raise StructureMismatchError(f"cannot read a {dtype} block of shape {shape} into {into.dtype} {into.shape}")
        else:
            out = into
        for block_offsets, entry, (lo, n) in parts:
            src = tuple(a - c for a, c in zip(lo, block_offsets))
            dst = out[tuple(slice(a - o, a - o + k) for a, o, k in zip(lo, offsets, n))]
            if n == entry.shape and dst.flags.c_contiguous:  # the whole stored block, straight into place
                raw = dst.reshape(-1).view(np.uint8)
                self._read_bytes(entry, entry.offset, entry.nbytes, raw)
                if self.verify:
                    tensorio.check(raw, entry, self.storage.url_of(f"{self.name}/{self.m.files[entry.file].name}"))
            elif self.verify:
                whole = self._verified(entry)
                dst[...] = whole[tuple(slice(s, s + k) for s, k in zip(src, n))]
            else:
                self._read_region(entry, entry.offset, entry.shape, src, n, dst)
        return out

    def _verified(self, entry: TensorEntry) -> np.ndarray:
        """The stored block ``entry``, read whole and checked, in the scratch buffer: valid until the next
        call."""
        raw = self._read_bytes(entry, entry.offset, entry.nbytes, self._scratch_bytes(entry.nbytes))
        tensorio.check(raw, entry, self.storage.url_of(f"{self.name}/{self.m.files[entry.file].name}"))
        return raw.view(dtypes.dtype_of(entry.dtype)).reshape(entry.shape)

    def _scratch_bytes(self, n: int) -> np.ndarray:
        """``n`` bytes of the scratch buffer (grown if needed): valid until the next call."""
        if self._scratch is None or self._scratch.nbytes < n:
            self._scratch = None  # the old one goes before its replacement is taken
            self._scratch = tensorio.new_buffer(n)
        return self._scratch[:n]

    def _rel(self, file_index: int) -> str:
        """The relative path of a tensor file, once its size is checked against the manifest."""
        fe = self.m.files[file_index]
        rel = f"{self.name}/{fe.name}"
        if file_index not in self._checked:
            if self._sizes is None:
                self._sizes = self.storage.sizes(self.name)
            actual = self._sizes.get(fe.name)
            if actual is None:
                raise CorruptCheckpointError(f"{self.storage.url_of(rel)} is missing")
            if actual != fe.size:
                raise CorruptCheckpointError(
                    f"{self.storage.url_of(rel)} has {actual} bytes, the manifest says {fe.size} (truncated?)"
                )
            self._checked.add(file_index)
        return rel

    def _file(self, file_index: int) -> Readable:
        f = self._files.get(file_index)
        if f is None:
            f = self._files[file_index] = self.storage.open_read(self._rel(file_index))
        return f

    def _read_region(
        self, entry: TensorEntry, base: int, cshape: Dims, start: Dims, shape: Dims, dst: np.ndarray
    ) -> None:
        """Copy the region ``start``/``shape`` of the row-major block of shape ``cshape`` whose first byte
        is at ``base`` into ``dst``: one read of the span from its first to its last element if the bytes
        between cost less than a request for each index of the first dimension (``GAP_BYTES`` each on an
        object store, ``LOCAL_GAP_BYTES`` on a local file), else one region per such index."""
        dtype = dtypes.dtype_of(entry.dtype)
        isz = dtype.itemsize
        strides = [math.prod(cshape[d + 1 :]) for d in range(len(cshape))]
        first = sum(s * st for s, st in zip(start, strides))
        last = sum((s + n - 1) * st for s, n, st in zip(start, shape, strides)) + 1
        needed = math.prod(shape)
        if needed == 0:
            return
        if last - first == needed and dst.flags.c_contiguous:  # one run, and a contiguous destination
            self._read_bytes(entry, base + first * isz, needed * isz, dst.reshape(-1).view(np.uint8))
            return
        per_request = GAP_BYTES if self.storage.ranged_reads else LOCAL_GAP_BYTES
        if len(shape) <= 1 or (last - first - needed) * isz <= shape[0] * per_request:
            span = (last - first) * isz
            buf = self._read_bytes(entry, base + first * isz, span, self._scratch_bytes(span))
            view = np.lib.stride_tricks.as_strided(
                buf.view(dtype), shape=shape, strides=tuple(st * isz for st in strides), writeable=False
            )
            dst[...] = view
            return
        for i in range(shape[0]):
            row_base = base + (start[0] + i) * strides[0] * isz
            self._read_region(entry, row_base, cshape[1:], start[1:], shape[1:], dst[i])

    def _read_bytes(self, entry: TensorEntry, pos: int, n: int, into: np.ndarray | None = None) -> np.ndarray:
        """``n`` bytes of ``entry``'s file from ``pos``, into ``into`` (contiguous uint8) or a new buffer:
        ranged requests, several at once, where the storage wants them; else a seek and reads."""
        buf = tensorio.new_buffer(n) if into is None else into
        if self.storage.ranged_reads:
            fetch = functools.partial(self.storage.read_range, self._rel(entry.file))
            got = remote_read.read_span(fetch, pos, buf)
        else:
            got = tensorio.read_into(self._file(entry.file), pos, buf)
        if got < n:
            source = self.storage.url_of(f"{self.name}/{self.m.files[entry.file].name}")
            raise CorruptCheckpointError(f"{source}: tensor {entry.name!r} is truncated")
        return buf
