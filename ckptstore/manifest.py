"""The manifest: what a checkpoint holds, written last, as msgpack. Its presence is the commit.

Layout (docs/format.md is the reference for readers in other languages)::

    {"format": "ckptstore", "version": 1, "step": int, "created": float, "writer": str,
     "metadata": {...}, "tree": <skeleton>,
     "files": [{"name": str, "size": int}, ...],
     "tensors": [{"name": str, "file": int, "dtype": str, "shape": [int, ...],
                  "offset": int, "nbytes": int, "xxh3": int}, ...]}

The skeleton is plain msgpack plus the extension types in :data:`EXT`; nothing is ever unpickled and an
unknown extension type is an error, not code to run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import msgpack

from . import dtypes
from .blocks import check_partition
from .errors import CorruptCheckpointError, UnsupportedFormatError
from .skeleton import NamedTuple, PerRankValues, Scalar, ShardedRef, Stateful, TensorRef, children, is_extension

FORMAT = "ckptstore"
#: The newest format version this code reads. A save writes version 1 unless its tree holds per-rank values
#: (:data:`EXT_PER_RANK`, version 2): checkpoints without them stay readable by releases that know only 1.
VERSION = 2
MANIFEST_NAME = "manifest.msgpack"

# Extension type codes of the skeleton. Never reuse a number.
EXT_TUPLE = 1  # payload: msgpack array of the items
EXT_TENSOR = 2  # payload: msgpack int, the index in "tensors"
EXT_STATEFUL = 3  # payload: [type name, state]
EXT_NAMEDTUPLE = 4  # payload: [type name, [field, ...], [value, ...]]
EXT_SCALAR = 5  # payload: [dtype code, raw bytes] (a NumPy scalar)
EXT_BIGINT = 6  # payload: decimal string of an int outside 64 bits
EXT_COMPLEX = 7  # payload: [real, imag]
EXT_SHARDED = 8  # payload: [global shape, dtype code, [[tensor index, [offset, ...]], ...]] (blocks of one array)
EXT_PER_RANK = 9  # payload: [rank 0's value, rank 1's, ...] (version 2)

_T = TypeVar("_T")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one array's bytes lie: file index, byte offset from the file's start, dtype, shape."""

    name: str
    file: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    xxh3: int


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    """A tensor file of the checkpoint, relative to its directory, and its exact size."""

    name: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A decoded, validated manifest."""

    step: int
    created: float
    writer: str
    metadata: dict[str, Any]
    tree: Any
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    #: 1, or 2 where the tree holds per-rank values (see :data:`VERSION`).
    version: int = 1


# --- encode -----------------------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(EXT_TUPLE, _pack(list(obj)))
    if t is TensorRef:
        return msgpack.ExtType(EXT_TENSOR, _uint(obj.index))
    if t is Stateful:
        return msgpack.ExtType(EXT_STATEFUL, _pack([obj.type_name, obj.state]))
    if t is NamedTuple:
        return msgpack.ExtType(EXT_NAMEDTUPLE, _pack([obj.type_name, list(obj.fields), list(obj.values)]))
    if t is Scalar:
        return msgpack.ExtType(EXT_SCALAR, _pack([obj.dtype, obj.data]))
    if t is int:  # only ints msgpack cannot hold reach here
        return msgpack.ExtType(EXT_BIGINT, str(obj).encode())
    if t is complex:
        return msgpack.ExtType(EXT_COMPLEX, _pack([obj.real, obj.imag]))
    if t is ShardedRef:
        blocks = [[index, list(offsets)] for index, offsets in obj.blocks]
        return msgpack.ExtType(EXT_SHARDED, _pack([list(obj.global_shape), obj.dtype, blocks]))
    if t is PerRankValues:
        return msgpack.ExtType(EXT_PER_RANK, _pack(list(obj.values)))
    raise TypeError(f"cannot encode {t.__name__} in a manifest")


def _uint(n: int) -> bytes:
    """``msgpack.packb(n)`` for an int >= 0, byte for byte, without a call into msgpack (one per tensor)."""
    if n < 0x80:
        return _FIXINT[n]
    if n < 0x100:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


_FIXINT = [bytes([i]) for i in range(0x80)]
_UINT_PREFIX = {2: 0xCC, 3: 0xCD, 5: 0xCE, 9: 0xCF}  # payload length -> msgpack uint8/16/32/64 marker


def _read_uint(data: bytes) -> int | None:
    """The reverse of :func:`_uint` for well-formed payloads; None for anything else (the slow path decides)."""
    n = len(data)
    if n == 1 and data[0] < 0x80:
        return data[0]
    if n and _UINT_PREFIX.get(n) == data[0]:
        return int.from_bytes(data[1:], "big")
    return None


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)


def encode(m: Manifest) -> bytes:
    """Serialize a manifest."""
    doc = {
        "format": FORMAT,
        "version": m.version,
        "step": m.step,
        "created": m.created,
        "writer": m.writer,
        "metadata": m.metadata,
        "tree": m.tree,
        "files": [{"name": f.name, "size": f.size} for f in m.files],
        "tensors": [
            {
                "name": t.name,
                "file": t.file,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offset": t.offset,
                "nbytes": t.nbytes,
                "xxh3": t.xxh3,
            }
            for t in m.tensors
        ],
    }
    return _pack(doc)


def encode_value(value: Any) -> bytes:
    """Serialize a plain value (metadata) with the manifest's codec; raises TypeError if it cannot."""
    return _pack(value)


# --- decode -----------------------------------------------------------------------------------------


#: Deepest nesting of containers in a tree (metadata or skeleton). Deeper cannot be saved (UnsupportedTypeError)
#: nor read (CorruptCheckpointError): rebuilding recurses in Python.
MAX_DEPTH = 100
#: Deepest nesting of extension types (tuples, NamedTuples, stateful objects, ...). Each level is a nested
#: call of msgpack's C unpacker, whose stack frame is large: a few hundred levels overflow the C stack and
#: kill the interpreter, so a manifest is refused long before.
MAX_EXT_DEPTH = 32
#: Most dimensions of a tensor: NumPy's own limit (2.x; 1.x has 32, and reports more as a named error too).
MAX_NDIM = 64
#: Memory the containers a decode builds may take (dicts, lists, tuples, records), per byte of the manifest;
#: a manifest that would take more is refused as it is decoded. What they hold (strings, numbers) takes less
#: than 25 bytes per byte it is written in, so a decode stays under 100 bytes per byte all told. An empty map
#: is one byte and a 64-byte dict: a manifest of nothing but empty (or one-key) maps is refused.
MEMORY_PER_BYTE = 72
_MEMORY_FLOOR = 1 << 16  # whatever the size: the few dicts of a tiny manifest
#: Most keys of one map that may share a hash value. A save writes str keys (whose hashes are randomized per
#: process) and int keys; at most 10 ints of 64 bits share a hash. Other keys (big ints, tuples, floats, from
#: a crafted or foreign manifest) can be chosen so that thousands do, which makes building the dict
#: quadratic (40,000 such keys took 10 s): more than this many is refused.
MAX_SHARED_HASH = 16
#: NumPy's limit on the bytes of an array: the product of its dimensions (zeros left out) by the item size.
MAX_NBYTES = (1 << 63) - 1
#: Most decimal digits of an int outside 64 bits (extension type 6): Python's default int/str limit.
MAX_INT_DIGITS = 4300
_PRESKIP_BYTES = 64  # extension payloads longer than this are checked whole (msgpack.Unpacker.skip) first
_INT_LOW, _INT_HIGH = -(1 << 63), 1 << 64  # what a plain msgpack int holds
_FIELDS = ("format", "version", "step", "created", "writer", "metadata", "tree", "files", "tensors")
_RECORDS = ("files", "tensors")  # lists of records: str keys only, no extension type but big ints
_BIGINT_TEXT = re.compile(rb"-?[0-9]{1,%d}" % MAX_INT_DIGITS)
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_CONTAINERS = frozenset({dict, list, tuple, Stateful, NamedTuple, PerRankValues})  # the nodes :func:`children` opens
_sizeof = sys.getsizeof
_REF_BYTES = sys.getsizeof(TensorRef(0))
_END = object()


#: What decoding one container, or one item of a container, may cost at most in memory, in the units
#: :class:`_Decoder` charges (a dict of k small items is charged under 350 + 170 k bytes; tests check the
#: bound). A tree whose containers and items, at this price, fit in the budget of its manifest less what its
#: records may take (:data:`_RECORDS_PER_BYTE`) is decoded within budget for sure; another is checked by
#: decoding it (:func:`within_budget`).
DECODE_UNIT_BYTES = 1024
_RECORDS_PER_BYTE = 12  # a file or tensor record (a dict of 7 items) is charged under 12 bytes per byte


@dataclasses.dataclass(frozen=True)
class Survey:
    """What a save learns of a tree (the skeleton, or the metadata) before writing it."""

    #: Why it nests too deeply to be read back safely, or None.
    problem: str | None = None
    #: Its containers and their items: each costs the decoder at most :data:`DECODE_UNIT_BYTES`.
    units: int = 0
    #: Whether a map has more than :data:`MAX_SHARED_HASH` keys other than str and 64-bit ints (keys whose
    #: hashes the decoder checks for a flood).
    odd_keys: bool = False
    #: Whether it holds per-rank values (a manifest of version 2).
    per_rank: bool = False

    def __add__(self, other: Survey) -> Survey:
        return Survey(
            self.problem or other.problem,
            self.units + other.units,
            self.odd_keys or other.odd_keys,
            self.per_rank or other.per_rank,
        )

    def within_budget(self, data: bytes) -> bool:
        """Whether a manifest of ``data`` holding this tree surely decodes within :data:`MEMORY_PER_BYTE`
        (False: perhaps not; decode it to know)."""
        spare = (MEMORY_PER_BYTE - _RECORDS_PER_BYTE) * len(data) + _MEMORY_FLOOR
        return not self.odd_keys and self.units * DECODE_UNIT_BYTES <= spare


def survey(node: Any) -> Survey:
    """Walk a tree once: how deeply it nests (:func:`nesting_problem`), its containers and items, and
    whether a map has keys the decoder must check for hash floods."""
    return _walk(node, count=True)


def nesting_problem(node: Any) -> str | None:
    """Why a tree nests too deeply to be read back safely, or None. Iterative, and in memory proportional
    to the depth, not to the width: a wide container is walked through an iterator, never copied, and not
    at all when none of its children is a container (a dict of 100,000 arrays is one C-level scan)."""
    return _walk(node, count=False).problem


def _walk(node: Any, *, count: bool) -> Survey:
    stack: list[tuple[Iterator[Any], int, int]] = []
    depth, ext, units, odd, per_rank = 1, 0, 0, False, False
    while True:
        t = type(node)
        if count and t in _CONTAINERS:
            if t is PerRankValues:
                n, per_rank = len(node.values), True
            else:
                n = 1 if t is Stateful else 2 * len(node.values) if t is NamedTuple else len(node)
            units += 1 + n
            odd = odd or (t is dict and n > MAX_SHARED_HASH and _odd_keys(node))
        kids = children(node)
        if kids:
            ext += is_extension(node)
            if depth > MAX_DEPTH:
                return Survey(f"containers nest deeper than {MAX_DEPTH} levels", units, odd, per_rank)
            if ext > MAX_EXT_DEPTH:
                return Survey(f"tuples, NamedTuples and stateful objects nest deeper than {MAX_EXT_DEPTH} levels")
            if not _CONTAINERS.isdisjoint(map(type, map(_second, kids))):
                stack.append((map(_second, children(node)), depth + 1, ext))
        while stack:
            it, depth, ext = stack[-1]
            node = next(it, _END)
            if node is not _END:
                break
            stack.pop()
        else:
            return Survey(None, units, odd, per_rank)


def _odd_keys(d: dict[Any, Any]) -> bool:
    """Whether a map holds keys other than str and 64-bit ints (the decoder checks those for hash floods)."""
    kinds = set(map(type, d))
    if not kinds <= _STR_INT:
        return True
    ints = [k for k in d if type(k) is int]
    return bool(ints) and not (min(ints) >= _INT_LOW and max(ints) < _INT_HIGH)


def fits_numpy(shape: Sequence[int], itemsize: int) -> bool:
    """Whether NumPy can make an array of this shape (dimensions >= 0) and item size: at most
    :data:`MAX_NDIM` dimensions, and the product of those that are not 0, times the item size, within
    :data:`MAX_NBYTES` (an empty array of shape ``[0, 2**62, 2**62]`` is refused by NumPy too)."""
    if len(shape) > MAX_NDIM:
        return False
    n = itemsize
    for d in shape:
        if d:
            n *= d
            if n > MAX_NBYTES:
                return False
    return True


def _parse_int(text: bytes) -> int:
    """The int of decimal ``text`` (at most MAX_INT_DIGITS digits), whatever this process's limit on int/str
    conversions (``sys.set_int_max_str_digits``, at least 640): converted in pieces below it."""
    sign, digits = (-1, text[1:]) if text[:1] == b"-" else (1, text)
    value = 0
    for i in range(0, len(digits), 600):
        piece = digits[i : i + 600]
        value = value * 10 ** len(piece) + int(piece)
    return sign * value


def _collisions(keys: list[Any]) -> int:
    """The most keys of ``keys`` that share one hash value (sorted, never hashed into a dict or set)."""
    hashes = sorted(map(hash, keys))
    most = run = 1
    for a, b in itertools.pairwise(hashes):
        run = run + 1 if a == b else 1
        most = max(most, run)
    return most


def _check_whole(data: bytes) -> None:
    """Raise unless ``data`` is exactly one well-formed msgpack value. Checked without building anything:
    msgpack allocates an array's slots as soon as it reads its header, so nested headers that declare more
    items than there are bytes would otherwise take memory many times the size of the data."""
    reader = msgpack.Unpacker(None, max_buffer_size=max(len(data), 1))
    reader.feed(data)
    reader.skip()
    if reader.tell() != len(data):
        raise CorruptCheckpointError(f"{len(data) - reader.tell()} bytes after a value")


def _limits(n: int) -> dict[str, Any]:
    """msgpack's options for an input of ``n`` bytes: no string, array, map or extension can declare more
    than the bytes there are."""
    return {"raw": False, "use_list": True, **dict.fromkeys(_LIMIT_NAMES, n)}


_LIMIT_NAMES = ("max_str_len", "max_bin_len", "max_array_len", "max_map_len", "max_ext_len")


class _Decoder:
    """One decode of a manifest: what its containers may still take in memory, the nesting of extension
    types, what the tree's tensor references may point at, and the sharded arrays met in the tree.

    msgpack calls the hooks below once per container, as it builds each: a manifest that would take too
    much memory is refused part way, in memory bounded by its size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.left = MEMORY_PER_BYTE * size + _MEMORY_FLOOR
        self.depth = 0
        self.n_tensors = 0
        self.sharded: list[ShardedRef] | None = None  # while the tree is decoded: its sharded arrays

    def _over(self) -> NoReturn:
        raise CorruptCheckpointError(
            f"decoding it would take more than {MEMORY_PER_BYTE} times its {self.size} bytes in memory "
            "(a crafted manifest? millions of empty or nearly empty containers)"
        )

    def charge(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            self._over()

    # --- msgpack hooks ---------------------------------------------------------------------------------

    def list_hook(self, items: list[Any]) -> list[Any]:
        self.left -= _sizeof(items)
        if self.left < 0:
            self._over()
        return items

    def object_hook(self, d: dict[str, Any]) -> dict[str, Any]:
        """A record of ``files`` or ``tensors``: str keys only (``strict_map_key``)."""
        self.left -= _sizeof(d)
        if self.left < 0:
            self._over()
        return d

    def pairs_hook(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """A map of the tree or the metadata, checked before it becomes a dict: keys other than str and
        64-bit ints may not collide by hash (the dict would take quadratic time to build)."""
        if pairs:
            kinds = set(map(type, map(_first, pairs)))
            if kinds != _STR_ONLY:
                self._check_keys(pairs, kinds)
        d = dict(pairs)
        # The dict, and the pairs msgpack built it from (a list of 2-tuples, 64 bytes each): counted as kept,
        # though freed now, so that what is alive at any moment is within what was counted.
        self.left -= _sizeof(d) + _sizeof(pairs) + 64 * len(pairs)
        if self.left < 0:
            self._over()
        return d

    def _check_keys(self, pairs: list[tuple[Any, Any]], kinds: set[type]) -> None:
        if kinds <= _STR_INT:
            ints = [k for k, _ in pairs if type(k) is int]
            if min(ints) >= _INT_LOW and max(ints) < _INT_HIGH:
                return  # at most 10 ints of 64 bits share a hash: no flood possible
        keys = [k for k, _ in pairs if type(k) is not str]
        most = _collisions(keys)
        if most > MAX_SHARED_HASH:
            raise CorruptCheckpointError(
                f"{most} keys of one map share a hash value (a crafted manifest: building the dict would take "
                f"quadratic time; at most {MAX_SHARED_HASH} may)"
            )

    def ext_hook(self, code: int, data: bytes) -> Any:
        depth = self.depth
        if depth > MAX_EXT_DEPTH:  # MAX_EXT_DEPTH containers, then a leaf (a tensor reference) inside
            raise CorruptCheckpointError(f"extension types nest deeper than {MAX_EXT_DEPTH} levels")
        if code == EXT_TENSOR:  # one per tensor: 100,000 of them must cost little
            index = _read_uint(data)
            if index is not None and index < self.n_tensors:
                self.left -= _REF_BYTES
                if self.left < 0:
                    self._over()
                return TensorRef(index)
        self.depth = depth + 1
        try:
            return self._decode_ext(code, data)
        finally:
            self.depth = depth

    def records_ext_hook(self, code: int, data: bytes) -> Any:
        """Records hold plain values; an int outside 64 bits is read (and refused later where it is no size)."""
        if code == EXT_BIGINT:
            return self._bigint(data)
        raise CorruptCheckpointError(f"msgpack extension type {code} in a file or tensor record")

    # --- the document and its parts ------------------------------------------------------------------

    def document(self, data: bytes) -> dict[str, Any]:
        """The manifest's top-level map as a dict of the fields this version knows (others are skipped).

        The map is first walked without building anything (``Unpacker.skip``), which finds where each
        field's value lies and checks that every length declared in it is there; then the records
        (``files``, ``tensors``) are decoded, as plain dicts with str keys, and the rest, whose maps may
        have other keys, through :meth:`pairs_hook`."""
        view = memoryview(data)
        reader = msgpack.Unpacker(None, max_buffer_size=max(len(view), 1))
        reader.feed(view)
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(reader.read_map_header()):
            start = reader.tell()
            reader.skip()
            middle = reader.tell()
            reader.skip()
            # A field's name is a short str (fixstr or str8); any other key is no field of this version.
            if middle - start <= 16 and (view[start] & 0xE0 == 0xA0 or view[start] == 0xD9):
                key = msgpack.unpackb(view[start:middle], raw=False)
                if key in _FIELDS:
                    spans[key] = (middle, reader.tell())
        if reader.tell() != len(view):
            raise CorruptCheckpointError(f"{len(view) - reader.tell()} bytes after the manifest's map")
        doc: dict[str, Any] = {}
        for name in ("format", "version"):  # first: a newer format is named as such, whatever else it holds
            if name in spans:
                doc[name] = self.value(view[slice(*spans.pop(name))])
        _check_version(doc)
        for name in _RECORDS:  # then the records: the tree's tensor references are checked against them
            if name in spans:
                doc[name] = self.records(view[slice(*spans[name])])
        tensors = doc.get("tensors")
        self.n_tensors = len(tensors) if type(tensors) is list else 0
        for name, (start, end) in spans.items():
            if name not in _RECORDS:
                self.sharded = [] if name == "tree" else None
                doc[name] = self.value(view[start:end])
                if name == "tree":
                    doc[_SHARDED] = self.sharded
        self.sharded = None
        return doc

    def records(self, view: memoryview) -> Any:
        n = len(view)
        return msgpack.unpackb(
            view,
            ext_hook=self.records_ext_hook,
            object_hook=self.object_hook,
            list_hook=self.list_hook,
            strict_map_key=True,
            **_limits(n),
        )

    def value(self, data: memoryview | bytes) -> Any:
        """A value of the tree or the metadata (or an extension's payload), whose lengths were checked."""
        n = len(data)  # no string, array, map or extension can declare more than the bytes there are
        return msgpack.unpackb(
            data,
            ext_hook=self.ext_hook,
            object_pairs_hook=self.pairs_hook,
            list_hook=self.list_hook,
            strict_map_key=False,
            **_limits(n),
        )

    def payload(self, data: bytes) -> Any:
        """An extension's payload: itself msgpack, checked whole first unless it is too small to matter."""
        if len(data) > _PRESKIP_BYTES:
            _check_whole(data)
        return self.value(data)

    def fields(self, data: bytes, n: int, what: str) -> list[Any]:
        items = self.payload(data)
        if type(items) is not list or len(items) != n:
            raise CorruptCheckpointError(f"bad {what} record in the manifest")
        return items

    # --- extension types -------------------------------------------------------------------------------

    def _decode_ext(self, code: int, data: bytes) -> Any:
        if code == EXT_TENSOR:
            index = self.payload(data)
            if type(index) is not int or index < 0:
                raise CorruptCheckpointError(f"bad tensor reference {_short(index)}")
            if index >= self.n_tensors:
                raise CorruptCheckpointError(f"the tree refers to tensor #{index}, the manifest lists {self.n_tensors}")
            self.charge(_REF_BYTES)
            return TensorRef(index)
        if code == EXT_TUPLE:
            items = _expect(self.payload(data), list, "tuple")
            t = tuple(items)
            self.charge(_sizeof(t))
            return t
        if code == EXT_STATEFUL:
            name, state = self.fields(data, 2, "stateful object")
            _expect(name, str, "stateful type name")
            obj = Stateful(name, state)
            self.charge(_sizeof(obj))
            return obj
        if code == EXT_NAMEDTUPLE:
            name, fields, values = self.fields(data, 3, "NamedTuple")
            _expect(name, str, "NamedTuple type name")
            _expect(fields, list, "NamedTuple fields")
            _expect(values, list, "NamedTuple values")
            if len(fields) != len(values) or not all(type(f) is str for f in fields):
                raise CorruptCheckpointError("NamedTuple fields and values do not match")
            nt = NamedTuple(name, tuple(fields), tuple(values))
            self.charge(_sizeof(nt) + _sizeof(nt.fields) + _sizeof(nt.values))
            return nt
        if code == EXT_SCALAR:
            dtype, raw = self.fields(data, 2, "numpy scalar")
            _expect(raw, bytes, "numpy scalar bytes")
            if len(raw) != dtypes.dtype_of(dtype).itemsize:
                raise CorruptCheckpointError(f"a numpy scalar of dtype {dtype} has {len(raw)} bytes")
            scalar = Scalar(dtype, raw)
            self.charge(_sizeof(scalar))
            return scalar
        if code == EXT_BIGINT:
            return self._bigint(data)
        if code == EXT_SHARDED:
            ref = self._sharded_ref(data)
            if self.sharded is not None:
                self.sharded.append(ref)
            return ref
        if code == EXT_PER_RANK:
            values = _expect(self.payload(data), list, "per-rank values")
            if not values:
                raise CorruptCheckpointError("a per-rank value of no rank")
            node = PerRankValues(tuple(values))
            self.charge(_sizeof(node) + _sizeof(node.values))
            return node
        if code == EXT_COMPLEX:
            re_, im = self.fields(data, 2, "complex")
            if type(re_) is not float or type(im) is not float:
                raise CorruptCheckpointError("bad complex number")
            self.charge(32)
            return complex(re_, im)
        raise CorruptCheckpointError(f"unknown msgpack extension type {code} in the manifest")

    def _bigint(self, data: bytes) -> int:
        if not _BIGINT_TEXT.fullmatch(data):
            text = bytes(data[:40]).decode("ascii", "replace")
            raise CorruptCheckpointError(f"bad big integer {text!r}")
        value = _parse_int(bytes(data))
        self.charge(_sizeof(value))
        return value

    def _sharded_ref(self, data: bytes) -> ShardedRef:
        gshape, dtype, raw_blocks = self.fields(data, 3, "sharded array")
        _expect(gshape, list, "sharded array shape")
        _expect(dtype, str, "sharded array dtype")
        _expect(raw_blocks, list, "sharded array blocks")
        dtypes.dtype_of(dtype)
        dims = tuple(_int(d, "sharded array shape") for d in gshape)
        blocks = []
        size = _sizeof(dims)
        for c in raw_blocks:
            if type(c) is not list or len(c) != 2 or type(c[1]) is not list:
                raise CorruptCheckpointError("bad block record of a sharded array")
            offsets = tuple(_int(o, "sharded array block offset") for o in c[1])
            block = (_int(c[0], "sharded array block index"), offsets)
            size += _sizeof(block) + _sizeof(offsets)
            blocks.append(block)
        ref = ShardedRef(dims, dtype, tuple(blocks))
        self.charge(size + _sizeof(ref) + _sizeof(ref.blocks))
        return ref


_STR_ONLY = {str}
_STR_INT = {str, int}
_SHARDED = " sharded"  # the document's entry for the tree's sharded arrays (no field name has a space)


def _expect(value: Any, kind: type[_T], what: str) -> _T:
    if type(value) is not kind:
        raise CorruptCheckpointError(f"manifest field {what} is a {type(value).__name__}, not {kind.__name__}")
    return value


def _int(value: Any, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise CorruptCheckpointError(f"manifest field {what} must be an int >= {low}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    """``repr(value)``, cut short (and safe for an int past this process's int/str limit)."""
    if type(value) is int and not _INT_LOW <= value < _INT_HIGH:
        return f"about {'-' if value < 0 else ''}2**{abs(value).bit_length() - 1}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode(data: bytes, *, source: str = "manifest") -> Manifest:
    """Parse and validate a manifest; anything wrong raises :class:`CorruptCheckpointError` naming
    ``source``. Validation covers types, file names (no path can leave the checkpoint directory),
    tensor byte ranges (inside their file, not overlapping, matching dtype and shape), shapes NumPy can
    hold, and sharded arrays' blocks. Time is linear in the size of ``data`` (n log n for sharded arrays'
    blocks), and memory at most :data:`MEMORY_PER_BYTE` bytes per byte of it for what is built, or the
    manifest is refused."""
    try:
        doc = _Decoder(len(data)).document(data)
        return _validate(doc, doc.pop(_SHARDED, None) or [])
    except CorruptCheckpointError as e:
        raise type(e)(f"{source}: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{source} is not a valid manifest ({type(e).__name__}: {e})") from None


def _check_version(doc: dict[str, Any]) -> int:
    if doc.get("format") != FORMAT:
        raise CorruptCheckpointError("not a ckptstore manifest")
    version = doc.get("version")
    if type(version) is not int:
        raise CorruptCheckpointError(f"bad format version {_short(version)}")
    if version > VERSION or version < 1:
        raise UnsupportedFormatError(
            f"format version {_short(version)}; this ckptstore reads versions 1 to {VERSION} "
            f"(upgrade ckptstore to read checkpoints of version {_short(version)})"
        )
    return version


def _validate(doc: dict[str, Any], sharded: list[ShardedRef]) -> Manifest:
    version = _check_version(doc)
    step = _int(doc.get("step"), "step")
    created = doc.get("created")
    if type(created) is not float or not math.isfinite(created):
        raise CorruptCheckpointError(f"bad creation time {_short(created)}")
    writer = _expect(doc.get("writer"), str, "writer")
    metadata = _expect(doc.get("metadata"), dict, "metadata")
    raw_files = _expect(doc.get("files"), list, "files")
    files = []
    for f in raw_files:
        _expect(f, dict, "files[]")
        name = f.get("name")
        if type(name) is not str or not _SAFE_NAME.fullmatch(name) or name in (".", "..") or name == MANIFEST_NAME:
            raise CorruptCheckpointError(f"bad tensor file name {_short(name)}")
        files.append(FileEntry(name, _int(f.get("size"), "files[].size")))
    if len({f.name for f in files}) != len(files):
        raise CorruptCheckpointError("a tensor file is listed twice")
    raw_tensors = _expect(doc.get("tensors"), list, "tensors")
    itemsizes = {code: dtypes.dtype_of(code).itemsize for code in dtypes.supported_codes()}
    tensors = [_tensor_fast(t, files, itemsizes) or _tensor(t, files) for t in raw_tensors]
    _check_no_overlap(tensors, files)
    problem = nesting_problem(doc.get("tree")) or nesting_problem(metadata)
    if problem:
        raise CorruptCheckpointError(problem)
    _check_sharded(sharded, tensors)
    return Manifest(step, created, writer, metadata, doc.get("tree"), tuple(files), tuple(tensors), version)


def _tensor_fast(t: Any, files: list[FileEntry], itemsizes: dict[str, int]) -> TensorEntry | None:
    """A well-formed tensor record, checked in one pass (one per tensor: 100,000 of them must decode in well
    under a second); None when anything is off, and :func:`_tensor` then names the problem."""
    if type(t) is not dict:
        return None
    try:
        name, file, dtype, shape = t["name"], t["file"], t["dtype"], t["shape"]
        offset, nbytes, xxh3 = t["offset"], t["nbytes"], t["xxh3"]
    except KeyError:
        return None
    if not (
        type(name) is str
        and type(file) is int
        and type(dtype) is str
        and type(shape) is list
        and type(offset) is int
        and type(nbytes) is int
        and type(xxh3) is int
        and 0 <= file < len(files)
        and offset >= 0
        and xxh3 >= 0
        and nbytes <= MAX_NBYTES
        and len(shape) <= MAX_NDIM
        and dtype in itemsizes
    ):
        return None
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        count *= d
    if count * itemsizes[dtype] != nbytes or offset + nbytes > files[file].size:
        return None
    if not count and not fits_numpy(shape, itemsizes[dtype]):  # (not empty: nbytes bounds the shape)
        return None
    return TensorEntry(name, file, dtype, tuple(shape), offset, nbytes, xxh3)


def _tensor(t: Any, files: list[FileEntry]) -> TensorEntry:
    """Check one tensor record field by field; raise CorruptCheckpointError naming what is wrong."""
    _expect(t, dict, "tensors[]")
    name = t.get("name")
    _expect(name, str, "tensors[].name")
    file = _int(t.get("file"), "tensors[].file")
    if file >= len(files):
        raise CorruptCheckpointError(f"tensor {name!r} names file #{file}, but there are {len(files)}")
    dtype = t.get("dtype")
    _expect(dtype, str, "tensors[].dtype")
    itemsize = dtypes.dtype_of(dtype).itemsize
    shape = _expect(t.get("shape"), list, "tensors[].shape")
    if len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(f"tensor {name!r} has {len(shape)} dimensions, NumPy holds {MAX_NDIM}")
    count = 1
    for d in shape:
        count *= _int(d, f"shape of tensor {name!r}")
    offset = _int(t.get("offset"), "tensors[].offset")
    nbytes = _int(t.get("nbytes"), "tensors[].nbytes")
    if count * itemsize != nbytes:
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape {_short(shape)} of {dtype} needs {_short(count * itemsize)} bytes, "
            f"manifest says {_short(nbytes)}"
        )
    if not fits_numpy(shape, itemsize):
        raise CorruptCheckpointError(f"tensor {name!r} has a shape NumPy cannot hold: {_short(shape)}")
    if offset + nbytes > files[file].size:
        raise CorruptCheckpointError(
            f"tensor {name!r} lies at bytes {_short(offset)}..{_short(offset + nbytes)} of {files[file].name}, "
            f"which has {_short(files[file].size)}"
        )
    return TensorEntry(name, file, dtype, tuple(shape), offset, nbytes, _int(t.get("xxh3"), "xxh3"))


def _check_sharded(refs: list[ShardedRef], tensors: list[TensorEntry]) -> None:
    """Each sharded array's shape is one NumPy can hold; its blocks name existing tensors of its dtype, lie
    inside its shape and, together, cover it exactly once."""
    used: set[int] = set()  # indices below len(tensors): safe in a set
    for ref in refs:
        if not fits_numpy(ref.global_shape, dtypes.dtype_of(ref.dtype).itemsize):
            raise CorruptCheckpointError(f"a sharded array has a shape NumPy cannot hold: {_short(ref.global_shape)}")
        blocks = []
        for index, offsets in ref.blocks:
            if index >= len(tensors):
                raise CorruptCheckpointError(f"a sharded array names tensor #{index}, but there are {len(tensors)}")
            t = tensors[index]
            if t.dtype != ref.dtype:
                raise CorruptCheckpointError(f"block {t.name!r} is {t.dtype}, its sharded array {ref.dtype}")
            if index in used:
                raise CorruptCheckpointError(f"block {t.name!r} belongs to two sharded arrays (or twice to one)")
            used.add(index)
            blocks.append((offsets, t.shape))
        problem = check_partition(blocks, ref.global_shape)
        if problem is not None:
            raise CorruptCheckpointError(f"sharded array of shape {_short(ref.global_shape)}: {problem}")


def _check_no_overlap(tensors: list[TensorEntry], files: list[FileEntry]) -> None:
    spans = sorted((t.file, t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (f1, _, end1, n1), (f2, start2, _, n2) in itertools.pairwise(spans):
        if f1 == f2 and start2 < end1:
            raise CorruptCheckpointError(f"tensors {n1!r} and {n2!r} overlap in {files[f1].name}")
