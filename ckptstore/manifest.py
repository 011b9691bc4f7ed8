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
import re
import threading
from typing import Any, TypeVar

import msgpack

from . import dtypes
from .blocks import check_partition
from .errors import CorruptCheckpointError, UnsupportedFormatError
from .skeleton import NamedTuple, Scalar, ShardedRef, Stateful, TensorRef, children, is_extension, iter_refs

FORMAT = "ckptstore"
VERSION = 1
MANIFEST_NAME = "manifest.msgpack"

# Extension type codes of the  Never reuse a number.
EXT_TUPLE = 1  # payload: msgpack array of the items
EXT_TENSOR = 2  # payload: msgpack int, the index in "tensors"
EXT_STATEFUL = 3  # payload: [type name, state]
EXT_NAMEDTUPLE = 4  # payload: [type name, [field, ...], [value, ...]]
EXT_SCALAR = 5  # payload: [dtype code, raw bytes] (a NumPy scalar)
EXT_BIGINT = 6  # payload: decimal string of an int outside 64 bits
EXT_COMPLEX = 7  # payload: [real, imag]
EXT_SHARDED = 8  # payload: [global shape, dtype code, [[tensor index, [offset, ...]], ...]] (blocks of one array)

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
    version: int = VERSION


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
        "version": VERSION,
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
_ext_depth = threading.local()


def _ext_hook(code: int, data: bytes) -> Any:
    depth = getattr(_ext_depth, "n", 0)
    if depth > MAX_EXT_DEPTH:  # MAX_EXT_DEPTH containers, then a leaf (a tensor reference) inside
        raise CorruptCheckpointError(f"extension types nest deeper than {MAX_EXT_DEPTH} levels")
    _ext_depth.n = depth + 1
    try:
        return _decode_ext(code, data)
    finally:
        _ext_depth.n = depth


def nesting_problem(node: Any) -> str | None:
    """Why a tree nests too deeply to be read back safely, or None (iterative: any depth is safe here)."""
    stack = [(node, 1, 0)]
    while stack:
        x, depth, ext = stack.pop()
        kids = children(x)
        if not kids:
            continue
        ext += is_extension(x)
        if depth > MAX_DEPTH:
            return f"containers nest deeper than {MAX_DEPTH} levels"
        if ext > MAX_EXT_DEPTH:
            return f"tuples, NamedTuples and stateful objects nest deeper than {MAX_EXT_DEPTH} levels"
        stack.extend((c, depth + 1, ext) for _, c in kids)
    return None


def _check_leaves(node: Any, n_tensors: int) -> None:
    """Every tensor reference of a skeleton names a listed tensor, every NumPy scalar has its dtype's size
    (so rebuilding cannot fail half-way, after some objects in ``like`` were already loaded)."""
    stack = [node]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is TensorRef and x.index >= n_tensors:
            raise CorruptCheckpointError(f"the tree refers to tensor #{x.index}, the manifest lists {n_tensors}")
        if t is Scalar and len(x.data) != dtypes.dtype_of(x.dtype).itemsize:
            raise CorruptCheckpointError(f"a numpy scalar of dtype {x.dtype} has {len(x.data)} bytes")
        stack.extend(c for _, c in children(x))


def _decode_ext(code: int, data: bytes) -> Any:
    if code == EXT_TENSOR:
        fast = _read_uint(data)
        if fast is not None:
            return TensorRef(fast)
        index = _unpack(data)
        if type(index) is not int or index < 0:
            raise CorruptCheckpointError(f"bad tensor reference {index!r}")
        return TensorRef(index)
    if code == EXT_TUPLE:
        items = _unpack(data)
        _expect(items, list, "tuple")
        return tuple(items)
    if code == EXT_STATEFUL:
        name, state = _unpack_fields(data, 2, "stateful object")
        _expect(name, str, "stateful type name")
        return Stateful(name, state)
    if code == EXT_NAMEDTUPLE:
        name, fields, values = _unpack_fields(data, 3, "NamedTuple")
        _expect(name, str, "NamedTuple type name")
        _expect(fields, list, "NamedTuple fields")
        _expect(values, list, "NamedTuple values")
        if len(fields) != len(values) or not all(type(f) is str for f in fields):
            raise CorruptCheckpointError("NamedTuple fields and values do not match")
        return NamedTuple(name, tuple(fields), tuple(values))
    if code == EXT_SCALAR:
        dtype, raw = _unpack_fields(data, 2, "numpy scalar")
        _expect(raw, bytes, "numpy scalar bytes")
        dtypes.dtype_of(dtype)
        return Scalar(dtype, raw)
    if code == EXT_BIGINT:
        text = data.decode("ascii", "replace")
        if not re.fullmatch(r"-?[0-9]{1,4300}", text):
            raise CorruptCheckpointError(f"bad big integer {text[:40]!r}")
        return int(text)
    if code == EXT_SHARDED:
        return _sharded_ref(data)
    if code == EXT_COMPLEX:
        re_, im = _unpack_fields(data, 2, "complex")
        if type(re_) is not float or type(im) is not float:
            raise CorruptCheckpointError("bad complex number")
        return complex(re_, im)
    raise CorruptCheckpointError(f"unknown msgpack extension type {code} in the manifest")


def _unpack(data: bytes) -> Any:
    n = len(data)  # no string, array, map or extension can declare more than the bytes there are
    return msgpack.unpackb(
        data,
        ext_hook=_ext_hook,
        raw=False,
        strict_map_key=False,
        use_list=True,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )


def _unpack_fields(data: bytes, n: int, what: str) -> list[Any]:
    items = _unpack(data)
    if type(items) is not list or len(items) != n:
        raise CorruptCheckpointError(f"bad {what} record in the manifest")
    return items


def _expect(value: Any, kind: type[_T], what: str) -> _T:
    if type(value) is not kind:
        raise CorruptCheckpointError(f"manifest field {what} is a {type(value).__name__}, not {kind.__name__}")
    return value


def _int(value: Any, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise CorruptCheckpointError(f"manifest field {what} must be an int >= {low}, got {value!r}")
    return value


def decode(data: bytes, *, source: str = "manifest") -> Manifest:
    """Parse and validate a manifest; anything wrong raises :class:`CorruptCheckpointError` naming
    ``source``. Validation covers types, file names (no path can leave the checkpoint directory),
    tensor byte ranges (inside their file, not overlapping, matching dtype and shape)."""
    try:
        doc = _unpack(data)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{source}: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{source} is not a valid manifest ({type(e).__name__}: {e})") from None
    try:
        return _validate(doc)
    except CorruptCheckpointError as e:
        raise type(e)(f"{source}: {e}") from None


def _validate(doc: Any) -> Manifest:
    if type(doc) is not dict or doc.get("format") != FORMAT:
        raise CorruptCheckpointError("not a ckptstore manifest")
    version = doc.get("version")
    if type(version) is not int:
        raise CorruptCheckpointError(f"bad format version {version!r}")
    if version > VERSION or version < 1:
        raise UnsupportedFormatError(
            f"format version {version}; this ckptstore reads version {VERSION} "
            f"(upgrade ckptstore to read checkpoints of version {version})"
        )
    step = _int(doc.get("step"), "step")
    created = doc.get("created")
    if type(created) is not float or not math.isfinite(created):
        raise CorruptCheckpointError(f"bad creation time {created!r}")
    writer = _expect(doc.get("writer"), str, "writer")
    metadata = _expect(doc.get("metadata"), dict, "metadata")
    raw_files = _expect(doc.get("files"), list, "files")
    files = []
    for f in raw_files:
        _expect(f, dict, "files[]")
        name = f.get("name")
        if type(name) is not str or not _SAFE_NAME.fullmatch(name) or name in (".", "..") or name == MANIFEST_NAME:
            raise CorruptCheckpointError(f"bad tensor file name {name!r}")
        files.append(FileEntry(name, _int(f.get("size"), "files[].size")))
    if len({f.name for f in files}) != len(files):
        raise CorruptCheckpointError("a tensor file is listed twice")
    raw_tensors = _expect(doc.get("tensors"), list, "tensors")
    itemsizes = {code: dtypes.dtype_of(code).itemsize for code in dtypes.supported_codes()}
    tensors = [_tensor_fast(t, files, itemsizes) or _tensor(t, files) for t in raw_tensors]
    _check_no_overlap(tensors, files)
    problem = nesting_problem(doc.get("tree")) or nesting_problem(metadata)  # first: the checks below recurse
    if problem:
        raise CorruptCheckpointError(problem)
    _check_leaves(doc.get("tree"), len(tensors))
    for t in tensors:  # what NumPy can represent (an empty tensor's other dimensions can be anything)
        if len(t.shape) > MAX_NDIM or any(d >= 1 << 63 for d in t.shape):
            raise CorruptCheckpointError(f"tensor {t.name!r} has a shape NumPy cannot hold: {list(t.shape)[:8]}")
    _check_sharded(doc.get("tree"), tensors)
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
    count = 1
    for d in shape:
        count *= _int(d, f"shape of tensor {name!r}")
    offset = _int(t.get("offset"), "tensors[].offset")
    nbytes = _int(t.get("nbytes"), "tensors[].nbytes")
    if count * itemsize != nbytes:
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape {shape} of {dtype} needs {count * itemsize} bytes, manifest says {nbytes}"
        )
    if offset + nbytes > files[file].size:
        raise CorruptCheckpointError(
            f"tensor {name!r} lies at bytes {offset}..{offset + nbytes} of {files[file].name}, "
            f"which has {files[file].size}"
        )
    return TensorEntry(name, file, dtype, tuple(shape), offset, nbytes, _int(t.get("xxh3"), "xxh3"))


def _sharded_ref(data: bytes) -> ShardedRef:
    gshape, dtype, raw_blocks = _unpack_fields(data, 3, "sharded array")
    _expect(gshape, list, "sharded array shape")
    _expect(dtype, str, "sharded array dtype")
    _expect(raw_blocks, list, "sharded array blocks")
    dtypes.dtype_of(dtype)
    dims = tuple(_int(d, "sharded array shape") for d in gshape)
    blocks = []
    for c in raw_blocks:
        if type(c) is not list or len(c) != 2 or type(c[1]) is not list:
            raise CorruptCheckpointError("bad block record of a sharded array")
        offsets = tuple(_int(o, "sharded array block offset") for o in c[1])
        blocks.append((_int(c[0], "sharded array block index"), offsets))
    return ShardedRef(dims, dtype, tuple(blocks))


def _check_sharded(skeleton: Any, tensors: list[TensorEntry]) -> None:
    """Each sharded array's blocks name existing tensors of its dtype, lie inside its shape and, together,
    cover it exactly once."""
    used: set[int] = set()
    for ref in iter_refs(skeleton):
        if type(ref) is not ShardedRef:
            continue
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
            raise CorruptCheckpointError(f"sharded array of shape {ref.global_shape}: {problem}")


def _check_no_overlap(tensors: list[TensorEntry], files: list[FileEntry]) -> None:
    spans = sorted((t.file, t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (f1, _, end1, n1), (f2, start2, _, n2) in itertools.pairwise(spans):
        if f1 == f2 and start2 < end1:
            raise CorruptCheckpointError(f"tensors {n1!r} and {n2!r} overlap in {files[f1].name}")
