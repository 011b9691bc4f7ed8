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

import dataclasses
import inspect
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from . import blocks, dtypes, shard
from .bounce import DeviceTarget
from .errors import (
    CkptStoreError,
    CorruptCheckpointError,
    ShardingError,
    StructureMismatchError,
    UnsupportedTypeError,
    WorldSizeError,
)
from .frameworks import Adapter, adapter_for, adapter_for_module, adapter_named, object_adapter_for
from .skeleton import (
    ArrayLeaf,
    KeyPath,
    NamedTuple,
    PerRankValues,
    Scalar,
    ShardedRef,
    Stateful,
    TensorRef,
    map_refs,
    per_rank_nodes,
    render_path,
)
from .skeleton import walk as walk_tree

_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1
#: Most decimal digits of an int outside 64 bits: the manifest stores such an int as its decimal text and
#: reads back at most this many digits (Python's default ``sys.get_int_max_str_digits()``).
MAX_INT_DIGITS = 4300
_INT_TOO_BIG = 10**MAX_INT_DIGITS


# --- flatten ----------------------------------------------------------------------------------------

_PLAIN_TYPES = frozenset({str, bytes, float, bool, int, complex, type(None)})
_PLAIN_BASES: tuple[type, ...] = (bool, int, float, complex, str, bytes)


def type_name(x: Any) -> str:
    t = type(x)
    name = f"{t.__module__}.{t.__qualname__}"
    # For people only, but written into the manifest: a name UTF-8 cannot hold (a lone surrogate) is escaped.
    return name if name.isascii() else name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_stateful(x: Any) -> bool:
    """Whether ``x`` is saved through ``state_dict()`` and restored through ``load_state_dict()``: both are
    methods (or functions). A callable that ``__getattr__`` makes up for any name is none: ``nnx.Rngs``
    answers ``rngs.state_dict`` with a random stream, which draws a key when called."""
    return inspect.isroutine(getattr(x, "state_dict", None)) and inspect.isroutine(getattr(x, "load_state_dict", None))


def flatten(state: Any, *, snapshot: bool = False, defer_devices: bool = False) -> tuple[Any, list[ArrayLeaf]]:
    """Split ``state`` into a skeleton and its arrays.

    With ``snapshot=True`` each array is copied to host memory that the caller's later in-place updates
    cannot reach (for saves that finish in the background). With ``defer_devices=True`` an array on an
    accelerator whose framework can (torch) is left there, as a ``DeviceArray`` in place of its host
    array, for an async save's snapshot to copy straight into its buffer (``asyncsave``).

    Raises:
        UnsupportedTypeError: a leaf cannot be saved; the message names its key path.
    """
    arrays: list[ArrayLeaf] = []
    per_rank_depth: list[KeyPath] = []  # the PerRank being walked, if any

    def walk(x: Any, path: KeyPath) -> Any:
        t = type(x)
        if t in _PLAIN_TYPES:
            if t is str:
                if not x.isascii():  # O(1): CPython keeps the flag
                    _check_text(x, path)
            elif t is int and not _INT64_MIN <= x <= _UINT64_MAX:
                _check_int(x, path)
            return x
        if t is dict:
            return walk_items(x.items(), path)
        if t is list:
            return [walk(v, (*path, i)) for i, v in enumerate(x)]
        if t is tuple:
            return tuple(walk(v, (*path, i)) for i, v in enumerate(x))
        if t is shard.Shard or shard.is_dtensor(x) or shard.is_global_jax(x):
            return add_shard(x, path)
        if t is shard.PerRank:
            return add_per_rank(x, path)
        adapter = adapter_for(x)
        if adapter is not None:
            return TensorRef(add_array(adapter, x, path))
        if isinstance(x, np.generic):
            code = dtypes.code_of(x.dtype)
            if code is not None:
                return Scalar(code, x.tobytes())
            if isinstance(x, str | bytes):  # np.str_, np.bytes_: saved as the plain str or bytes they are
                return walk(str.__str__(x) if isinstance(x, str) else bytes(x), path)
            raise UnsupportedTypeError(f"{render_path(path)} is a numpy scalar of dtype {x.dtype}")
        if is_stateful(x):
            return Stateful(type_name(x), walk(_call(x.state_dict, path, f"{type_name(x)}.state_dict()"), path))
        if isinstance(x, Mapping):
            return walk_items(_call(lambda: list(x.items()), path, "items()"), path)
        if isinstance(x, tuple) and isinstance(getattr(x, "_fields", None), tuple):
            fields = _fields(x, path)
            return NamedTuple(type_name(x), fields, tuple(walk(v, (*path, f)) for f, v in zip(fields, x)))
        if isinstance(x, list):
            return walk(list(x), path)
        if isinstance(x, tuple):
            return walk(tuple(x), path)
        for base in _PLAIN_BASES:  # subclasses (IntEnum, StrEnum, ...) are saved as their base type
            if isinstance(x, base):
                # str() of a (str, Enum) member is "Cls.NAME"; str.__str__ gives the string's own value.
                return walk(str.__str__(x) if base is str else base(x), path)
        found = _call(lambda: object_adapter_for(x), path, "reading its state")  # a JAX pytree node, a Keras layer...
        if found is not None:
            return Stateful(type_name(x), walk(found[1], path))
        raise UnsupportedTypeError(
            f"{render_path(path)} is a {type_name(x)}, which ckptstore cannot save "
            "(arrays, containers, plain Python values and objects with state_dict() are supported)"
        )

    def walk_items(items: Collection[tuple[Any, Any]], path: KeyPath) -> dict[Any, Any]:
        out = {}
        for k, v in items:
            t = type(k)
            if not ((t is str and k.isascii()) or (t is int and _INT64_MIN <= k <= _UINT64_MAX)):
                k = _key(k, path)
            out[k] = walk(v, (*path, k))
        if len(out) != len(items):  # two keys saved as one (str subclasses whose instances differ, ...)
            _duplicate_key(items, path)
        return out

    def add_array(adapter: Adapter, x: Any, path: KeyPath) -> int:
        if defer_devices and (later := _device_array(adapter, x)) is not None:
            arrays.append(ArrayLeaf(path, later, dtypes.code_of(later.dtype) or ""))
            return len(arrays) - 1
        try:
            host = adapter.to_numpy(x, copy=snapshot)
        except UnsupportedTypeError as e:
            raise UnsupportedTypeError(f"{render_path(path)}: {e}") from None
        except CkptStoreError:
            raise
        except Exception as e:  # the framework refuses to give its bytes (a tf.resource tensor, a fake tensor...)
            raise UnsupportedTypeError(
                f"{render_path(path)}: a {type_name(x)} whose values cannot be read ({type(e).__name__}: {e})"
            ) from e
        code = dtypes.code_of(host.dtype)
        if code is None:
            raise UnsupportedTypeError(f"{render_path(path)} has dtype {host.dtype}, which safetensors cannot hold")
        immutable = None if snapshot else getattr(adapter, "immutable_view", None)
        arrays.append(ArrayLeaf(path, host, code, intact=immutable(x, host) if immutable else None))
        return len(arrays) - 1

    def add_shard(x: Any, path: KeyPath) -> Any:
        """The node of a sharded leaf (a Shard, a DTensor, a JAX global array). A JAX global array puts
        this process's distinct blocks in a row of ``arrays``, the reference naming the first
        (``pipeline.prepare`` groups them again); replicated everywhere, it is the plain array it is."""
        try:
            if type(x) is shard.Shard:
                s: Any = x
            elif shard.is_dtensor(x):
                s = shard.from_dtensor(x)
            else:
                s = shard.from_global_jax(x)
        except (UnsupportedTypeError, ShardingError) as e:
            raise type(e)(f"{render_path(path)}: {e}") from None
        if type(s) is list:
            if not s:
                raise ShardingError(f"{render_path(path)}: a JAX array of which this process holds no block")
            first, *_ = [add_block(b, path) for b in s]
            return TensorRef(first)
        if type(s) is not shard.Shard:  # replicated on every device or rank: a plain array
            return walk(s, path)
        return TensorRef(add_block(s, path))

    def add_per_rank(x: shard.PerRank, path: KeyPath) -> PerRankValues:
        """This rank's value, its arrays marked as its own (``ArrayLeaf.per_rank``)."""
        if per_rank_depth:
            raise UnsupportedTypeError(f"{render_path(path)}: a PerRank inside a PerRank")
        first = len(arrays)
        per_rank_depth.append(path)
        try:
            node = walk(x.value, path)
        finally:
            per_rank_depth.pop()
        for a in arrays[first:]:
            if a.global_shape is not None:
                raise ShardingError(
                    f"{render_path(a.path)}: a block of a global array inside a PerRank (a rank's own value "
                    "holds whole arrays)"
                )
            a.per_rank = True
        return PerRankValues((node,))

    def add_block(s: shard.Shard, path: KeyPath) -> int:
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
    """A dict key as saved: a str or an int (an Enum member or other subclass as its plain value)."""
    t = type(k)
    if t is str:
        if not k.isascii():
            _check_text(k, path, key=True)
        return k
    if t is int:
        if not _INT64_MIN <= k <= _UINT64_MAX:
            _check_int(k, path, key=True)
        return k
    if isinstance(k, str):  # str() of a (str, Enum) member is "Cls.NAME": str.__str__ gives its value
        return _key(str.__str__(k), path)
    if isinstance(k, int) and not isinstance(k, bool):
        return _key(int(k), path)
    raise UnsupportedTypeError(
        f"{render_path(path)} has a key of type {type(k).__name__} ({_short_repr(k)}); dict keys must be str or int"
    )


def _duplicate_key(items: Iterable[tuple[Any, Any]], path: KeyPath) -> None:
    seen: dict[Any, Any] = {}
    for k, _ in items:
        key = _key(k, path)
        if key in seen:
            raise UnsupportedTypeError(
                f"{render_path(path)} has two keys that are saved as the same key {key!r}: "
                f"{_short_repr(seen[key])} and {_short_repr(k)} (a str or int subclass is saved as its plain value)"
            )
        seen[key] = k
    raise UnsupportedTypeError(f"{render_path(path)}: the mapping changed while it was saved")


def _check_text(s: str, path: KeyPath, *, key: bool = False) -> None:
    """A str the manifest can hold: UTF-8, so no lone surrogate (``'\\ud800'``, from ``surrogateescape``)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        what = "has a key that holds" if key else "holds"
        raise UnsupportedTypeError(
            f"{render_path(path)} {what} a lone surrogate {s[e.start]!r} at index {e.start}, which UTF-8 (and so "
            "a checkpoint) cannot hold; decode such text properly, or save it as bytes "
            "(s.encode('utf-8', 'surrogateescape'))"
        ) from None


def _check_int(x: int, path: KeyPath, *, key: bool = False) -> None:
    """An int outside 64 bits, which the manifest stores as decimal text: at most :data:`MAX_INT_DIGITS`
    digits, and no more than this process may convert to text (``sys.get_int_max_str_digits()``)."""
    limit = sys.get_int_max_str_digits()
    digits = min(limit, MAX_INT_DIGITS) if limit else MAX_INT_DIGITS
    if abs(x) < (_INT_TOO_BIG if digits == MAX_INT_DIGITS else 10**digits):
        return
    what = "has a key that is" if key else "is"
    why = (
        f"a checkpoint holds ints of at most {MAX_INT_DIGITS} digits"
        if digits == MAX_INT_DIGITS
        else f"this process converts ints of at most {digits} digits to text (sys.set_int_max_str_digits)"
    )
    raise UnsupportedTypeError(
        f"{render_path(path)} {what} an int of more than {digits} decimal digits (about "
        f"{int(x.bit_length() * 0.30103) + 1}); {why}: save it as bytes (x.to_bytes(...))"
    )


def _fields(x: Any, path: KeyPath) -> tuple[str, ...]:
    """A NamedTuple's field names, which restoring needs as they are: distinct str, one per value."""
    fields = x._fields
    if len(fields) != len(x) or not all(type(f) is str for f in fields) or len(set(fields)) != len(fields):
        raise UnsupportedTypeError(
            f"{render_path(path)} is a {type_name(x)} whose _fields {_short_repr(fields)} do not name its "
            f"{len(x)} values one to one (distinct str names); make it a plain tuple or a NamedTuple"
        )
    for f in fields:
        if not f.isascii():
            _check_text(f, path)
    return tuple(fields)


def _call(fn: Callable[[], Any], path: KeyPath, what: str) -> Any:
    """``fn()`` of a user's object (``state_dict()``, ``items()``); what it raises is named with the path."""
    try:
        return fn()
    except CkptStoreError:
        raise
    except Exception as e:
        raise UnsupportedTypeError(f"{render_path(path)}: {what} raised {type(e).__name__}: {e}") from e


def _short_repr(x: Any, limit: int = 80) -> str:
    try:
        text = repr(x)
    except Exception:  # an int past the digits limit, a broken __repr__
        text = f"<a {type(x).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# --- per-rank values ---------------------------------------------------------------------------------


def select_rank(skeleton: Any, like: Any, rank: int, world: int, *, saved_per_rank: bool = True) -> tuple[Any, Any]:
    """The skeleton and ``like`` as this rank restores them: each per-rank node (:class:`PerRankValues`)
    becomes this rank's value where as many ranks saved it as restore it; else, where ``like`` holds a
    :class:`ckptstore.PerRank` with a ``reshard`` function there, the list of every saved rank's value,
    ``like``'s template becoming a :class:`_Reshard` (the rebuild restores the list and calls it). Each
    ``PerRank`` of ``like`` (found through its dicts, lists and tuples) becomes its value otherwise.
    ``saved_per_rank`` False: the skeleton holds no per-rank node (a manifest of version 1), it is not
    walked.

    Raises:
        WorldSizeError: per-rank values saved by another number of ranks, and no ``reshard`` for them.
    """
    templates: dict[KeyPath, shard.PerRank] = {}
    if like is not MISSING:
        _find_per_rank(like, (), templates)
    nodes = per_rank_nodes(skeleton) if saved_per_rank else []
    if not nodes and not templates:
        return skeleton, like
    into: dict[KeyPath, Any] = {path: t.value for path, t in templates.items()}
    chosen: list[Any] = []
    for path, node in nodes:
        t = templates.get(path)
        n = len(node.values)
        if n == world:
            chosen.append(node.values[rank])
        elif t is not None and t.reshard is not None:
            chosen.append(list(node.values))
            into[path] = _Reshard(t.value, t.reshard, rank, world)
        else:
            raise WorldSizeError(
                f"{render_path(path)} was saved per rank by {n} rank{'s' * (n != 1)}; this job has {world}: "
                "what each rank gets then is the caller's choice (pass a ckptstore.PerRank(template, "
                "reshard=fn) there in `like`; fn(saved values, rank, world size) returns this rank's)"
            )
    if nodes:
        picks = iter(chosen)
        skeleton = map_refs(skeleton, _same, lambda _: next(picks))
    return skeleton, _replace_at(like, (), into) if into else like


def without_per_rank(like: Any) -> Any:
    """``like`` with each :class:`ckptstore.PerRank` in it (found as :func:`select_rank` finds them) as its
    value: what a restore of nothing gives back."""
    templates: dict[KeyPath, shard.PerRank] = {}
    _find_per_rank(like, (), templates)
    return _replace_at(like, (), {path: t.value for path, t in templates.items()}) if templates else like


def _same(ref: Any) -> Any:
    return ref


class _Reshard:
    """``like``'s template where per-rank values saved by another number of ranks are restored: the rebuild
    restores every saved rank's value without a template and hands the list to :meth:`apply`."""

    __slots__ = ("fn", "rank", "template", "world")

    def __init__(self, template: Any, fn: Callable[[list[Any], int, int], Any], rank: int, world: int) -> None:
        self.template, self.fn, self.rank, self.world = template, fn, rank, world

    def apply(self, saved: Any) -> Any:
        value = self.fn(list(saved), self.rank, self.world)
        if is_stateful(self.template):
            self.template.load_state_dict(value)
            return self.template
        return value


def _find_per_rank(x: Any, path: KeyPath, out: dict[KeyPath, shard.PerRank]) -> None:
    """Every :class:`ckptstore.PerRank` of ``like`` reached through dicts, lists and tuples (Mappings and
    NamedTuples too), by key path. One type check per item: a like of 100,000 arrays costs little."""
    t = type(x)
    if t is shard.PerRank:
        out[path] = x
        return
    if t is dict or (isinstance(x, Mapping) and not is_stateful(x)):
        items: Iterable[tuple[Any, Any]] = x.items()
    elif t is list or t is tuple:
        items = enumerate(x)
    elif isinstance(x, tuple) and isinstance(fields := getattr(x, "_fields", None), tuple):
        items = zip(fields, x)
    else:
        return
    opens: dict[type, bool] = {}  # per type of item: whether it may hold a PerRank
    for k, v in items:
        tv = type(v)
        inside = opens.get(tv)
        if inside is None:
            inside = opens[tv] = tv is shard.PerRank or issubclass(tv, Mapping | list | tuple)
        if inside:
            _find_per_rank(v, (*path, k), out)


def _replace_at(x: Any, path: KeyPath, into: dict[KeyPath, Any]) -> Any:
    """``x`` with the node at each path of ``into`` replaced (containers on the way copied, as dicts,
    lists and tuples)."""
    if path in into:
        return into[path]
    if not any(p[: len(path)] == path for p in into):
        return x
    if isinstance(x, Mapping):
        return {k: _replace_at(v, (*path, k), into) for k, v in x.items()}
    if isinstance(x, tuple) and isinstance(fields := getattr(x, "_fields", None), tuple):
        return type(x)(*(_replace_at(v, (*path, f), into) for f, v in zip(fields, x)))
    if isinstance(x, list | tuple):
        return type(x)(_replace_at(v, (*path, i), into) for i, v in enumerate(x))
    return x


@dataclasses.dataclass
class Unmatched:
    """What a ``strict=False`` rebuild could not match: key paths of ``like`` that the checkpoint lacks
    (``missing``: kept as they are in ``like``) and of the checkpoint that ``like`` lacks (``unexpected``:
    dropped)."""

    missing: list[KeyPath] = dataclasses.field(default_factory=list)
    unexpected: list[KeyPath] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected)


def rebuild(
    skeleton: Any,
    load: Callable[[int], np.ndarray],
    *,
    like: Any = MISSING,
    framework: str | None = None,
    blocks: BlockSource | None = None,
    strict: bool = True,
    unmatched: Unmatched | None = None,
    in_place: InPlaceReader | None = None,
) -> Any:
    """Turn a skeleton back into a state tree.

    Args:
        skeleton: the decoded skeleton of a manifest.
        load: returns the host array of a tensor index.
        like: a template tree; each array comes back like its counterpart (framework, dtype, device) and
            each stateful object in it is restored in place. Its containers must match the checkpoint's;
            a plain value in it (``0``, ``None``, ``[]``, a dict of numbers) is a placeholder: what was
            saved there comes back as saved, except that a 0-d array saved where it holds a Python number
            comes back as a Python number (:func:`_as_number`).
        framework: arrays without a counterpart in ``like`` come back as this framework's arrays
            (default numpy).
        blocks: reads blocks of arrays, for :class:`ShardedRef` nodes and for ``like`` leaves that are
            :class:`ckptstore.Shard` s or DTensors (default: slices of ``load``'s whole arrays).
        strict: False tolerates dict keys that differ between ``like`` and the checkpoint (and the top-level
            keys of a stateful object's state dict): a key only ``like`` has keeps ``like``'s value (an
            object in it is left as it is; a torch module gets ``load_state_dict(..., strict=False)``),
            a key only the checkpoint has is dropped. Everything else (shapes, dtypes, types, list
            lengths) must still fit.
        unmatched: where a ``strict=False`` rebuild records the key paths it could not match.
        in_place: reads tensors straight into the memory of the tensors of ``like``'s stateful objects
            (:func:`fill_targets`), just before each object's ``load_state_dict``, which is then given
            those very tensors (torch's ``copy_`` of a tensor onto itself returns at once). Arrays that are
            not inside such an object are never filled in place: there ``like`` is a template only.

    Raises:
        StructureMismatchError: ``like`` does not fit the checkpoint; the message names the key path.
        CorruptCheckpointError: from ``load``, or from ``in_place`` (a tensor read in place fails its
            checksum); once a tensor was filled in place, either error says that ``like``'s objects were
            partly overwritten.
    """
    default = adapter_named(framework or "numpy")
    source = blocks if blocks is not None else _WholeArrays(load)
    report = unmatched if unmatched is not None else Unmatched()
    #: tensor index -> the tensor of `like` it was read into (in place)
    filled: dict[int, Any] = {}
    #: id of a skeleton node -> the DTensor of `like` whose block of it is to be read into its local memory
    #: (see Fills), and whether any such block was read
    into_blocks: dict[int, BlockFill] = {}
    blocks_read = False

    def walk(node: Any, tmpl: Any, path: KeyPath, fallback: Adapter, strict: bool) -> Any:
        nonlocal blocks_read
        if type(tmpl) is _Reshard:  # per-rank values of another number of ranks (select_rank)
            return tmpl.apply(walk(node, MISSING, path, fallback, strict))
        if tmpl is not MISSING and is_plain(tmpl):
            # a plain placeholder (0, None, [], {"lr": 0.1}): the checkpoint's value wins
            return walk_plain(node, tmpl, path, fallback)
        if type(node) is TensorRef or type(node) is ShardedRef:
            if filled and type(node) is TensorRef and filled.get(node.index) is tmpl:
                return tmpl  # its bytes were read into it: load_state_dict gets it back as it is
            if tmpl is not MISSING and is_block_template(tmpl):
                target = into_blocks.pop(id(node), None) if into_blocks else None
                if target is not None and target[0] is tmpl:
                    blocks_read = True
                    return _shard_like(node, tmpl, path, source, into=target)
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
            try:
                shape = tuple(getattr(tmpl, "shape", arr.shape))
            except Exception as e:  # a nested torch tensor has no shape
                raise StructureMismatchError(
                    f"{render_path(path)}: `like`'s {type_name(tmpl)} has no shape to hold the checkpoint's array "
                    f"({type(e).__name__}: {e})"
                ) from e
            if shape != arr.shape:
                raise StructureMismatchError(
                    f"{render_path(path)}: the checkpoint's array has shape {arr.shape}, `like`'s {shape}"
                )
            return _convert(adapter, arr, tmpl, path)
        if type(node) is dict:
            if tmpl is MISSING or not isinstance(tmpl, Mapping):
                if tmpl is not MISSING and (is_stateful(tmpl) or object_adapter_for(tmpl) is not None):
                    # a saved state dict (torch's, or a JAX params dict) restored into an object
                    return walk(Stateful("dict", node), tmpl, path, fallback, strict)
                _mismatch(strict, tmpl, path, "a dict")
                return {k: walk(v, MISSING, (*path, k), fallback, strict) for k, v in node.items()}
            if strict and tmpl.keys() != node.keys():
                renamed = _legacy_enum_keys(tmpl, node)
                if renamed is not None:  # written before Enum keys were saved as their values
                    return {
                        renamed.get(k, k): walk(v, tmpl[renamed.get(k, k)], (*path, k), fallback, strict)
                        for k, v in node.items()
                    }
                missing = [k for k in tmpl if k not in node]
                extra = [k for k in node if k not in tmpl]
                if not tolerant:
                    raise StructureMismatchError(
                        f"{render_path(path)}: keys differ; in `like` only: {missing}, in the checkpoint only: {extra}"
                    )
                # like's order; what only like has is returned as it is in like, what only the checkpoint has dropped
                out = {}
                for k, t in tmpl.items():
                    if k in node:
                        out[k] = walk(node[k], t, (*path, k), fallback, strict)
                    else:
                        report.missing.append((*path, k))
                        out[k] = t
                report.unexpected.extend((*path, k) for k in extra)
                return out
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
                try:
                    return type(tmpl)(*values)
                except Exception as e:  # a NamedTuple subclass whose __new__ checks its values
                    raise StructureMismatchError(
                        f"{render_path(path)}: {type_name(tmpl)}(...) rejects the checkpoint's values "
                        f"({type(e).__name__}: {e})"
                    ) from e
            _mismatch(strict, tmpl, path, f"a NamedTuple {node.type_name}")
            return {f: walk(v, MISSING, (*path, f), fallback, strict) for f, v in zip(node.fields, node.values)}
        if type(node) is Stateful:
            if tmpl is not MISSING and is_stateful(tmpl):
                hint = adapter_for_stateful(tmpl) or fallback
                try:
                    template = tmpl.state_dict()
                except Exception as e:
                    raise StructureMismatchError(
                        f"{render_path(path)}: {type_name(tmpl)}.state_dict() of `like` raised {type(e).__name__}: {e}"
                    ) from e
                saved = node.state
                if type(saved) is dict and isinstance(template, Mapping):
                    saved = _renamed_state_keys(hint, tmpl, saved, template, strict=not tolerant)
                partial = (
                    tolerant
                    and type(saved) is dict
                    and isinstance(template, Mapping)
                    and saved.keys() != template.keys()
                )
                if partial:  # strict=False: the keys of the object's state dict are matched like a dict's
                    report.missing.extend((*path, k) for k in template if k not in saved)
                    report.unexpected.extend((*path, k) for k in saved if k not in template)
                    saved = {k: v for k, v in saved.items() if k in template}
                elif in_place is not None:
                    fills = fill_targets(
                        adapter_for_stateful(tmpl),
                        tmpl,
                        saved,
                        template,
                        in_place.spec,
                        in_place.views,
                        in_place.block_spec,
                    )
                    if fills is not None:
                        targets, into_blocks_here = fills
                        into_blocks.update(into_blocks_here)
                        if targets:
                            filled.update((i, t) for i, (t, _) in targets.items())
                            in_place.fill([(i, view) for i, (_, view) in targets.items()])
                state = walk(saved, template, path, hint, False)
                try:
                    if partial:
                        load_partial = getattr(hint, "load_state", None)
                        if load_partial is None or not load_partial(tmpl, state, strict=False):
                            # what the checkpoint lacks is set to the object's own current value: left as is
                            tmpl.load_state_dict({k: state.get(k, t) for k, t in template.items()})
                    else:
                        ready = getattr(hint, "state_for_load", None)  # a framework's faster form of it
                        tmpl.load_state_dict(state if ready is None else ready(tmpl, state))
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
                try:
                    return adapter.restore_object(
                        tmpl,
                        node.state,
                        template,
                        lambda n, t, k: walk(n, t, (*path, *k), adapter, strict),
                        render_path(path),
                    )
                except CkptStoreError:
                    raise
                except Exception as e:  # the framework refuses the saved state
                    raise StructureMismatchError(
                        f"{render_path(path)}: the checkpoint's state does not fit `like`'s {type_name(tmpl)} "
                        f"({type(e).__name__}: {e})"
                    ) from e
            if isinstance(tmpl, Mapping | list | tuple):  # an object's state into plain containers (of arrays)
                return walk(node.state, tmpl, path, fallback, strict)
            _mismatch(strict, tmpl, path, f"the state of a {node.type_name}")
            return walk(node.state, MISSING, path, fallback, strict)
        if type(node) is Scalar:
            return node.value()
        return node

    def walk_plain(node: Any, tmpl: Any, path: KeyPath, fallback: Adapter) -> Any:
        """``node`` against a plain template: the checkpoint's structure and values win; the template only
        turns 0-d arrays saved where it holds a Python number into Python numbers."""
        t = type(tmpl)
        if t in _NUMBER_TYPES and type(node) is TensorRef:
            arr = load(node.index)
            return _as_number(arr, t) if arr.ndim == 0 else _untemplated(fallback, arr, path)
        if t is dict and type(node) is dict:
            return {
                k: walk_plain(v, tmpl[k], (*path, k), fallback)
                if k in tmpl
                else walk(v, MISSING, (*path, k), fallback, False)
                for k, v in node.items()
            }
        if (t is list or t is tuple) and (type(node) is list or type(node) is tuple) and len(tmpl) == len(node):
            items = [walk_plain(v, x, (*path, i), fallback) for i, (v, x) in enumerate(zip(node, tmpl))]
            return items if type(node) is list else tuple(items)
        return walk(node, MISSING, path, fallback, False)

    tolerant = not strict
    try:
        return walk(skeleton, like, (), default, like is not MISSING)
    except (CorruptCheckpointError, StructureMismatchError) as e:
        if filled or blocks_read or (in_place is not None and in_place.touched):
            raise type(e)(f"{e}; {PARTLY_OVERWRITTEN}") from e
        raise
    finally:
        # A recursive closure is a reference cycle (walk -> its cell -> walk) that holds ``load``, and with
        # it every array read: without this, a restored state's memory stays until the garbage collector
        # runs, not when the caller drops it.
        walk = walk_plain = None  # type: ignore[assignment]


_NUMBER_TYPES = frozenset({bool, int, float, complex})

#: What an error raised after tensors were read in place says (see :func:`fill_targets`).
PARTLY_OVERWRITTEN = (
    "the objects in `like` were partly overwritten (the tensors of its stateful objects are read into them "
    "as the restore goes): restore an intact checkpoint into them before using them (restore(fallback=True) "
    "and store.resume do so)"
)


class InPlaceReader(Protocol):
    """Reads tensors of a checkpoint straight into existing memory, for :func:`rebuild`."""

    def spec(self, index: int) -> tuple[np.dtype, tuple[int, ...]] | None:
        """The dtype and shape of tensor ``index``, if it may be read in place (None: it was or will be
        read the usual way)."""
        ...

    def block_spec(self, node: TensorRef | ShardedRef) -> tuple[np.dtype, tuple[int, ...]] | None:
        """The dtype and global shape of a saved array, if blocks of it may be read straight into the
        DTensors of ``like``'s stateful objects (None: never)."""
        ...

    #: Whether a tensor was read into (or given to be assigned into) an object of ``like`` already.
    touched: bool
    #: ``fill_view``'s answers kept for this restore (see :func:`fill_targets`).
    views: dict[tuple[int, int], Any] | None

    def fill(self, targets: Sequence[tuple[int, np.ndarray | DeviceTarget]]) -> None:
        """Read each tensor ``index``'s bytes into its uint8 view, or its device target through a bounce
        buffer (checksums checked as configured).

        Raises:
            CorruptCheckpointError: a tensor is truncated or damaged (those before it are filled).
        """
        ...


#: A DTensor of ``like`` that a block of a saved array is read into: the DTensor, a view of its local
#: memory typed and shaped as its block (or, on an accelerator, its local tensor as a device target), and
#: the saved dtype.
BlockFill = tuple[Any, np.ndarray | DeviceTarget, np.dtype]
#: The tensors of a stateful object to read straight into its memory (:func:`fill_targets`): by tensor
#: index, its tensor and a uint8 view of its memory (or its device target); by id of a skeleton node (an
#: array read block by block), its DTensor's :data:`BlockFill`.
Fills = tuple[dict[int, tuple[Any, np.ndarray | DeviceTarget]], dict[int, BlockFill]]

Spec = Callable[[int], tuple[np.dtype, tuple[int, ...]] | None]
BlockSpec = Callable[[TensorRef | ShardedRef], tuple[np.dtype, tuple[int, ...]] | None]


def fill_targets(
    adapter: Adapter | None,
    obj: Any,
    saved: Any,
    template: Any,
    spec: Spec,
    views: dict[tuple[int, int], Any] | None = None,
    block_spec: BlockSpec | None = None,
) -> Fills | None:
    """The tensors of stateful object ``obj`` that the checkpoint's bytes can be read straight into:
    ``{index: (tensor of template, uint8 view of its memory)}`` for each tensor ``index`` of ``saved`` (the
    object's saved state, a skeleton) whose counterpart in ``template`` (``obj.state_dict()``) its
    framework's ``fill_view`` accepts (torch: a CPU tensor of the same dtype and shape, contiguous); and,
    given ``block_spec``, the DTensors of ``template`` whose blocks of a saved array (sharded or not) can
    be read into their local tensors so (a local tensor of the saved dtype, in host memory or on a device),
    by id of the array's node.

    Only where ``load_state_dict`` will then accept the state, so that no object is overwritten in part
    by a state it refuses: the state dict's keys equal the object's, every array has ``template``'s shape,
    and the adapter's ``state_fits`` (an optimizer's parameter groups) agrees. None (nothing in place)
    otherwise, or for an object of a framework without ``fill_view``.

    ``views``: ``fill_view``'s answers by (id of ``obj``, tensor index), kept from a first call for the
    same object during one restore (:func:`in_place_indices`, then the rebuild): the object's tensors do
    not move in between, and with 100,000 small tensors asking twice costs a tenth of the restore.
    """
    fill_view = getattr(adapter, "fill_view", None)
    if fill_view is None or type(saved) is not dict or not isinstance(template, Mapping):
        return None
    if saved.keys() != template.keys():
        return None
    fits = getattr(adapter, "state_fits", None)
    if fits is not None and not fits(obj, saved, template):
        return None
    out: dict[int, tuple[Any, np.ndarray | DeviceTarget]] = {}
    into_blocks: dict[int, BlockFill] = {}
    walk = _FillWalk(spec, fill_view, views, id(obj), block_spec)
    if not walk.collect(saved, template, out, into_blocks):
        return None
    _drop_shared(out, into_blocks)
    return out, into_blocks


def _drop_shared(out: dict[int, tuple[Any, np.ndarray | DeviceTarget]], into_blocks: dict[int, BlockFill]) -> None:
    """Of tensors sharing memory (tied weights), keep only the first of the state dict in place: the others
    are read the usual way and ``load_state_dict`` copies them after it, in its order, as it did before
    (the last one wins). Two reads into one memory could also fail the first one's checksum, computed
    while the second lands. (Blocks read into DTensors count after the tensors.)"""
    keyed: dict[tuple[bool, int], np.ndarray | DeviceTarget] = {(False, i): view for i, (_, view) in out.items()}
    keyed.update(((True, k), view) for k, (_, view, _) in into_blocks.items())
    order = {key: k for k, key in enumerate(keyed)}
    groups: list[list[tuple[bool, int]]] = []
    end: tuple[str, int] = ("", -1)
    for start, key, nbytes in sorted((_address(view), key, view.nbytes) for key, view in keyed.items()):
        if start < end:  # (on the same device: the device's name sorts first)
            groups[-1].append(key)
        else:
            groups.append([key])
        end = max(end, (start[0], start[1] + nbytes))
    for group in groups:
        first = min(group, key=order.__getitem__)
        for block, k in group:
            if (block, k) != first:
                del (into_blocks if block else out)[k]


def _address(target: np.ndarray | DeviceTarget) -> tuple[str, int]:
    return ("cpu", target.ctypes.data) if isinstance(target, np.ndarray) else target.address


class _FillWalk:
    """:func:`fill_targets`' walk over an object's saved state and its ``state_dict()`` (methods, not a
    recursive closure: no reference cycle)."""

    def __init__(
        self,
        spec: Spec,
        fill_view: Callable[[Any, np.dtype, tuple[int, ...]], np.ndarray | DeviceTarget | None],
        views: dict[tuple[int, int], Any] | None,
        oid: int,
        block_spec: BlockSpec | None,
    ) -> None:
        self.spec, self.fill_view, self.views, self.oid, self.block_spec = spec, fill_view, views, oid, block_spec

    def collect(
        self,
        node: Any,
        tmpl: Any,
        out: dict[int, tuple[Any, np.ndarray | DeviceTarget]],
        into_blocks: dict[int, BlockFill],
    ) -> bool:
        """Add ``node``'s targets; False on an array whose shape :func:`rebuild` would refuse."""
        t = type(node)
        if (t is TensorRef or t is ShardedRef) and self.block_spec is not None and shard.is_dtensor(tmpl):
            return self._block(node, tmpl, into_blocks)
        if t is TensorRef:
            return self._tensor(node, tmpl, out)
        if t is dict and isinstance(tmpl, Mapping):
            return all(self.collect(v, tmpl[k], out, into_blocks) for k, v in node.items() if k in tmpl)
        if (t is list or t is tuple) and isinstance(tmpl, list | tuple) and len(node) == len(tmpl):
            return all(self.collect(v, x, out, into_blocks) for v, x in zip(node, tmpl))
        return True

    def _tensor(self, node: TensorRef, tmpl: Any, out: dict[int, tuple[Any, np.ndarray | DeviceTarget]]) -> bool:
        s = self.spec(node.index)
        if s is None or tmpl is MISSING or tmpl is None:
            return True
        key = (self.oid, node.index)
        view = self.views.get(key) if self.views is not None else None
        if view is None:
            view = self.fill_view(tmpl, *s)
            if self.views is not None and view is not None:
                self.views[key] = view
        if view is not None:
            out[node.index] = (tmpl, view)
            return True
        if adapter_for(tmpl) is None:
            return True
        try:
            return tuple(tmpl.shape) == tuple(s[1])
        except Exception:
            return False

    def _block(self, node: TensorRef | ShardedRef, tmpl: Any, into_blocks: dict[int, BlockFill]) -> bool:
        """A DTensor template: its block of the saved array goes into its local tensor, where that is of the
        saved dtype (a block it cannot hold so is read and converted the usual way)."""
        assert self.block_spec is not None
        s = self.block_spec(node)
        if s is None:
            return True
        dtype, gshape = s
        if tuple(int(d) for d in tmpl.shape) != gshape:
            return False
        try:
            _, shape, _ = shard.dtensor_block(tmpl)
        except CkptStoreError:  # a placement that has no block: the rebuild names it
            return False
        view = self.fill_view(tmpl, dtype, shape)
        if isinstance(view, np.ndarray):
            into_blocks[id(node)] = (tmpl, view.view(dtype).reshape(shape), dtype)
        elif view is not None:  # a device tensor, filled through a bounce buffer
            into_blocks[id(node)] = (tmpl, view, dtype)
        return True


def in_place_indices(
    skeleton: Any,
    like: Any,
    spec: Spec,
    *,
    strict: bool = True,
    views: dict[tuple[int, int], Any] | None = None,
    block_spec: BlockSpec | None = None,
) -> tuple[set[int], set[int]]:
    """The tensors that :func:`rebuild` with ``in_place`` will likely read in place (those of ``like``'s
    stateful objects, :func:`fill_targets`), found before any tensor is read so that they are not read
    the usual way first; and, given ``block_spec``, the ids of the skeleton's nodes whose blocks it will
    likely read into DTensors of those objects. A guess by a simpler walk than the rebuild's: a tensor
    guessed wrongly is read the usual way when the rebuild needs it. Calls the objects' ``state_dict()``."""
    out: set[int] = set()
    into_blocks: set[int] = set()
    _guess_fills(skeleton, like, (spec, block_spec, strict, views), out, into_blocks)
    return out, into_blocks


def _guess_fills(
    node: Any,
    tmpl: Any,
    how: tuple[Spec, BlockSpec | None, bool, dict[tuple[int, int], Any] | None],
    out: set[int],
    into_blocks: set[int],
) -> None:
    if tmpl is MISSING or tmpl is None or type(tmpl) in _PLAIN_TYPES:
        return
    t = type(node)
    if t is dict and isinstance(tmpl, Mapping):
        for k, v in node.items():
            if k in tmpl:
                _guess_fills(v, tmpl[k], how, out, into_blocks)
        return
    if t is dict or t is Stateful:
        state = node.state if t is Stateful else node
        if is_stateful(tmpl):
            spec, block_spec, strict, views = how
            adapter = adapter_for_stateful(tmpl)
            if getattr(adapter, "fill_view", None) is None:
                return
            try:
                template = tmpl.state_dict()
            except Exception:  # the rebuild reports it
                return
            if type(state) is dict and isinstance(template, Mapping):
                state = _renamed_state_keys(adapter, tmpl, state, template, strict=strict)  # type: ignore[arg-type]
            found = fill_targets(adapter, tmpl, state, template, spec, views, block_spec)
            if found is not None:
                out.update(found[0])
                into_blocks.update(found[1])
        elif t is Stateful and isinstance(tmpl, Mapping | list | tuple):
            _guess_fills(state, tmpl, how, out, into_blocks)
        return
    if (t is list or t is tuple) and isinstance(tmpl, list | tuple) and len(node) == len(tmpl):
        for v, x in zip(node, tmpl):
            _guess_fills(v, x, how, out, into_blocks)
        return
    if t is NamedTuple and isinstance(tmpl, tuple) and getattr(tmpl, "_fields", None) == node.fields:
        for v, x in zip(node.values, tmpl):
            _guess_fills(v, x, how, out, into_blocks)


def streamed_indices(skeleton: Any, like: Any) -> tuple[set[int], set[int]]:
    """The tensors that :func:`rebuild` turns into other memory or assigns into ``like``'s framework
    objects rather than returning as read: those under an object restored through its framework's
    ``restore_object`` (Keras layers and optimizers, Flax NNX objects, JAX pytree nodes) and those whose
    counterpart in ``like`` is an array of a framework other than NumPy (a JAX array, a torch tensor not
    filled in place). Each is worth reading only when the rebuild asks for it, and dropping after: the
    state then never lies whole in host memory beside the objects it is restored into. NumPy templates
    and arrays without one are the result itself, and are read up front as before.

    Returns: the tensors under such objects (assigned into them: a failure after one was read leaves them
    partly overwritten), and the others."""
    into: set[int] = set()
    out: set[int] = set()
    _guess_streamed(skeleton, like, out, into)
    return into, out


def _guess_streamed(node: Any, tmpl: Any, out: set[int], into: set[int]) -> None:
    if tmpl is MISSING or tmpl is None or type(tmpl) in _PLAIN_TYPES:
        return
    t = type(node)
    if t is TensorRef:
        adapter = adapter_for(tmpl)
        if adapter is not None and adapter.name != "numpy":
            out.add(node.index)
        return
    if t is Stateful:
        if not is_stateful(tmpl) and object_adapter_for(tmpl) is not None:
            into.update(ref.index for _, ref in walk_tree(node.state) if type(ref) is TensorRef)
        elif isinstance(tmpl, Mapping | list | tuple):
            _guess_streamed(node.state, tmpl, out, into)
        return
    if t is dict and isinstance(tmpl, Mapping):
        for k, v in node.items():
            if k in tmpl:
                _guess_streamed(v, tmpl[k], out, into)
        return
    if (t is list or t is tuple) and isinstance(tmpl, list | tuple) and len(node) == len(tmpl):
        for v, x in zip(node, tmpl):
            _guess_streamed(v, x, out, into)
        return
    if t is NamedTuple and isinstance(tmpl, tuple) and getattr(tmpl, "_fields", None) == node.fields:
        for v, x in zip(node.values, tmpl):
            _guess_streamed(v, x, out, into)


def _device_array(adapter: Adapter, x: Any) -> Any:
    """``x`` on an accelerator as its framework's ``device_array`` (copied later, straight into a snapshot
    buffer: see ``asyncsave``), or None."""
    take = getattr(adapter, "device_array", None)
    return None if take is None else take(x)


def _as_number(arr: np.ndarray, placeholder: type) -> Any:
    """A 0-d array saved where ``like`` holds a Python number, as a Python number: of the placeholder's type
    where that type holds the value (a float placeholder takes any real number, an int one an integer or
    bool, a bool one a bool), else of the value's own Python type (``.item()``: a float array against an int
    placeholder stays a float)."""
    value = arr.item()  # bfloat16 and float8 (ml_dtypes) give Python floats too
    if placeholder is float and isinstance(value, int | float):
        return float(value)
    if placeholder is int and isinstance(value, int):
        return int(value)
    if placeholder is complex and isinstance(value, int | float | complex):
        return complex(value)
    return value


def _renamed_state_keys(
    hint: Adapter, obj: Any, saved: dict[Any, Any], template: Any, *, strict: bool
) -> dict[Any, Any]:
    """``saved`` (an object's saved state dict) with its keys renamed to fit ``obj``'s own where its
    framework knows how (a torch module saved compiled or wrapped in DDP: ``_orig_mod.`` and ``module.``)."""
    if saved.keys() == template.keys():
        return saved
    rename = getattr(hint, "state_key_map", None)
    renames = None if rename is None else rename(obj, list(saved), list(template), strict=strict)
    if not renames:
        return saved
    return {renames.get(k, k): v for k, v in saved.items()}


def _untemplated(adapter: Adapter, arr: np.ndarray, path: KeyPath) -> Any:
    """``arr`` as an array of the ``framework=`` adapter; one it cannot hold is an error naming its path."""
    return _convert(adapter, arr, None, path)


def _convert(adapter: Adapter, arr: np.ndarray, tmpl: Any, path: KeyPath) -> Any:
    """``adapter.from_numpy(arr, tmpl)``; whatever the framework raises is a named error with the key path
    (a ``like`` that cannot hold numbers: a tf.string tensor, a quantized torch tensor, ...)."""
    try:
        return adapter.from_numpy(arr, tmpl)
    except (UnsupportedTypeError, StructureMismatchError) as e:
        raise type(e)(f"{render_path(path)}: {e}") from None
    except CkptStoreError:
        raise
    except Exception as e:
        code = dtypes.code_of(arr.dtype) or arr.dtype
        if tmpl is None:
            raise UnsupportedTypeError(
                f"{render_path(path)}: the checkpoint's {code} array of shape {arr.shape} cannot become a "
                f"{adapter.name} array ({type(e).__name__}: {e})"
            ) from e
        raise StructureMismatchError(
            f"{render_path(path)}: the checkpoint's {code} array of shape {arr.shape} cannot become an array like "
            f"`like`'s {type_name(tmpl)} of dtype {getattr(tmpl, 'dtype', '?')} ({type(e).__name__}: {e})"
        ) from e


def _legacy_enum_keys(tmpl: Mapping[Any, Any], node: dict[Any, Any]) -> dict[Any, Any] | None:
    """For a checkpoint whose (str, Enum) keys were saved as ``str(member)`` ("Color.RED") rather than their
    values: the checkpoint's keys that name ``tmpl``'s members so, mapped to the members; None when the
    keys do not then agree."""
    renamed = {}
    for k in tmpl:
        if isinstance(k, str) and type(k) is not str and k not in node:
            legacy = str(k)
            if legacy in node and legacy not in tmpl:
                renamed[legacy] = k
    if not renamed or len(tmpl) != len(node) or any(k not in tmpl and k not in renamed for k in node):
        return None
    return renamed


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
        self,
        node: TensorRef | ShardedRef,
        offsets: tuple[int, ...] | None = None,
        shape: tuple[int, ...] | None = None,
        *,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        """The block of ``shape`` at ``offsets`` (default: the whole array) as a fresh host array, or read
        into ``into`` (an array of the block's shape and the saved dtype), which is returned."""
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
        self,
        node: TensorRef | ShardedRef,
        offsets: tuple[int, ...] | None = None,
        shape: tuple[int, ...] | None = None,
        *,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        if isinstance(node, ShardedRef):
            raise CorruptCheckpointError("a sharded array cannot be read without a block reader")
        arr = self.load(node.index)
        if offsets is not None and shape is not None:
            arr = arr[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]
        if into is not None:
            into[...] = arr
            return into
        return arr if offsets is None or shape is None else np.ascontiguousarray(arr)


def is_block_template(tmpl: Any) -> bool:
    """Whether an array restored into ``tmpl`` is read block by block: a :class:`ckptstore.Shard`, a
    DTensor, or a JAX template of a global array (:func:`global_layout`)."""
    return type(tmpl) is shard.Shard or shard.is_dtensor(tmpl) or global_layout(tmpl) is not None


#: Modules whose values may be templates of JAX global arrays (``jax.ShapeDtypeStruct``, ``jax.Array``).
_JAX_MODULES = frozenset({"jax", "jaxlib"})


def global_layout(tmpl: Any) -> tuple[Any, tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]] | None:
    """For a JAX template restored block by block (a ``jax.ShapeDtypeStruct``, a ``jax.Array`` over devices
    of other processes): its framework's adapter, the global shape, and the distinct blocks ``(offsets,
    shape)`` of this process's devices; None for any other value."""
    module = type(tmpl).__module__
    if module.partition(".")[0] not in _JAX_MODULES:
        return None
    adapter = adapter_for_module(module)
    layout = getattr(adapter, "block_layout", None)
    found = layout(tmpl) if layout is not None else None
    return None if found is None else (adapter, *found)


def _shard_like(
    node: TensorRef | ShardedRef, tmpl: Any, path: KeyPath, source: BlockSource, into: BlockFill | None = None
) -> Any:
    """This rank's block of a saved array, shaped by a Shard or DTensor template; or, for a JAX template of
    a global array, the global array whose blocks on this process's devices are read (and only those).
    ``into``: a DTensor template's local memory (:func:`fill_targets`), where its block is read; the
    template itself is returned."""
    gshape = source.global_shape(node)
    found = None if type(tmpl) is shard.Shard or shard.is_dtensor(tmpl) else global_layout(tmpl)
    if found is not None:
        adapter, want, wanted = found
    elif type(tmpl) is shard.Shard:
        offsets, shape, want, local_tmpl = tmpl.offsets, tmpl.local_shape, tmpl.global_shape, tmpl.local
    else:
        offsets, shape, _ = shard.dtensor_block(tmpl)
        want, local_tmpl = tuple(int(d) for d in tmpl.shape), tmpl.to_local()
    if gshape != want:
        raise StructureMismatchError(
            f"{render_path(path)}: the checkpoint's array has shape {gshape}, `like`'s global shape is {want}"
        )
    if found is not None:
        regions = [(off, n, source.read(node, off, n)) for off, n in blocks.read_regions(wanted)]
        parts = {}
        for off, n in wanted:
            at, _, arr = next(
                r for r in regions if all(a <= o and o + k <= a + m for o, k, a, m in zip(off, n, r[0], r[1]))
            )
            parts[off] = arr if arr.shape == n else arr[tuple(slice(o - a, o - a + k) for o, a, k in zip(off, at, n))]
        try:
            return adapter.from_blocks(tmpl, parts)
        except CkptStoreError:
            raise
        except Exception as e:  # the framework refuses the blocks (a dtype it cannot hold, ...)
            raise StructureMismatchError(
                f"{render_path(path)}: the checkpoint's array cannot be restored into `like`'s "
                f"{type_name(tmpl)} ({type(e).__name__}: {e})"
            ) from e
    if into is not None:
        _read_block_into(source, node, offsets, shape, into[1], into[2])
        return tmpl
    arr = source.read(node, offsets, shape)
    local = _convert(adapter_for(local_tmpl) or adapter_named("numpy"), arr, local_tmpl, path)
    if type(tmpl) is shard.Shard:
        return shard.Shard(local, gshape, offsets)
    return shard.dtensor_like(tmpl, local)


def _read_block_into(
    source: BlockSource,
    node: TensorRef | ShardedRef,
    offsets: tuple[int, ...],
    shape: tuple[int, ...],
    target: np.ndarray | DeviceTarget,
    dtype: np.dtype,
) -> None:
    """Read a block into host memory ``target``, or into a device ``target`` through its bounce buffer (the
    block assembled there, then copied; the buffer is kept for the next, grown to the largest block)."""
    if isinstance(target, np.ndarray):
        source.read(node, offsets, shape, into=target)
        return
    nbytes = target.nbytes
    buffer = target.bounce_buffer(nbytes)
    host = buffer.host[:nbytes]
    source.read(node, offsets, shape, into=host.view(dtype).reshape(shape))
    target.copy_in(0, host)
    buffer.fence()()  # copied: the buffer may take the next block


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
