"""The skeleton of a saved state: the node types a manifest's tree is made of, and one way to walk it.

A state is saved as a *skeleton* (plain msgpack values: dicts, lists, numbers, strings, ...) in which each
array is a :class:`TensorRef` (or a :class:`ShardedRef` for an array stored as blocks) and each object is a
small record (:class:`Stateful`, :class:`NamedTuple`, :class:`Scalar`); a value saved by each rank of a
job as its own (``ckptstore.PerRank``) is a :class:`PerRankValues` of every rank's. The manifest codec, the tree walk,
subset selection, the block reader and the CLI all see the skeleton through :func:`children` and
:func:`walk` here. This module knows nothing of frameworks or storage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import dtypes

__all__ = [
    "ArrayLeaf",
    "KeyPath",
    "NamedTuple",
    "PerRankValues",
    "Scalar",
    "ShardedRef",
    "Stateful",
    "TensorRef",
    "children",
    "is_extension",
    "iter_refs",
    "map_refs",
    "per_rank_nodes",
    "render_path",
    "walk",
]

KeyPath = tuple[Any, ...]


def render_path(path: KeyPath, root: str = "state") -> str:
    """``('opt', 'param_groups', 0)`` -> ``state['opt']['param_groups'][0]``."""
    return root + "".join(f"[{k!r}]" for k in path)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRef:
    """An array's place in the skeleton: its index in the manifest's tensor list."""

    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class ShardedRef:
    """A global array stored as blocks (the ranks' shards): its shape, dtype code, and each block as
    ``(index in the manifest's tensor list, offsets of its first element)``."""

    global_shape: tuple[int, ...]
    dtype: str
    blocks: tuple[tuple[int, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Stateful:
    """A stateful object, saved as its ``state_dict()``; ``type_name`` is for people, never imported."""

    type_name: str
    state: Any


@dataclasses.dataclass(frozen=True, slots=True)
class NamedTuple:
    """A NamedTuple, saved as its type name, field names and values."""

    type_name: str
    fields: tuple[str, ...]
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Scalar:
    """A NumPy scalar (``np.float32(1.5)``): its dtype code and raw bytes."""

    dtype: str
    data: bytes

    def value(self) -> np.generic:
        arr = np.frombuffer(self.data, dtype=dtypes.dtype_of(self.dtype))
        if arr.shape != (1,):
            from .errors import CorruptCheckpointError

            raise CorruptCheckpointError(f"numpy scalar of dtype {self.dtype} has {len(self.data)} bytes")
        return arr[0]


@dataclasses.dataclass(frozen=True, slots=True)
class PerRankValues:
    """A value each rank of the saving job saved as its own (``ckptstore.PerRank``): rank r's is
    ``values[r]``, a skeleton of its own whose arrays are plain tensors that rank wrote."""

    values: tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class ArrayLeaf:
    """An array met while flattening a state: where it was, and its host (NumPy) view."""

    path: KeyPath
    array: np.ndarray
    dtype: str
    #: For a :class:`ckptstore.Shard` (or DTensor) leaf: the global array's shape and this block's offsets.
    global_shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    #: Inside a ``ckptstore.PerRank``: this rank's own, written by it alone (never compared with the others').
    per_rank: bool = False
    #: Set where ``array`` is a view of a framework's immutable buffer (a JAX array on the CPU): a check that
    #: the buffer is still the array's (not deleted or donated). A background save writes such an array
    #: without a snapshot copy and checks it once its bytes are written (:func:`pipeline.check_intact`).
    intact: Callable[[], bool] | None = None


_REFS = (TensorRef, ShardedRef)
_NO_CHILDREN: tuple[tuple[Any, Any], ...] = ()


def children(node: Any) -> Iterable[tuple[Any, Any]]:
    """The ``(key, child)`` pairs of a container node, in order; none for a leaf.

    Keys extend the key path: dict keys, list and tuple indices, NamedTuple field names. A
    :class:`Stateful`'s state is its one child, under the key ``None``: it lies at its object's own path.
    A :class:`PerRankValues`' children are the ranks' values, under their rank.
    """
    t = type(node)
    if t is dict:
        return node.items()
    if t is list or t is tuple:
        return enumerate(node)
    if t is Stateful:
        return ((None, node.state),)
    if t is NamedTuple:
        return zip(node.fields, node.values)
    if t is PerRankValues:
        return enumerate(node.values)
    return _NO_CHILDREN


def is_extension(node: Any) -> bool:
    """Whether the codec stores ``node`` as a msgpack extension (nested calls of its unpacker)."""
    t = type(node)
    return t is tuple or t is Stateful or t is NamedTuple or t is PerRankValues


def walk(node: Any) -> Iterator[tuple[KeyPath, Any]]:
    """Every node of a skeleton with its key path, parents before children, in order (iterative: the
    depth of a skeleton never reaches Python's recursion limit here)."""
    stack: list[tuple[KeyPath, Any]] = [((), node)]
    while stack:
        path, x = stack.pop()
        yield path, x
        kids = children(x)
        if kids is _NO_CHILDREN:
            continue
        below = [(path if k is None else (*path, k), v) for k, v in kids]
        below.reverse()
        stack.extend(below)


def iter_refs(node: Any) -> Iterator[TensorRef | ShardedRef]:
    """Every :class:`TensorRef` and :class:`ShardedRef` of a skeleton, in order (no paths are built)."""
    stack = [node]
    while stack:
        x = stack.pop()
        if type(x) in _REFS:
            yield x
            continue
        kids = children(x)
        if kids is not _NO_CHILDREN:
            stack.extend(reversed([v for _, v in kids]))


def map_refs(node: Any, fn: Callable[[Any], Any], per_rank: Callable[[PerRankValues], Any] | None = None) -> Any:
    """A copy of a skeleton in which each :class:`TensorRef` and :class:`ShardedRef` is ``fn(ref)``, and,
    given ``per_rank``, each :class:`PerRankValues` node ``per_rank(node)`` (in the order of :func:`walk`;
    its values are not visited then)."""
    t = type(node)
    if t is TensorRef or t is ShardedRef:
        return fn(node)
    if t is dict:
        return {k: map_refs(v, fn, per_rank) for k, v in node.items()}
    if t is list:
        return [map_refs(v, fn, per_rank) for v in node]
    if t is tuple:
        return tuple(map_refs(v, fn, per_rank) for v in node)
    if t is Stateful:
        return Stateful(node.type_name, map_refs(node.state, fn, per_rank))
    if t is NamedTuple:
        return NamedTuple(node.type_name, node.fields, tuple(map_refs(v, fn, per_rank) for v in node.values))
    if t is PerRankValues:
        if per_rank is not None:
            return per_rank(node)
        return PerRankValues(tuple(map_refs(v, fn) for v in node.values))
    return node


def per_rank_nodes(node: Any) -> list[tuple[KeyPath, PerRankValues]]:
    """Every :class:`PerRankValues` node of a skeleton with its key path, in the order of :func:`walk`."""
    return [(path, x) for path, x in walk(node) if type(x) is PerRankValues]
