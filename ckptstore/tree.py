"""Walk a state tree: split it into a skeleton (plain values, msgpack-ready) and a list of arrays.

``flatten(state)`` returns the skeleton, in which every array is replaced by a :class:`TensorRef`
(its index in the array list), and the arrays with their key paths. ``rebuild(skeleton, load, like)``
does the reverse, converting each array to the framework, dtype and device of its counterpart in
``like`` and restoring stateful objects in place.

Containers: dict (and Mapping subclasses, saved as dict), list, tuple, NamedTuple. Stateful objects
(anything with ``state_dict()`` and ``load_state_dict()``) are saved as their state dict. Framework
objects without one (JAX pytree nodes, Keras layers and optimizers, NumPy generators) are saved as the
state their adapter gives (:class:`ckptstore.frameworks.ObjectAdapter`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from . import dtypes, shard
from .errors import CkptStoreError, CorruptCheckpointError, ShardingError, StructureMismatchError, UnsupportedTypeError
from .frameworks import Adapter, adapter_for, adapter_for_module, adapter_named, object_adapter_for
from .skeleton import ArrayLeaf, KeyPath, NamedTuple, Scalar, ShardedRef, Stateful, TensorRef, render_path

_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


# --- flatten ----------------------------------------------------------------------------------------

_PLAIN_TYPES = frozenset({str, bytes, float, bool, int, complex, type(None)})
_PLAIN_BASES: tuple[type, ...] = (bool, int, float, str, bytes)


def type_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def is_stateful(x: Any) -> bool:
    """Whether ``x`` is saved through ``state_dict()`` and restored through ``load_state_dict()``."""
    return callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))


def flatten(state: Any, *, snapshot: bool = False) -> tuple[Any, list[ArrayLeaf]]:
    """Split ``state`` into a skeleton and its arrays.

    With ``snapshot=True`` each array is copied to host memory that the caller's later in-place updates
    cannot reach (for saves that finish in the background).

    Raises:
        UnsupportedTypeError: a leaf cannot be saved; the message names its key path.
    """
    arrays: list[ArrayLeaf] = []

    def walk(x: Any, path: KeyPath) -> Any:
        t = type(x)
        if t in _PLAIN_TYPES:
            return x
        if t is dict:
            return {_key(k, path): walk(v, (*path, k)) for k, v in x.items()}
        if t is list:
            return [walk(v, (*path, i)) for i, v in enumerate(x)]
        if t is tuple:
            return tuple(walk(v, (*path, i)) for i, v in enumerate(x))
        if t is shard.Shard or shard.is_dtensor(x):
            return TensorRef(add_shard(x, path))
        adapter = adapter_for(x)
        if adapter is not None:
            return TensorRef(add_array(adapter, x, path))
        if isinstance(x, np.generic):
            code = dtypes.code_of(x.dtype)
            if code is None:
                raise UnsupportedTypeError(f"{render_path(path)} is a numpy scalar of dtype {x.dtype}")
            return Scalar(code, x.tobytes())
        if is_stateful(x):
            return Stateful(type_name(x), walk(x.state_dict(), path))
        if isinstance(x, Mapping):
            return {_key(k, path): walk(v, (*path, k)) for k, v in x.items()}
        if isinstance(x, tuple) and isinstance(getattr(x, "_fields", None), tuple):
            fields = tuple(str(f) for f in x._fields)  # type: ignore[attr-defined]
            return NamedTuple(type_name(x), fields, tuple(walk(v, (*path, f)) for f, v in zip(fields, x)))
        if isinstance(x, list):
            return walk(list(x), path)
        if isinstance(x, tuple):
            return walk(tuple(x), path)
        for base in _PLAIN_BASES:  # subclasses (IntEnum, StrEnum, ...) are saved as their base type
            if isinstance(x, base):
                # str() of a (str, Enum) member is "Cls.NAME"; str.__str__ gives the string's own value.
                return str.__str__(x) if base is str else base(x)
        found = object_adapter_for(x)  # a JAX pytree node, a Keras layer, a NumPy generator, ...
        if found is not None:
            return Stateful(type_name(x), walk(found[1], path))
        raise UnsupportedTypeError(
            f"{render_path(path)} is a {type_name(x)}, which ckptstore cannot save "
            "(arrays, containers, plain Python values and objects with state_dict() are supported)"
        )

    def add_array(adapter: Adapter, x: Any, path: KeyPath) -> int:
        try:
            host = adapter.to_numpy(x, copy=snapshot)
        except UnsupportedTypeError as e:
            raise UnsupportedTypeError(f"{render_path(path)}: {e}") from None
        code = dtypes.code_of(host.dtype)
        if code is None:
            raise UnsupportedTypeError(f"{render_path(path)} has dtype {host.dtype}, which safetensors cannot hold")
        arrays.append(ArrayLeaf(path, host, code))
        return len(arrays) - 1

    def add_shard(x: Any, path: KeyPath) -> int:
        try:
            s = x if type(x) is shard.Shard else shard.from_dtensor(x)
        except (UnsupportedTypeError, ShardingError) as e:
            raise type(e)(f"{render_path(path)}: {e}") from None
        if type(s) is not shard.Shard:  # a DTensor replicated on every mesh dimension: a plain array
            return add_array(adapter_for(s), s, path)  # type: ignore[arg-type]
        adapter = adapter_for(s.local)
        if adapter is None:
            raise UnsupportedTypeError(f"{render_path(path)} is a Shard of a {type_name(s.local)}, not of an array")
        index = add_array(adapter, s.local, path)
        arrays[index].global_shape, arrays[index].offsets = s.global_shape, s.offsets
        return index

    try:
        skeleton = walk(state, ())
    except RecursionError:  # a container that holds itself, or nesting deeper than Python's stack
        raise UnsupportedTypeError("the state nests too deeply to save (does a container hold itself?)") from None
    finally:
        walk = None  # type: ignore[assignment]  # see rebuild: a recursive closure is a reference cycle
    return skeleton, arrays


def _key(k: Any, path: KeyPath) -> Any:
    if type(k) is str or type(k) is int:
        return k
    if isinstance(k, str | int) and not isinstance(k, bool):
        return int(k) if isinstance(k, int) else str(k)
    raise UnsupportedTypeError(
        f"{render_path(path)} has a key of type {type(k).__name__} ({k!r}); dict keys must be str or int"
    )


# --- rebuild ----------------------------------------------------------------------------------------


class _Missing:
    """The type of :data:`MISSING`."""

    def __repr__(self) -> str:
        return "ckptstore.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: "No template given": the default of ``restore(like=...)``, and where a template has no counterpart. Pass
#: it to say "no ``like``" explicitly, e.g. from a wrapper that forwards its own ``like`` argument.
MISSING: Any = _Missing()


def rebuild(
    skeleton: Any,
    load: Callable[[int], np.ndarray],
    *,
    like: Any = MISSING,
    framework: str | None = None,
    blocks: BlockSource | None = None,
) -> Any:
    """Turn a skeleton back into a state tree.

    Args:
        skeleton: the decoded skeleton of a manifest.
        load: returns the host array of a tensor index.
        like: a template tree; each array comes back like its counterpart (framework, dtype, device) and
            each stateful object in it is restored in place. Its containers must match the checkpoint's;
            a plain value in it (``0``, ``None``, ``[]``, a dict of numbers) is a placeholder: what was
            saved there comes back as saved.
        framework: arrays without a counterpart in ``like`` come back as this framework's arrays
            (default numpy).
        blocks: reads blocks of arrays, for :class:`ShardedRef` nodes and for ``like`` leaves that are
            :class:`ckptstore.Shard` s or DTensors (default: slices of ``load``'s whole arrays).

    Raises:
        StructureMismatchError: ``like`` does not fit the checkpoint; the message names the key path.
    """
    default = adapter_named(framework or "numpy")
    source = blocks if blocks is not None else _WholeArrays(load)

    def walk(node: Any, tmpl: Any, path: KeyPath, fallback: Adapter, strict: bool) -> Any:
        if tmpl is not MISSING and is_plain(tmpl):
            tmpl = MISSING  # a plain placeholder (0, None, [], {"lr": 0.1}): the checkpoint's value wins
        if type(node) is TensorRef or type(node) is ShardedRef:
            if tmpl is not MISSING and (type(tmpl) is shard.Shard or shard.is_dtensor(tmpl)):
                return _shard_like(node, tmpl, path, source)
            arr = load(node.index) if type(node) is TensorRef else source.read(node)
            if tmpl is MISSING or tmpl is None:
                return _untemplated(fallback, arr, path)
            adapter = adapter_for(tmpl)
            if adapter is None:
                if strict:
                    raise StructureMismatchError(
                        f"{render_path(path)}: the checkpoint holds an array, `like` a {type_name(tmpl)}"
                    )
                return _untemplated(fallback, arr, path)
            shape = tuple(getattr(tmpl, "shape", arr.shape))
            if shape != arr.shape:
                raise StructureMismatchError(
                    f"{render_path(path)}: the checkpoint's array has shape {arr.shape}, `like`'s {shape}"
                )
            return adapter.from_numpy(arr, tmpl)
        if type(node) is dict:
            if tmpl is MISSING or not isinstance(tmpl, Mapping):
                if tmpl is not MISSING and (is_stateful(tmpl) or object_adapter_for(tmpl) is not None):
                    # a saved state dict (torch's, or a JAX params dict) restored into an object
                    return walk(Stateful("dict", node), tmpl, path, fallback, strict)
                _mismatch(strict, tmpl, path, "a dict")
                return {k: walk(v, MISSING, (*path, k), fallback, strict) for k, v in node.items()}
            if strict and tmpl.keys() != node.keys():
                missing = [k for k in tmpl if k not in node]
                extra = [k for k in node if k not in tmpl]
                raise StructureMismatchError(
                    f"{render_path(path)}: keys differ; in `like` only: {missing}, in the checkpoint only: {extra}"
                )
            out = {k: walk(v, tmpl.get(k, MISSING), (*path, k), fallback, strict) for k, v in node.items()}
            return out
        if type(node) is list or type(node) is tuple:
            if tmpl is MISSING or not isinstance(tmpl, list | tuple) or len(tmpl) != len(node):
                _mismatch(strict, tmpl, path, f"a {type(node).__name__} of {len(node)}")
                items = [walk(v, MISSING, (*path, i), fallback, strict) for i, v in enumerate(node)]
            else:
                items = [walk(v, t, (*path, i), fallback, strict) for i, (v, t) in enumerate(zip(node, tmpl))]
            return items if type(node) is list else tuple(items)
        if type(node) is NamedTuple:
            if tmpl is not MISSING and isinstance(tmpl, tuple) and getattr(tmpl, "_fields", None) == node.fields:
                values = [walk(v, t, (*path, f), fallback, strict) for f, v, t in zip(node.fields, node.values, tmpl)]
                return type(tmpl)(*values)
            _mismatch(strict, tmpl, path, f"a NamedTuple {node.type_name}")
            return {f: walk(v, MISSING, (*path, f), fallback, strict) for f, v in zip(node.fields, node.values)}
        if type(node) is Stateful:
            if tmpl is not MISSING and is_stateful(tmpl):
                hint = adapter_for_stateful(tmpl) or fallback
                state = walk(node.state, tmpl.state_dict(), path, hint, False)
                try:
                    tmpl.load_state_dict(state)
                except CkptStoreError:
                    raise
                except Exception as e:  # torch raises RuntimeError, KeyError, ... for a state that does not fit
                    raise StructureMismatchError(
                        f"{render_path(path)}: {type_name(tmpl)}.load_state_dict rejects the checkpoint's state "
                        f"({type(e).__name__}: {e})"
                    ) from e
                return tmpl
            found = None if tmpl is MISSING else object_adapter_for(tmpl)
            if found is not None:
                adapter, template = found
                return adapter.restore_object(
                    tmpl,
                    node.state,
                    template,
                    lambda n, t, k: walk(n, t, (*path, *k), adapter, strict),
                    render_path(path),
                )
            if isinstance(tmpl, Mapping | list | tuple):  # an object's state into plain containers (of arrays)
                return walk(node.state, tmpl, path, fallback, strict)
            _mismatch(strict, tmpl, path, f"the state of a {node.type_name}")
            return walk(node.state, MISSING, path, fallback, strict)
        if type(node) is Scalar:
            return node.value()
        return node

    try:
        return walk(skeleton, like, (), default, like is not MISSING)
    finally:
        # A recursive closure is a reference cycle (walk -> its cell -> walk) that holds ``load``, and with
        # it every array read: without this, a restored state's memory stays until the garbage collector
        # runs, not when the caller drops it.
        walk = None  # type: ignore[assignment]


def _untemplated(adapter: Adapter, arr: np.ndarray, path: KeyPath) -> Any:
    """``arr`` as an array of the ``framework=`` adapter; one it cannot hold is an error naming its path."""
    try:
        return adapter.from_numpy(arr, None)
    except UnsupportedTypeError as e:
        raise UnsupportedTypeError(f"{render_path(path)}: {e}") from None


def is_plain(x: Any) -> bool:
    """Whether ``x`` is plain data: no arrays, stateful or custom objects anywhere in it."""
    t = type(x)
    if t in _PLAIN_TYPES:
        return True
    if t is list or t is tuple:
        return all(is_plain(v) for v in x)
    if t is dict:
        return all(is_plain(v) for v in x.values())
    return False


class BlockSource(Protocol):
    """Reads arrays, or blocks of them, for :func:`rebuild`."""

    def global_shape(self, node: TensorRef | ShardedRef) -> tuple[int, ...]:
        """The shape of the whole array."""
        ...

    def read(
        self, node: TensorRef | ShardedRef, offsets: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None
    ) -> np.ndarray:
        """The block of ``shape`` at ``offsets`` (default: the whole array) as a fresh host array."""
        ...


class _WholeArrays:
    """Blocks cut from whole arrays (for callers that load every tensor whole)."""

    def __init__(self, load: Callable[[int], np.ndarray]) -> None:
        self.load = load

    def global_shape(self, node: TensorRef | ShardedRef) -> tuple[int, ...]:
        if isinstance(node, ShardedRef):
            return node.global_shape
        return tuple(self.load(node.index).shape)

    def read(
        self, node: TensorRef | ShardedRef, offsets: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None
    ) -> np.ndarray:
        if isinstance(node, ShardedRef):
            raise CorruptCheckpointError("a sharded array cannot be read without a block reader")
        arr = self.load(node.index)
        if offsets is None or shape is None:
            return arr
        return np.ascontiguousarray(arr[tuple(slice(o, o + n) for o, n in zip(offsets, shape))])


def _shard_like(node: TensorRef | ShardedRef, tmpl: Any, path: KeyPath, source: BlockSource) -> Any:
    """This rank's block of a saved array, shaped by a Shard or DTensor template."""
    gshape = source.global_shape(node)
    if type(tmpl) is shard.Shard:
        offsets, shape, want, local_tmpl = tmpl.offsets, tmpl.local_shape, tmpl.global_shape, tmpl.local
    else:
        offsets, shape, _ = shard.dtensor_block(tmpl)
        want, local_tmpl = tuple(int(d) for d in tmpl.shape), tmpl.to_local()
    if gshape != want:
        raise StructureMismatchError(
            f"{render_path(path)}: the checkpoint's array has shape {gshape}, `like`'s global shape is {want}"
        )
    arr = source.read(node, offsets, shape)
    local = (adapter_for(local_tmpl) or adapter_named("numpy")).from_numpy(arr, local_tmpl)
    if type(tmpl) is shard.Shard:
        return shard.Shard(local, gshape, offsets)
    return shard.dtensor_like(tmpl, local)


def _mismatch(strict: bool, tmpl: Any, path: KeyPath, what: str) -> None:
    if strict and tmpl is not MISSING:
        raise StructureMismatchError(f"{render_path(path)}: the checkpoint holds {what}, `like` a {type_name(tmpl)}")


def adapter_for_stateful(obj: Any) -> Adapter | None:
    """Arrays inside a stateful object's state come back in the framework of the object's class (or of a
    base class: a user's ``nn.Module`` subclass is torch's) where its ``state_dict()`` has no counterpart."""
    for cls in type(obj).__mro__:
        adapter = adapter_for_module(cls.__module__)
        if adapter is not None:
            return adapter
    return None
