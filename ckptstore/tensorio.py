"""Tensor files: a streaming safetensors writer with checksums computed on the fly, and range readers.

A file is laid out exactly as safetensors specifies (8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8, then the tensors' bytes back to back), so the safetensors library
opens it by itself. The writer never builds the file, nor a copy of a large tensor, in memory: it writes
each tensor in chunks of ``knobs.chunk_bytes`` and hashes (xxh3-64) each chunk while it is written, on a
helper thread (both calls release the GIL), so with two cores or more checksums add little to a save.
A local file of a megabyte or more is written with ``O_DIRECT`` (Linux; :class:`_DirectSink`): the bytes
go from memory to the disk without a copy into the page cache, which is most of a buffered write's CPU
time, and nothing of the training job's is pushed out of that cache. A blocking save's bytes go through
two kept staging buffers (:class:`_StagedSink`), a background save's from where they lie.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, BinaryIO, TypeVar

import numpy as np
import xxhash

from . import dtypes, knobs
from .errors import CorruptCheckpointError
from .manifest import TensorEntry
from .skeleton import ArrayLeaf
from .storage import MAX_READ_BUFFERS, Readable

try:
    import fcntl as _fcntl
except ImportError:  # Windows: no O_DIRECT either
    _fcntl = None  # type: ignore[assignment]

HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class FilePlan:
    """One tensor file to write: its name and the arrays it holds, in order."""

    name: str
    indices: tuple[int, ...]
    #: Written directly, put each large array at the file offset that matches its memory within a page,
    #: with padding before it where needed (:func:`write_file`).
    padded: bool = False


def tensor_names(arrays: Sequence[ArrayLeaf]) -> list[str]:
    """A unique, readable safetensors key for each array: its key path joined by '/'."""
    names: list[str] = []
    seen: set[str] = set()
    for leaf in arrays:
        base = "/".join(map(str, leaf.path)) or "<root>"
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}#{n}"
        seen.add(name)
        names.append(name)
    return names


#: In a padded file (:attr:`FilePlan.padded`), an array of at least this many bytes whose memory starts
#: elsewhere in a page than the file's offset does gets padding before it (less than a page), so that it
#: is written from where it lies; a smaller one is copied through the staging buffer.
PAD_MIN_BYTES = 1 << 20

#: Where padding is named: the safetensors format allows no holes between tensors, so padding is a uint8
#: tensor of its own, named with this prefix (the header's ``__metadata__["padding"]`` says which prefix).
PADDING_PREFIX = "__padding__/"


def plan_files(
    arrays: Sequence[ArrayLeaf], prefix: str, max_file_bytes: int, *, by_phase: bool = False
) -> list[FilePlan]:
    """Group arrays, in order, into files of at most ``max_file_bytes`` (a larger array gets its own).

    Within a file, arrays whose size is a multiple of ``DIRECT_ALIGN`` come first, those whose memory
    starts at the file's phase (:func:`memory_phase`: where most of their bytes start within a page) before
    the others, then the rest, each part in order. Behind a header padded to end at that phase
    (:func:`write_file`), each of the first then lies in a file page as it lies in a memory page, so a
    direct write takes it from where it lies (:class:`_DirectSink`): a torch tensor's memory starts 64
    bytes into a page, a snapshot buffer's arrays at its start. With ``by_phase`` (direct writes) the file
    is padded (:attr:`FilePlan.padded`): arrays of ``PAD_MIN_BYTES`` or more come first, grouped by phase
    (the heaviest first), each behind padding that puts it at its phase, so they are all written from
    where they lie (tensors allocated from the heap start anywhere in a page), then the rest in order."""
    groups: list[list[int]] = []
    size = 0
    for i, leaf in enumerate(arrays):
        n = leaf.array.nbytes
        if not groups or (size + n > max_file_bytes and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n

    plans: list[FilePlan] = []
    for k, g in enumerate(groups):
        name = f"{prefix}-{k:05d}.safetensors"
        if by_phase:
            phases: dict[int, int] = {}
            weight: dict[int, int] = {}
            for i in g:
                phase = _pad_phase(arrays[i].array)
                if phase is not None:
                    phases[i] = phase
                    weight[phase] = weight.get(phase, 0) + arrays[i].array.nbytes
            rank = {p: r for r, p in enumerate(sorted(weight, key=lambda p: -weight[p]))}
            first = sorted(phases, key=lambda i: rank[phases[i]])  # stable: in order within a phase
            chosen = set(first)
            plans.append(FilePlan(name, tuple(first + [i for i in g if i not in chosen]), padded=True))
            continue
        aligned = {i: memory_phase(arrays[i].array) for i in g if arrays[i].array.nbytes % DIRECT_ALIGN == 0}
        heaviest: dict[int | None, int] = {}
        for i, phase in aligned.items():
            heaviest[phase] = heaviest.get(phase, 0) + arrays[i].array.nbytes
        main = max(heaviest, key=lambda p: (p is not None, heaviest[p]), default=None)
        order = sorted(g, key=lambda i: 2 if i not in aligned else aligned[i] != main)  # stable
        plans.append(FilePlan(name, tuple(order)))
    return plans


def memory_phase(arr: Any) -> int | None:
    """Where a contiguous NumPy array's memory starts within a ``DIRECT_ALIGN`` page, if a header can end
    there (a multiple of 8); else None."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        return None
    phase = arr.ctypes.data % DIRECT_ALIGN
    return phase if phase % 8 == 0 else None


def _header(
    arrays: Sequence[ArrayLeaf],
    names: Sequence[str],
    indices: Sequence[int],
    align: int = 8,
    phase: int = 0,
    pads: dict[int, int] | None = None,
) -> bytes:
    # The JSON text is built piece by piece (what json.dumps of the same dict gives, byte for byte):
    # with 100,000 small tensors, building a dict of dicts first costs more than the rest of the header.
    quote = _encode_json_str
    pad_prefix = _padding_prefix([names[i] for i in indices]) if pads else None
    padding = f',"padding":{quote(pad_prefix)}' if pad_prefix else ""
    parts = ['{"__metadata__":{"writer":"ckptstore"' + padding + "}"]
    pos = 0
    for i in indices:
        if pads and pads.get(i):
            n, pad_name = pads[i], quote(f"{pad_prefix}{len(parts) - 1}")  # unique: the entries so far
            parts.append(f'{pad_name}:{{"dtype":"U8","shape":[{n}],"data_offsets":[{pos},{pos + n}]}}')
            pos += n
        leaf = arrays[i]
        arr = leaf.array
        n = arr.nbytes
        shape = ",".join(map(str, arr.shape))
        parts.append(f'{quote(names[i])}:{{"dtype":"{leaf.dtype}","shape":[{shape}],"data_offsets":[{pos},{pos + n}]}}')
        pos += n
    raw = (",".join(parts) + "}").encode()
    raw += b" " * ((phase - 8 - len(raw)) % align)  # the tensors' bytes start at ``phase`` modulo ``align``
    return struct.pack("<Q", len(raw)) + raw


_encode_json_str = json.encoder.encode_basestring_ascii


def _padding_prefix(names: Sequence[str]) -> str:
    """:data:`PADDING_PREFIX`, lengthened until no tensor name of the file starts with it."""
    prefix = PADDING_PREFIX
    while any(name.startswith(prefix) for name in names):
        prefix = "_" + prefix
    return prefix


def _pad_phase(arr: Any) -> int | None:
    """Where in a page an array of a padded file is to lie (its memory's phase), if it is large enough for
    padding (``PAD_MIN_BYTES``); else None."""
    return memory_phase(arr) if arr.nbytes >= PAD_MIN_BYTES else None


def _pads(arrays: Sequence[ArrayLeaf], indices: Sequence[int], phase: int) -> dict[int, int]:
    """The padding before each array of a padded file whose data starts at ``phase`` within a page: what
    puts each array :func:`_pad_phase` places at the offset within a page where its memory starts."""
    pads: dict[int, int] = {}
    pos = phase
    for i in indices:
        arr = arrays[i].array
        want = _pad_phase(arr)
        if want is not None and (want - pos) % DIRECT_ALIGN:
            pads[i] = (want - pos) % DIRECT_ALIGN
            pos += pads[i]
        pos += arr.nbytes
    return pads


def _chunks(arr: np.ndarray, chunk: int) -> Iterator[memoryview]:
    """The array's bytes in C order, as views of at most about ``chunk`` bytes; a non-contiguous array is
    copied one slab at a time, never whole."""
    if arr.nbytes == 0:
        return
    if arr.flags.c_contiguous:
        flat = arr.reshape(-1).view(np.uint8).data
        for start in range(0, len(flat), chunk):
            yield flat[start : start + chunk]
        return
    row_bytes = arr.nbytes // arr.shape[0]
    if row_bytes > chunk and arr.ndim > 1:
        for row in arr:
            yield from _chunks(row, chunk)
        return
    step = max(1, chunk // max(row_bytes, 1))
    for start in range(0, arr.shape[0], step):
        yield np.ascontiguousarray(arr[start : start + step]).reshape(-1).view(np.uint8).data


def write_file(
    f: BinaryIO,
    arrays: Sequence[ArrayLeaf],
    names: Sequence[str],
    plan: FilePlan,
    file_index: int,
    *,
    staged: bool = False,
) -> tuple[int, list[TensorEntry]]:
    """Write one safetensors file; return its size and the manifest entry of each array in it. ``staged``:
    a direct write goes through staging buffers (:class:`_StagedSink`)."""
    total = sum(arrays[i].array.nbytes for i in plan.indices)
    sink = _DirectSink.open(f, staged) if total >= DIRECT_MIN_BYTES else None
    pads: dict[int, int] = {}
    if sink is None or isinstance(sink, _StagedSink):  # where the bytes lie in memory does not matter
        header = _header(arrays, names, plan.indices)
    else:  # the first tensor's bytes at the file offset that matches its memory (plan_files)
        first = arrays[plan.indices[0]].array
        phase = memory_phase(first) if first.nbytes % DIRECT_ALIGN == 0 or plan.padded else None
        pads = _pads(arrays, plan.indices, phase or 0) if plan.padded else {}
        header = _header(arrays, names, plan.indices, DIRECT_ALIGN, phase or 0, pads)
    if sink is None:
        writeback = _Writeback(f, knobs.current.writeback_bytes)
        return _write_tensors(f.write, writeback.written, header, arrays, names, plan, file_index)
    try:
        out = _write_tensors(sink.write, lambda pos: None, header, arrays, names, plan, file_index, pads)
        sink.finish()
    finally:
        sink.close()
    return out


def _write_tensors(
    write: Callable[[Any], object],
    written: Callable[[int], None],
    header: bytes,
    arrays: Sequence[ArrayLeaf],
    names: Sequence[str],
    plan: FilePlan,
    file_index: int,
    pads: dict[int, int] | None = None,
) -> tuple[int, list[TensorEntry]]:
    write(header)
    pos = len(header)
    chunk = knobs.current.chunk_bytes
    entries = []
    with _HelperThread() as hasher:
        for i in plan.indices:
            if pads and pads.get(i):
                write(bytes(pads[i]))
                pos += pads[i]
            leaf = arrays[i]
            arr = leaf.array
            n = arr.nbytes
            if n < OVERLAP_BYTES and arr.flags.c_contiguous:  # most tensors: one hash call, one write
                data = arr.reshape(-1).view(np.uint8).data
                digest = xxhash.xxh3_64_intdigest(data)
                write(data)
            else:  # hashed on a second core while the same piece is written: no time added to the save
                h = xxhash.xxh3_64()
                at = pos
                for piece in _chunks(arr, chunk):
                    hashed = hasher.submit(h.update, piece)
                    write(piece)
                    hashed.result()
                    at += len(piece)  # bytes: the pieces are uint8 views
                    written(at)
                digest = h.intdigest()
            entries.append(TensorEntry(names[i], file_index, leaf.dtype, arr.shape, pos, n, digest))
            pos += n
            written(pos)
    return pos, entries


#: Direct writes: file offsets, lengths and memory addresses are multiples of this (the largest logical
#: block size of common disks; O_DIRECT needs the device's).
DIRECT_ALIGN = 4096
#: Files smaller than this are written through the page cache (a direct write's gain is in large files).
DIRECT_MIN_BYTES = 1 << 20


class _DirectSink:
    """A local file's bytes written with ``O_DIRECT``: the disk reads them from memory itself, with no copy
    into the page cache. On the VM of docs/benchmarks.md a buffered write of 256 MiB (with its fsync) took
    0.08 s of CPU and a direct one 0.01 s, and two processes wrote twice as fast; that CPU is what a
    background save takes from the training loop.

    ``O_DIRECT`` wants aligned memory, file offsets and lengths. Bytes arrive in order; a run whose memory
    lies in pages as its bytes do in the file's is written from where it lies, but for the head before its
    first page boundary (:func:`plan_files` orders a file's tensors so, and the header is padded to the
    first one's offset within its page: 64 for torch's tensors, 0 for a snapshot buffer's); anything else
    is copied into an aligned staging buffer of ``knobs.chunk_bytes``, written when full or together with
    the run that follows it (one ``pwritev``: each request costs the disk's latency). The last partial block
    goes through the page cache. The caller's ``fsync`` makes it all durable, as before.

    A file (or filesystem) that refuses ``O_DIRECT``, or a device whose blocks are larger than
    ``DIRECT_ALIGN`` (a direct write fails with EINVAL, having written nothing), is written through the
    page cache from that point on.
    """

    def __init__(self, fd: int, flags: int, stage: memoryview | None = None) -> None:
        self.fd = fd
        self.flags = flags  # the descriptor's flags without O_DIRECT
        self.direct = True
        self.pos = 0  # file offset of the staging buffer's first byte (aligned while ``direct``)
        self.fill = 0
        self.stage = stage if stage is not None else memoryview(mmap.mmap(-1, _stage_bytes(), **_PRIVATE))

    @staticmethod
    def open(f: BinaryIO, staged: bool = False) -> _DirectSink | None:
        """A sink for ``f`` if it is a plain local file at its start and direct writes are on, else None;
        with ``staged`` a :class:`_StagedSink`."""
        if _fcntl is None or not hasattr(os, "O_DIRECT") or not knobs.current.direct_writes:
            return None
        if type(f) not in (io.BufferedWriter, io.FileIO) or f.tell() != 0:  # a wrapper does its own thing
            return None
        try:
            f.flush()
            fd = f.fileno()
            flags = _fcntl.fcntl(fd, _fcntl.F_GETFL)
            _fcntl.fcntl(fd, _fcntl.F_SETFL, flags | os.O_DIRECT)
        except (OSError, ValueError):  # EINVAL: this filesystem has no direct I/O
            return None
        if staged:
            return _StagedSink(fd, flags & ~os.O_DIRECT)
        return _DirectSink(fd, flags & ~os.O_DIRECT)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        i, n = 0, len(view)
        while i < n:
            take = len(self.stage) - self.fill
            if self.direct and n - i >= DIRECT_ALIGN:
                head = -np.frombuffer(view[i : i + 1], np.uint8).ctypes.data % DIRECT_ALIGN
                if head == -self.fill % DIRECT_ALIGN and n - i - head >= DIRECT_ALIGN:  # memory pages = file's
                    if head == 0:
                        k = (n - i) // DIRECT_ALIGN * DIRECT_ALIGN
                        # What is staged ends on a block: it goes out first, then this, straight from where
                        # it lies, in one request (two would cost the disk's latency twice).
                        self._put(self.stage[: self.fill], view[i : i + k])
                        self.fill = 0
                        i += k
                        continue
                    take = min(take, head)  # staged up to the page boundary, where both align
            take = min(take, n - i)
            self.stage[self.fill : self.fill + take] = view[i : i + take]
            self.fill += take
            i += take
            if self.fill == len(self.stage):
                self._flush(len(self.stage))

    def _flush(self, nbytes: int) -> None:
        """Write the staging buffer's first ``nbytes`` (the rest, if any, moves to its start)."""
        self._put(self.stage[:nbytes])
        rest = self.fill - nbytes
        if rest:
            self.stage[:rest] = self.stage[nbytes : self.fill]
        self.fill = rest

    def _put(self, *views: memoryview) -> None:
        """Write ``views`` one after the other at ``self.pos``, advancing it, in one system call."""
        parts = [v for v in views if len(v)]
        while parts:
            try:
                n = os.pwritev(self.fd, parts, self.pos)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # the device wants larger blocks: nothing was written; again, buffered
                continue
            if n == 0:
                raise OSError(errno.EIO, "write returned 0 bytes")
            self.pos += n
            while n:  # drop what was written
                if n < len(parts[0]):
                    parts[0], n = parts[0][n:], 0
                else:
                    n -= len(parts.pop(0))
            if self.pos % DIRECT_ALIGN:  # a short, unaligned write: what follows cannot be aligned
                self._buffered()

    def _buffered(self) -> None:
        if self.direct:
            self.direct = False
            _fcntl.fcntl(self.fd, _fcntl.F_SETFL, self.flags)

    def finish(self) -> None:
        """Write what is staged: its aligned part directly, the last partial block through the page cache."""
        if self.direct and self.fill >= DIRECT_ALIGN:
            self._flush(self.fill // DIRECT_ALIGN * DIRECT_ALIGN)
        self._buffered()
        if self.fill:
            self._flush(self.fill)

    def close(self) -> None:
        """Leave the descriptor as it was (without ``O_DIRECT``): its fsync and close follow."""
        self._buffered()


class _StagedSink(_DirectSink):
    """A direct write whose bytes are copied into one of two page-aligned staging buffers of
    ``knobs.chunk_bytes`` in huge pages, each written on a helper thread while the other fills.

    The disk then gets requests as large as it takes, whatever memory the bytes came from. A direct
    request carries at most the device's ``max_segments`` runs of physically contiguous memory: on the VM
    of docs/benchmarks.md (254 segments, 4 MiB requests) 128 MiB of JAX's CPU buffers went out in 107
    requests of 1.2 MiB and took 1.3-1.8x as long as the same bytes from fresh memory (35 requests; from
    a huge page, two segments make 4 MiB). The copy (about 15 GB/s there) overlaps the writes; it costs
    CPU, which is why only a blocking save, whose caller waits anyway, stages (``knobs.staged_writes``).
    The buffers are kept for the thread's next save (huge pages are slow to fault in on first touch);
    :func:`release_staging` frees them.
    """

    def __init__(self, fd: int, flags: int) -> None:
        self.buffers = _staging_buffers(_stage_bytes())
        super().__init__(fd, flags, self.buffers[0])  # ``pos``: the writer thread's, while writes are in flight
        self.pending: list[Future[object] | None] = [None, None]  # each buffer's write in flight
        self.k = 0  # the buffer being filled
        self.writer = _HelperThread("ckptstore-write")

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        i, n = 0, len(view)
        while i < n:
            take = min(len(self.stage) - self.fill, n - i)
            if take < GIL_FREE_COPY_BYTES:
                self.stage[self.fill : self.fill + take] = view[i : i + take]
            else:  # np.copyto lets go of the GIL (a memoryview's slice assignment holds it)
                np.copyto(np.frombuffer(self.stage, np.uint8, take, self.fill), np.frombuffer(view, np.uint8, take, i))
            self.fill += take
            i += take
            if self.fill == len(self.stage):
                self.pending[self.k] = self.writer.submit(self._put, self.stage)
                self.k ^= 1
                self.stage, self.fill = self.buffers[self.k], 0
                self._wait(self.k)

    def _wait(self, k: int) -> None:
        job, self.pending[k] = self.pending[k], None
        if job is not None:
            job.result()  # the write's error, if it failed

    def finish(self) -> None:
        self._wait(self.k ^ 1)
        super().finish()

    def close(self) -> None:
        self.writer.__exit__()  # after a failure too: no write may still use the descriptor or the buffers
        super().close()


def _stage_bytes() -> int:
    """A staging buffer's size: ``knobs.chunk_bytes`` in whole ``DIRECT_ALIGN`` blocks, at least one."""
    return max(DIRECT_ALIGN, knobs.current.chunk_bytes // DIRECT_ALIGN * DIRECT_ALIGN)


#: Staged copies at least this large let go of the GIL; a smaller one costs less than the hand-off.
GIL_FREE_COPY_BYTES = 64 << 10

_staging = threading.local()


def _staging_buffers(size: int) -> list[memoryview]:
    """This thread's two staging buffers of ``size`` bytes (page-aligned, huge pages asked for)."""
    buffers: list[memoryview] | None = getattr(_staging, "buffers", None)
    if buffers is None or len(buffers[0]) != size:
        m = mmap.mmap(-1, 2 * size, **_PRIVATE)
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE)
        view = memoryview(m)
        buffers = _staging.buffers = [view[:size], view[size:]]
    return buffers


def release_staging() -> None:
    """Free the calling thread's staging buffers (:class:`_StagedSink`); the next staged write makes new ones."""
    _staging.buffers = None


#: Tensors at least this large are hashed on a helper thread, overlapping their write (xxhash and the
#: write both release the GIL); below it a thread hand-off costs more than the hash.
OVERLAP_BYTES = 1 << 20


class _HelperThread:
    """One helper thread for the duration of a file's write or read, started on first use.

    A plain thread with a queue, not a ``ThreadPoolExecutor``: an executor refuses work once the
    interpreter is exiting, which is exactly when a background save may still be writing (exit waits for
    it), and a pool kept across calls would not survive ``fork``. Where no thread can be started, the
    work runs inline.
    """

    def __init__(self, name: str = "ckptstore-hash") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Future[object], Callable[..., object], tuple[object, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., object], *args: object) -> Future[object]:
        job: Future[object] = Future()
        if self._thread is None:
            thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no new threads here (interpreter finalizing): do it now
                _run_into(job, fn, args)
                return job
            self._thread = thread
        self._jobs.put((job, fn, args))
        return job

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            _run_into(*item)

    def __enter__(self) -> _HelperThread:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()


def _run_into(job: Future[object], fn: Callable[..., object], args: tuple[object, ...]) -> None:
    try:
        job.set_result(fn(*args))
    except BaseException as e:  # raised to the waiting thread by job.result()
        job.set_exception(e)


class _Writeback:
    """Starts the kernel's writeback of a local file's bytes every ``every`` bytes, instead of at the final
    fsync: without it a 1 GiB save copies everything into the page cache first and only then waits for
    the disk (about 3x slower than overlapping both on a disk that takes 2 GB/s).

    posix_fadvise(DONTNEED) on dirty pages starts their writeback (Linux) and drops pages already clean,
    so a checkpoint does not push the training job's data out of the page cache either. Files without a
    file descriptor (object stores) are left alone.
    """

    def __init__(self, f: BinaryIO, every: int) -> None:
        self.f = f
        self.every = every
        self.done = 0
        self.fd = -1
        if every > 0 and hasattr(os, "posix_fadvise"):
            try:
                self.fd = f.fileno()
            except (AttributeError, OSError, ValueError):
                self.fd = -1

    def written(self, pos: int) -> None:
        if self.fd < 0 or pos - self.done < self.every:
            return
        try:
            self.f.flush()
            os.posix_fadvise(self.fd, self.done, pos - self.done, os.POSIX_FADV_DONTNEED)
        except (OSError, ValueError):
            self.fd = -1  # only a hint: never fail a save over it
            return
        self.done = pos


#: Fresh buffers at least this large are mapped anonymous memory of their own (see :func:`new_buffer`).
MAPPED_BUFFER_BYTES = 1 << 20


# Private: Python's default for anonymous maps is MAP_SHARED, which is shmem (slower to fault in, no huge
# pages, and shared with forked children). Windows has no flags and no fork.
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}


def new_buffer(nbytes: int) -> np.ndarray:
    """A fresh, writable uint8 array of ``nbytes`` for tensor bytes (restores, staging).

    Large ones are anonymous ``mmap`` memory, page-aligned, released when the last view of it goes. Unlike
    ``np.empty``, which asks for transparent huge pages (``MADV_HUGEPAGE``) on large arrays, they use the
    system's default pages, as torch's and safetensors' allocations do: huge pages made first-touch cost
    vary 20-fold on the VM this was measured on (docs/benchmarks.md). ``knobs.hugepages`` asks for them.
    """
    if nbytes < MAPPED_BUFFER_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    m = mmap.mmap(-1, nbytes, **_PRIVATE)
    if knobs.current.hugepages and hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, dtype=np.uint8)


#: Tensors smaller than this are read in blocks with their neighbours (one buffer per block, not per tensor).
SMALL_TENSOR_BYTES = 1 << 20
#: Largest such block: a small tensor returned as a view keeps at most this much memory alive.
BLOCK_BYTES = 16 << 20


def read_tensors(
    f: Readable,
    items: Sequence[tuple[int, TensorEntry]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Read tensors ``(key, entry)`` of one file, sorted by offset, into fresh arrays; return ``{key: array}``.

    A large tensor gets an array of its own; runs of adjacent small tensors share one block and are
    returned as views of it (with 100,000 small tensors, an allocation per tensor costs more than the
    bytes). The reads are :func:`read_parallel`'s.
    """
    dests: list[tuple[TensorEntry, np.ndarray]] = []
    k, n = 0, len(items)
    while k < n:
        j = _block_end(items, k) if items[k][1].nbytes < SMALL_TENSOR_BYTES else k + 1
        start, last = items[k][1].offset, items[j - 1][1]
        block = new_buffer(last.offset + last.nbytes - start)
        dests.extend((e, block[e.offset - start : e.offset - start + e.nbytes]) for _, e in items[k:j])
        k = j
    read_parallel(f, dests, verify=verify, source=source, advance=advance)
    out: dict[int, np.ndarray] = {}
    for (key, e), (_, part) in zip(items, dests):
        dtype = dtypes.dtype_of(e.dtype)
        if part.ctypes.data % dtype.alignment:  # after an odd-sized tensor in a block: never hand out unaligned
            part = part.copy()
        out[key] = part.view(dtype).reshape(e.shape)
    return out


def fill_tensors(
    f: Readable,
    items: Sequence[tuple[TensorEntry, np.ndarray]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Read tensors of one file, sorted by offset, straight into the caller's memory: ``(entry, dest)``
    with ``dest`` a writable, C-contiguous uint8 array of ``entry.nbytes`` (a view of an existing tensor's
    storage: nothing is allocated). The reads and checksums are :func:`read_parallel`'s.

    A failure part-way leaves some tensors (those read before it, and with several threads some after it)
    overwritten.

    Raises:
        CorruptCheckpointError: a tensor is truncated or fails its checksum.
    """
    for e, dest in items:
        if dest.nbytes != e.nbytes:
            raise CorruptCheckpointError(
                f"{source}: tensor {e.name!r} has {e.nbytes} bytes, its dtype and shape {dest.nbytes}"
            )
    read_parallel(f, items, verify=verify, source=source, advance=advance)


@dataclasses.dataclass
class _Piece:
    """One positional read: ``nbytes`` of the file from ``offset`` into ``views`` (parts of ``tensors``'
    destinations, in order)."""

    offset: int
    nbytes: int = 0
    views: list[memoryview] = dataclasses.field(default_factory=list)
    tensors: list[int] = dataclasses.field(default_factory=list)


def _pieces(items: Sequence[tuple[TensorEntry, np.ndarray]], piece_bytes: int) -> tuple[list[_Piece], list[int]]:
    """Cut the reads of ``items`` (sorted by offset) into pieces of at most ``piece_bytes``: a large tensor
    into several, adjacent small ones gathered into one (at most ``MAX_READ_BUFFERS`` buffers, so that a
    piece is one ``preadv``). Returns the pieces and, per item, how many pieces hold some of its bytes."""
    pieces: list[_Piece] = []
    count = [0] * len(items)
    cur: _Piece | None = None
    for t, (e, dest) in enumerate(items):
        view, pos = dest.data.cast("B"), 0
        while pos < e.nbytes:
            at = e.offset + pos
            full = cur is not None and (cur.nbytes >= piece_bytes or len(cur.views) >= MAX_READ_BUFFERS)
            if cur is None or full or cur.offset + cur.nbytes != at:
                cur = _Piece(at)
                pieces.append(cur)
            take = min(e.nbytes - pos, piece_bytes - cur.nbytes)
            cur.views.append(view[pos : pos + take])
            cur.nbytes += take
            if not cur.tensors or cur.tensors[-1] != t:
                cur.tensors.append(t)
                count[t] += 1
            pos += take
    return pieces, count


def read_parallel(
    f: Readable,
    items: Sequence[tuple[TensorEntry, np.ndarray]],
    *,
    verify: bool,
    source: str,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Read tensors ``(entry, dest)`` of one file, sorted by offset, into their ``dest`` (uint8 arrays of
    ``entry.nbytes``), with ``knobs.read_threads`` threads at once.

    The bytes are cut into pieces of ``knobs.chunk_bytes`` (a large tensor into several, runs of small
    ones gathered into one scatter read), and the threads take the pieces in file order, each with a
    positional read (``preadv`` on a local file, which releases the GIL): the disk sees a few sequential
    streams side by side, and with 100,000 small tensors one call reads a thousand. A tensor's checksum
    is checked, when ``verify``, by the thread that read its last piece, while the others go on reading.
    The reads land in ``dest`` directly: nothing is staged, so the memory in flight is the destinations'.
    The first failure stops the threads after their current piece and is raised. ``advance(nbytes)`` is
    called (from the reading threads) as each piece lands: a restore's progress.

    Raises:
        CorruptCheckpointError: a tensor is truncated or fails its checksum.
    """
    pieces, left = _pieces(items, knobs.current.chunk_bytes)
    if verify:
        for e, dest in items:
            if e.nbytes == 0:
                check(dest, e, source)
    lock = threading.Lock()

    def read(p: _Piece) -> None:
        got = f.readinto_at(p.views, p.offset)
        if got < p.nbytes:
            end = p.offset + got
            e = next(items[t][0] for t in p.tensors if items[t][0].offset + items[t][0].nbytes > end)
            raise CorruptCheckpointError(
                f"{source}: tensor {e.name!r} is truncated ({max(0, end - e.offset)} of {e.nbytes} bytes)"
            )
        for t in p.tensors:
            with lock:
                left[t] -= 1
                whole = left[t] == 0
            if whole and verify:
                check(items[t][1], items[t][0], source)
        if advance is not None:
            advance(p.nbytes)

    run_threads(read, pieces, knobs.current.read_threads)


def read_in_parts(n: int, part: int, threads: int, read: Callable[[int, int], int]) -> int:
    """Read ``n`` bytes as parts of ``part`` bytes, up to ``threads`` at once: ``read(lo, hi)`` fills bytes
    ``lo:hi`` of the destination and returns how many it got. Returns the bytes got up to the first short
    part (fewer than ``n`` only where the source ends early)."""
    part = max(1, part)
    spans = [(lo, min(n, lo + part)) for lo in range(0, n, part)]
    got = [0] * len(spans)

    def one(k: int) -> None:
        got[k] = read(*spans[k])

    run_threads(one, range(len(spans)), threads)
    total = 0
    for (lo, hi), g in zip(spans, got):
        total += g
        if g < hi - lo:
            break
    return total


_T = TypeVar("_T")


def run_threads(work: Callable[[_T], object], jobs: Sequence[_T], threads: int) -> None:
    """Run ``work`` on each of ``jobs``, taken in order by up to ``threads`` threads (the caller's among
    them); a failure stops the others after their current job. Raises the failure of the earliest job that
    failed: every job before it was taken before it and has run to its end, so what it says is what one
    thread would have said (a truncated file's first short piece, not a later one past the end).

    Plain threads, not a ``ThreadPoolExecutor`` (see :class:`_HelperThread`); where no thread can be
    started, the caller does all the work.
    """
    todo = enumerate(jobs)
    take = threading.Lock()
    failed: list[tuple[int, BaseException]] = []

    def serve() -> None:
        while not failed:
            with take:
                i, job = next(todo, (-1, None))
            if i < 0:
                return
            try:
                work(job)  # type: ignore[arg-type]
            except BaseException as e:
                failed.append((i, e))
                return

    helpers: list[threading.Thread] = []
    for _ in range(min(threads, len(jobs)) - 1):
        thread = threading.Thread(target=serve, name="ckptstore-read", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new threads here (interpreter finalizing)
            break
        helpers.append(thread)
    try:
        serve()
    finally:
        for thread in helpers:
            thread.join()
    if failed:
        raise min(failed, key=lambda f: f[0])[1]


def _block_end(items: Sequence[tuple[int, TensorEntry]], k: int) -> int:
    """The end of the run of adjacent small tensors starting at ``items[k]`` (at least one, at most
    BLOCK_BYTES in all)."""
    start = items[k][1].offset
    end = start + items[k][1].nbytes
    j = k + 1
    while j < len(items):
        e2 = items[j][1]
        if e2.nbytes >= SMALL_TENSOR_BYTES or e2.offset != end or e2.offset + e2.nbytes - start > BLOCK_BYTES:
            break
        end += e2.nbytes
        j += 1
    return j


def map_tensors(
    mapped_file: Any, items: Sequence[tuple[int, TensorEntry]], *, verify: bool, source: str
) -> dict[int, np.ndarray]:
    """Tensors ``(key, entry)`` of one local file as arrays on its mapping (``Storage.map_file``), copying
    nothing.

    The mapping is private and copy-on-write: the arrays are writable and writing to them never touches
    the file. Their pages are read on first touch (``verify`` touches them all, to hash them). The caller
    has checked the file's size against the manifest.
    """
    mapped = np.frombuffer(mapped_file, dtype=np.uint8)
    out: dict[int, np.ndarray] = {}
    for key, e in items:
        part = mapped[e.offset : e.offset + e.nbytes]
        if verify:
            check(part, e, source)
        dtype = dtypes.dtype_of(e.dtype)
        if e.offset % dtype.alignment:  # the file's page-aligned base: only odd offsets are unaligned
            part = part.copy()
        out[key] = part.view(dtype).reshape(e.shape)
    return out


def read_into(f: Readable, offset: int, buf: np.ndarray) -> int:
    """Fill ``buf`` from ``offset``; return the bytes read (fewer only at the end of the file)."""
    view = buf.data
    f.seek(offset)
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return got


def check(buf: np.ndarray, entry: TensorEntry, source: str) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``buf`` has the tensor's recorded checksum."""
    if xxhash.xxh3_64_intdigest(buf.data) != entry.xxh3:
        raise CorruptCheckpointError(f"{source}: tensor {entry.name!r} fails its checksum (xxh3-64)")


def hash_stream(f: Readable, entry: TensorEntry, source: str) -> None:
    """Check a tensor's checksum reading its bytes in chunks (bounded memory)."""
    h = xxhash.xxh3_64()
    f.seek(entry.offset)
    left = entry.nbytes
    chunk = knobs.current.chunk_bytes
    while left:
        data = f.read(min(chunk, left))
        if not data:
            raise CorruptCheckpointError(f"{source}: tensor {entry.name!r} is truncated")
        h.update(data)
        left -= len(data)
    if h.intdigest() != entry.xxh3:
        raise CorruptCheckpointError(f"{source}: tensor {entry.name!r} fails its checksum (xxh3-64)")


def read_header(f: Readable, size: int, source: str) -> dict[str, object]:
    """Parse a safetensors header with strict bounds (for verification and inspection)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CorruptCheckpointError(f"{source}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > HEADER_LIMIT or n + 8 > size:
        raise CorruptCheckpointError(f"{source}: safetensors header length {n} is out of bounds (file: {size})")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested past Python's stack
        raise CorruptCheckpointError(f"{source}: safetensors header is not JSON ({e})") from None
    if type(header) is not dict:
        raise CorruptCheckpointError(f"{source}: safetensors header is not a JSON object")
    return header
