"""Restores into accelerator memory through a bounce buffer: a reused, bounded host buffer in two halves.

A tensor of ``like`` on a GPU cannot be read into: its bytes go through host memory. Rather than a host
copy of every such tensor (the state twice in memory), the file's bytes are read window by window into
one half of a bounce buffer while the other half's window is copied to the device; a half is read into
again only once its copies have finished (the framework's fence). The framework pins the buffer where it
can (page-locked memory makes host-to-device copies asynchronous and about twice as fast), and keeps it
for the next restore. Checksums, when asked, are computed on the host bytes as they pass, each tensor's
over its windows in order.

The framework's side is two small protocols, :class:`DeviceTarget` and :class:`BounceBuffer`; torch
implements them (``frameworks/torch.py``) for CUDA tensors, and for CPU tensors too, which is how the
pipeline is tested on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import xxhash

from . import knobs, tensorio
from .errors import CorruptCheckpointError
from .manifest import TensorEntry
from .storage import Readable


class BounceBuffer(Protocol):
    """Host memory that a framework copies to its devices from (pinned where it can)."""

    #: The buffer: writable, C-contiguous uint8.
    host: np.ndarray

    def fence(self) -> Callable[[], None]:
        """A wait that returns once every copy issued so far has read its host bytes."""
        ...


class DeviceTarget(Protocol):
    """An existing tensor in device memory that a checkpoint's bytes are copied into."""

    #: Its size in bytes (that of the checkpoint's tensor).
    nbytes: int
    #: Where its memory lies ((device, address of its first byte)): tensors sharing memory are found by it.
    address: tuple[str, int]

    def copy_in(self, offset: int, host: np.ndarray) -> None:
        """Copy ``host`` (a part of a :class:`BounceBuffer`'s ``host``) to bytes ``[offset, offset +
        host.nbytes)`` of the tensor; the copy may run after this returns, until the buffer's fence."""
        ...

    def bounce_buffer(self, nbytes: int) -> BounceBuffer:
        """A bounce buffer of at least ``nbytes`` for copies to this tensor's device (kept for reuse)."""
        ...


def fill(
    f: Readable,
    items: Sequence[tuple[TensorEntry, DeviceTarget]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Read tensors ``(entry, target)`` of one file, sorted by offset, into their device ``target``s through
    a bounce buffer of ``knobs.bounce_bytes`` in two halves: a window of the file is read (by
    ``knobs.read_threads`` threads, as :func:`tensorio.read_parallel` reads) into one half while the other
    half's copies run. ``advance(nbytes)`` is called as each window's copies are issued (a restore's
    progress).

    Raises:
        CorruptCheckpointError: a tensor is truncated or fails its checksum (the tensors before it, and
            the failing one in part, are then overwritten).
    """
    for e, target in items:
        if target.nbytes != e.nbytes:
            raise CorruptCheckpointError(
                f"{source}: tensor {e.name!r} has {e.nbytes} bytes, its dtype and shape {target.nbytes}"
            )
    if not items:
        return
    half = max(1, knobs.current.bounce_bytes // 2)
    buffer = items[0][1].bounce_buffer(2 * half)
    halves = [buffer.host[:half], buffer.host[half : 2 * half]]
    fences: list[Callable[[], None] | None] = [None, None]
    hashes = [xxhash.xxh3_64() for _ in items] if verify else []
    if verify:
        for e, _ in items:
            if e.nbytes == 0:
                tensorio.check(np.empty(0, np.uint8), e, source)
    try:
        for k, window in enumerate(windows(items, half)):
            h = k % 2
            wait = fences[h]
            if wait is not None:  # the copies from this half, two windows ago, must have read it
                wait()
            start, size = window[0][2], sum(n for *_, n in window)
            host = halves[h][:size]
            got = _read(f, host, start)
            for t, at, pos, n in window:
                e, target = items[t]
                if pos + n > start + got:
                    raise CorruptCheckpointError(
                        f"{source}: tensor {e.name!r} is truncated ({max(0, start + got - e.offset)} of "
                        f"{e.nbytes} bytes)"
                    )
                part = host[pos - start : pos - start + n]
                if verify:
                    hashes[t].update(part.data)
                    if at + n == e.nbytes and hashes[t].intdigest() != e.xxh3:
                        raise CorruptCheckpointError(f"{source}: tensor {e.name!r} fails its checksum (xxh3-64)")
                target.copy_in(at, part)
            fences[h] = buffer.fence()
            if advance is not None:
                advance(size)
    finally:  # nothing may still read the buffer once the caller goes on (or reuses it)
        for wait in fences:
            if wait is not None:
                wait()


def windows(items: Sequence[tuple[TensorEntry, DeviceTarget]], size: int) -> list[list[tuple[int, int, int, int]]]:
    """The reads of ``items`` (sorted by offset) cut into windows of at most ``size`` contiguous bytes of
    the file: each a list of ``(item, offset in its tensor, offset in the file, bytes)``."""
    out: list[list[tuple[int, int, int, int]]] = []
    end = used = -1
    for t, (e, _) in enumerate(items):
        at = 0
        while at < e.nbytes:
            pos = e.offset + at
            if not out or pos != end or used >= size:
                out.append([])
                used = 0
            n = min(e.nbytes - at, size - used)
            out[-1].append((t, at, pos, n))
            used += n
            at += n
            end = pos + n
    return out


def _read(f: Readable, host: np.ndarray, offset: int) -> int:
    """Fill ``host`` from the file's ``offset`` with positional reads of ``knobs.chunk_bytes``, several at
    once; return the bytes read (fewer only at the end of the file)."""
    view = host.data.cast("B")
    return tensorio.read_in_parts(
        host.nbytes,
        knobs.current.chunk_bytes,
        knobs.current.read_threads,
        lambda lo, hi: f.readinto_at([view[lo:hi]], offset + lo),
    )
