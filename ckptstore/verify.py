"""Check every byte of a checkpoint against its manifest, without rebuilding the state.

For each tensor file: it exists, is a regular file of exactly the size the manifest records, its
safetensors header parses within strict bounds and agrees with the manifest (every tensor's name, dtype,
shape and byte range, and nothing else but padding named in its metadata), the tensors and padding cover
the data area exactly, and each tensor's bytes have the recorded xxh3-64 checksum. Memory stays bounded:
bytes are hashed in chunks of ``knobs.chunk_bytes``.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from . import load, tensorio
from .errors import CorruptCheckpointError
from .manifest import FileEntry, Manifest, TensorEntry
from .progress import ProgressArg, scope
from .storage import Storage

__all__ = ["VerifyResult", "verify_checkpoint"]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What a verification read: the checkpoint's step, files, tensors and bytes checked."""

    step: int
    files: int
    tensors: int
    nbytes: int


def verify_checkpoint(
    storage: Storage, name: str, m: Manifest | None = None, *, progress: ProgressArg = None
) -> VerifyResult:
    """Check every byte of checkpoint directory ``name``; return what was checked.

    ``progress`` (see :mod:`ckptstore.progress`): the bytes of the tensor files as they are checked, each
    file's header then each tensor; the total is the files' sizes by the manifest.

    Raises:
        CheckpointNotFoundError: ``name`` has no manifest.
        CorruptCheckpointError: the manifest or a tensor file is damaged; the message names the file and,
            where one is to blame, the tensor.
    """
    if m is None:
        m = load.read_manifest(storage, name)
    sizes = storage.sizes(name)
    by_file: dict[int, list[TensorEntry]] = {i: [] for i in range(len(m.files))}
    for t in m.tensors:
        by_file[t.file].append(t)
    nbytes = 0
    with scope(progress, sum(fe.size for fe in m.files), desc=f"verify {name}", leave=False) as shown:
        for index, fe in enumerate(m.files):
            rel, source = load.checked_file(storage, name, fe, sizes)
            f = storage.open_read(rel)
            try:
                header = tensorio.read_header(f, fe.size, source)
                f.seek(0)
                (header_len,) = struct.unpack("<Q", f.read(8))
                data_start, pads = _check_header(header, 8 + header_len, by_file[index], source)
                shown.advance(data_start)
                for t in sorted(by_file[index], key=lambda t: t.offset):
                    tensorio.hash_stream(f, t, source)
                    shown.advance(t.nbytes)
            finally:
                f.close()
            _check_coverage([(t.offset, t.nbytes) for t in by_file[index]] + pads, data_start, fe, source)
            nbytes += fe.size
    return VerifyResult(m.step, len(m.files), len(m.tensors), nbytes)


def _check_header(
    header: dict[str, Any], data_start: int, tensors: list[TensorEntry], source: str
) -> tuple[int, list[tuple[int, int]]]:
    """Compare a safetensors header with the manifest's entries for that file; return where data starts,
    and the padding's byte ranges (``(offset, nbytes)``: uint8 entries of less than a page, named with the
    prefix ``__metadata__["padding"]`` gives, :func:`ckptstore.tensorio.write_file`). safetensors'
    ``data_offsets`` count from the end of the header, the manifest's offsets from the file's start: each
    tensor must lie at the same bytes by both."""
    expected = {t.name: t for t in tensors}
    meta = header.get("__metadata__")
    prefix = meta.get("padding") if type(meta) is dict else None
    names = {k for k in header if k != "__metadata__" and not (type(prefix) is str and prefix and k.startswith(prefix))}
    pads = []
    for key in sorted(header.keys() - names - {"__metadata__"}):
        entry = header[key]
        offsets = entry.get("data_offsets") if type(entry) is dict else None
        if (
            type(entry) is not dict
            or entry.get("dtype") != "U8"
            or type(offsets) is not list
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or entry.get("shape") != [offsets[1] - offsets[0]]
            or not 0 < offsets[1] - offsets[0] < tensorio.DIRECT_ALIGN
        ):
            raise CorruptCheckpointError(f"{source}: padding {key!r} is not what ckptstore writes: {entry!r}")
        pads.append((data_start + offsets[0], offsets[1] - offsets[0]))
    if names != expected.keys():
        extra = sorted(names - expected.keys())[:3]
        missing = sorted(expected.keys() - names)[:3]
        raise CorruptCheckpointError(
            f"{source}: the safetensors header and the manifest list different tensors "
            f"(header only: {extra}, manifest only: {missing})"
        )
    for key in sorted(names):
        t = expected[key]
        entry = header[key]
        if type(entry) is not dict:
            raise CorruptCheckpointError(f"{source}: header entry of tensor {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype != t.dtype or type(shape) is not list or tuple(shape) != t.shape:
            raise CorruptCheckpointError(
                f"{source}: tensor {key!r} is {dtype} {shape} in the file, {t.dtype} {list(t.shape)} in the manifest"
            )
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or offsets[1] - offsets[0] != t.nbytes
        ):
            raise CorruptCheckpointError(f"{source}: tensor {key!r} has bad data_offsets {offsets!r} in the file")
        if data_start + offsets[0] != t.offset:
            raise CorruptCheckpointError(
                f"{source}: tensor {key!r} lies at byte {data_start + offsets[0]} by the file's header, "
                f"at {t.offset} by the manifest"
            )
    return data_start, pads


def _check_coverage(ranges: list[tuple[int, int]], data_start: int, fe: FileEntry, source: str) -> None:
    """The tensors and the padding (``(offset, nbytes)`` each) fill the data area exactly, one after the
    other, as safetensors requires."""
    end = data_start
    for offset, nbytes in sorted(ranges):
        if offset != end:
            raise CorruptCheckpointError(
                f"{source}: the data area has {'a gap' if offset > end else 'an overlap'} at byte {min(offset, end)}"
            )
        end = offset + nbytes
    if end != fe.size:
        raise CorruptCheckpointError(f"{source}: tensors cover the file up to byte {end}, the file has {fe.size}")
