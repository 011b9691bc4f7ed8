"""Reading tensors from a remote file with parallel ranged GETs.

Local files are read with positional reads (:func:`tensorio.read_parallel`). On an object store each read
is a request with a latency of its own, so the tensors wanted from one file are turned into a few requests:

* tensors closer together than ``knobs.read_coalesce_bytes`` share one request (a few unwanted bytes in
  between cost less than another round trip);
* a request never spans more than ``knobs.read_part_bytes``; a larger tensor is fetched in parts;
* ``knobs.io_threads`` requests are in flight at once, and each part is copied into its tensor's memory (a
  fresh buffer, or the existing tensor of a restore in place) as it arrives, so memory holds the tensors
  being restored plus at most ``io_threads`` parts in transit.

Only the byte ranges of the tensors asked for are requested (plus the small gaps coalesced over), so
restoring a subset of a checkpoint reads only that subset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import dtypes, knobs, tensorio
from .errors import CorruptCheckpointError
from .manifest import TensorEntry


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes ``[src, src + n)`` of a request's answer go to ``out[dest : dest + n]`` of tensor ``key``."""

    key: int
    src: int
    dest: int
    n: int


@dataclasses.dataclass(frozen=True)
class Request:
    """One ranged GET: bytes ``[start, end)`` of the file, scattered into tensors."""

    start: int
    end: int
    pieces: tuple[Piece, ...]


def plan(entries: Sequence[tuple[int, TensorEntry]], part_bytes: int, coalesce_bytes: int) -> list[Request]:
    """The requests that fetch ``entries`` (key, entry) of one file; pure, for tests."""
    part_bytes = max(1, part_bytes)
    requests: list[Request] = []
    start = end = -1
    pieces: list[Piece] = []

    def flush() -> None:
        if pieces:
            requests.append(Request(start, end, tuple(pieces)))

    for key, e in sorted(entries, key=lambda ke: ke[1].offset):
        done = 0
        while done < e.nbytes:  # an empty tensor needs no bytes
            pos = e.offset + done
            joinable = bool(pieces) and end <= pos <= end + coalesce_bytes and pos - start < part_bytes
            if not joinable:
                flush()
                pieces, start = [], pos
            n = min(e.nbytes - done, part_bytes - (pos - start))
            pieces.append(Piece(key, pos - start, done, n))
            end = pos + n
            done += n
    flush()
    return requests


def read_tensors(
    fetch: Callable[[int, int], bytes],
    entries: Sequence[tuple[int, TensorEntry]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Read the tensors ``entries`` (key, entry) of one file through ``fetch(start, end) -> bytes``, with
    up to ``knobs.io_threads`` requests at once; return ``{key: array}``."""
    bufs = {key: tensorio.new_buffer(e.nbytes) for key, e in entries}
    fill_tensors(fetch, [(e, bufs[key]) for key, e in entries], verify=verify, source=source, advance=advance)
    return {key: bufs[key].view(dtypes.dtype_of(e.dtype)).reshape(e.shape) for key, e in entries}


def fill_tensors(
    fetch: Callable[[int, int], bytes],
    items: Sequence[tuple[TensorEntry, np.ndarray]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Read tensors ``(entry, dest)`` of one file into ``dest`` (writable uint8 arrays of ``entry.nbytes``:
    fresh buffers, or existing tensors' memory) through ``fetch(start, end) -> bytes``, with up to
    ``knobs.io_threads`` requests at once; check each one's checksum, when ``verify``, once it is whole.
    ``advance(nbytes)`` is called as each request's tensor bytes land (a restore's progress).

    Raises:
        CorruptCheckpointError: a tensor is truncated or fails its checksum (tensors before it, and some
            after it, are then overwritten).
    """
    requests = plan(
        list(enumerate(e for e, _ in items)), knobs.current.read_part_bytes, knobs.current.read_coalesce_bytes
    )

    def run(r: Request) -> None:
        data = fetch(r.start, r.end)
        if len(data) != r.end - r.start:
            names = sorted({items[p.key][0].name for p in r.pieces})
            raise CorruptCheckpointError(
                f"{source}: bytes {r.start}-{r.end} (tensors {names}) are truncated: got {len(data)}"
            )
        view = memoryview(data)
        for p in r.pieces:
            items[p.key][1][p.dest : p.dest + p.n] = np.frombuffer(view[p.src : p.src + p.n], dtype=np.uint8)
        if advance is not None:
            advance(sum(p.n for p in r.pieces))

    threads = max(1, min(knobs.current.io_threads, len(requests)))
    if threads == 1:
        for r in requests:
            run(r)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-read") as pool:
            # list(): re-raise the first failure here (the pool waits for the others on exit).
            list(pool.map(run, requests))
    if verify:
        for e, dest in items:
            tensorio.check(dest, e, source)


def read_span(fetch: Callable[[int, int], bytes], start: int, out: np.ndarray) -> int:
    """Fill ``out`` (contiguous uint8) with the bytes from ``start`` through ``fetch(start, end)``, in parts
    of ``knobs.read_part_bytes`` with up to ``knobs.io_threads`` requests at once; return the bytes got
    (fewer only at the end of the file)."""

    def part(lo: int, hi: int) -> int:
        data = fetch(start + lo, start + hi)
        out[lo : lo + len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    return tensorio.read_in_parts(len(out), knobs.current.read_part_bytes, max(1, knobs.current.io_threads), part)
