"""Saves that finish in the background: a snapshot on the caller's thread, files written on another.

``CheckpointStore.save(step, state, blocking=False)`` walks the state and copies every array into host
snapshot buffers (a device-to-host copy for accelerator tensors, a memcpy for host arrays; a JAX array on
the CPU, immutable, is kept as it is and checked once written: ``ArrayLeaf.intact``), then returns a
:class:`SaveHandle` while a thread writes, commits and applies retention. The caller may update its
tensors in place as soon as ``save`` returns: what is written is the snapshot.

Bounds, by design:

* At most ``knobs.async_max_in_flight`` saves (default 1) are in flight per store; another ``save`` waits
  for a slot *before* taking its snapshot, so snapshot memory is at most that many copies of the state.
* Staging buffers are kept and reused by the next snapshot (a copy into memory already touched runs at
  memcpy speed; fresh memory costs a page fault per page). :meth:`Saver.close` releases them.
* Writer threads are not daemons: interpreter exit waits for in-flight saves to commit.

An error in a background save is raised by its handle's :meth:`SaveHandle.result`, and (unless the
handle already reported it) by the store's next ``save``, ``wait_until_finished`` or ``close`` as
:class:`~ckptstore.errors.AsyncSaveError`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

from . import knobs, tensorio
from .errors import AsyncSaveError
from .pipeline import Prepared

__all__ = ["SaveHandle", "Saver", "SnapshotBuffer"]

_log = logging.getLogger("ckptstore")
_T = TypeVar("_T")
_ALIGN = 64  # every staged array starts on a cache line (and on any dtype's alignment)
#: Staged arrays of at least this many bytes start on a page, where a direct write can take them from
#: (tensorio's ``_DirectSink``); smaller ones are packed closer.
_PAGE_ALIGN_BYTES = 64 << 10


def _offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Where each staged array of ``sizes`` bytes starts in a snapshot buffer, and the buffer's size."""
    offsets, pos = [], 0
    for n in sizes:
        pos += -pos % (tensorio.DIRECT_ALIGN if n >= _PAGE_ALIGN_BYTES else _ALIGN)
        offsets.append(pos)
        pos += n
    return offsets, pos


class SaveHandle(Generic[_T]):
    """A save running in the background, returned by ``CheckpointStore.save(..., blocking=False)``.

    The snapshot is taken already: the caller's arrays may change. ``result()`` waits for the commit.
    """

    def __init__(self, step: int) -> None:
        #: The step being saved.
        self.step = step
        self._future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._reported = False

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> _T:
        """Wait for the save; return its :class:`~ckptstore.CheckpointInfo`, or raise its error.

        Raises:
            TimeoutError: the save did not finish within ``timeout`` seconds.
            Exception: whatever the save raised (``StorageError``, ``CheckpointExistsError``, ...).
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the save of step {self.step} is still running") from None
        except BaseException:
            self._reported = True
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the save; return its error, or None if it committed."""
        e = self._future.exception(timeout)
        if e is not None:
            self._reported = True
        return e

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._future.exception() else "committed")
        return f"<SaveHandle step={self.step} {state}>"


#: Snapshots of at least this many bytes are copied by several threads (``np.copyto`` releases the GIL).
PARALLEL_COPY_BYTES = 64 << 20
#: Pieces a large contiguous array is cut into, so that threads share even one huge array.
_COPY_PIECE_BYTES = 32 << 20


def copy_all(copies: list[tuple[np.ndarray, np.ndarray]], nbytes: int) -> None:
    """``np.copyto(dst, src)`` for each pair: on ``knobs.snapshot_threads`` threads (the caller's among
    them) when there are ``PARALLEL_COPY_BYTES`` or more, taking pieces of at most 32 MiB from a shared
    queue, so that copying (and faulting in fresh memory) runs on several cores."""
    threads = min(knobs.current.snapshot_threads, os.cpu_count() or 1)
    if threads <= 1 or nbytes < PARALLEL_COPY_BYTES:
        for dst, src in copies:
            np.copyto(dst, src, casting="no")
        return
    pieces: queue.SimpleQueue[tuple[np.ndarray, np.ndarray]] = queue.SimpleQueue()
    for dst, src in copies:
        if src.nbytes > _COPY_PIECE_BYTES and src.flags.c_contiguous:
            d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
            for lo in range(0, len(s), _COPY_PIECE_BYTES):
                pieces.put((d[lo : lo + _COPY_PIECE_BYTES], s[lo : lo + _COPY_PIECE_BYTES]))
        else:
            pieces.put((dst, src))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                try:
                    dst, src = pieces.get_nowait()
                except queue.Empty:
                    return
                np.copyto(dst, src, casting="no")
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    helpers = [threading.Thread(target=work, name="ckptstore-snapshot", daemon=True) for _ in range(threads - 1)]
    for t in helpers:
        t.start()
    work()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


class SnapshotBuffer:
    """One host buffer that a snapshot's arrays are copied into, back to back; grown when too small. With
    tensors on an accelerator (``DeviceArray`` leaves of a state walked with ``defer_devices``), the
    buffer is their framework's pinned memory, and each is copied device-to-host straight into it, while
    the host arrays are copied meanwhile."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None
        self._fence: Callable[[], Callable[[], None]] | None = None  # set for a framework's pinned buffer

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.nbytes

    def snapshot(self, prepared: Prepared) -> Prepared:
        """Copy the prepared arrays into this buffer; the returned Prepared shares nothing with the caller's
        arrays. Non-contiguous arrays are copied element-wise into C order."""
        # A view of an immutable buffer (``ArrayLeaf.intact``) is kept as it is: nothing can change it.
        kept = [leaf.intact is not None and isinstance(leaf.array, np.ndarray) for leaf in prepared.arrays]
        sizes = [0 if k else leaf.array.nbytes for leaf, k in zip(prepared.arrays, kept)]
        offsets, total = _offsets(sizes)
        # A DeviceArray where the walk left an accelerator's tensor (typed as the host array it becomes).
        device: Any = next((leaf.array for leaf in prepared.arrays if not isinstance(leaf.array, np.ndarray)), None)
        if self._buf is None or self._buf.nbytes < total or (device is not None and self._fence is None):
            self._buf = self._fence = None  # drop the old buffer before allocating its replacement
            if device is not None:
                self._buf, self._fence = device.host_buffer(total)
            else:
                self._buf = tensorio.new_buffer(total)
        buf = self._buf
        staged = []
        copies = []
        for leaf, n, pos, k in zip(prepared.arrays, sizes, offsets, kept):
            if k:
                staged.append(leaf)
                continue
            src = leaf.array
            dst = buf[pos : pos + n].view(src.dtype).reshape(src.shape)
            if isinstance(src, np.ndarray):
                copies.append((dst, src))
            else:  # a DeviceArray: its copy starts now and runs while the host arrays are copied
                src.copy_to(buf[pos : pos + n])
            staged.append(dataclasses.replace(leaf, array=dst))
        copy_all(copies, total)
        if device is not None and self._fence is not None:
            self._fence()()  # every device-to-host copy has landed
        return dataclasses.replace(prepared, arrays=staged)

    def release(self) -> None:
        self._buf = self._fence = None


class Saver:
    """The background half of a store: in-flight saves, their snapshot buffers, their errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._taken = 0  # slots held: saves snapshotting or in flight
        self._running: list[SaveHandle[Any]] = []
        self._failed: list[SaveHandle[Any]] = []  # failed, and not reported through the store yet
        self._free: list[SnapshotBuffer] = []

    def in_flight(self) -> list[SaveHandle[Any]]:
        """Saves not finished yet, oldest first."""
        with self._lock:
            return list(self._running)

    def wait(self, *, raise_errors: bool = True) -> None:
        """Wait for every in-flight save; then raise the first error no handle has reported yet."""
        for handle in self.in_flight():
            handle._future.exception()  # waits; never raises
        if raise_errors:
            self.raise_unreported()

    def raise_unreported(self) -> None:
        with self._lock:
            failed = [h for h in self._failed if not h._reported]
            self._failed.clear()
        if failed:
            h = failed[0]
            h._reported = True
            e = h._future.exception()
            more = f" ({len(failed) - 1} more failed too)" if len(failed) > 1 else ""
            raise AsyncSaveError(f"the background save of step {h.step} failed: {e!r}{more}") from e

    def start(self, step: int, prepare: Callable[[], Prepared], work: Callable[[Prepared], _T]) -> SaveHandle[_T]:
        """Wait for a free slot; call ``prepare()`` and snapshot what it returns (on this thread); then run
        ``work(snapshot)`` on a new thread. Raises the error of an earlier save that no handle reported."""
        with self._slots:
            while self._taken >= max(1, knobs.current.async_max_in_flight):
                self._slots.wait()
            self._taken += 1
        buffer: SnapshotBuffer | None = None
        try:
            self.raise_unreported()
            prepared = prepare()
            with self._lock:
                buffer = self._free.pop() if self._free else SnapshotBuffer()
            snap = buffer.snapshot(prepared)
            del prepared  # the caller's arrays: nothing below may touch them
            handle: SaveHandle[_T] = SaveHandle(step)
            # Not a daemon: interpreter exit joins it, so an in-flight save commits before the process ends.
            thread = threading.Thread(
                target=self._run, args=(handle, snap, work, buffer), name=f"ckptstore-save-{step}", daemon=False
            )
            with self._lock:
                self._running.append(handle)
            try:
                thread.start()
            except BaseException:
                with self._lock:
                    self._running.remove(handle)
                raise
        except BaseException:
            self._finish(buffer)
            raise
        return handle

    def _run(
        self, handle: SaveHandle[_T], snap: Prepared, work: Callable[[Prepared], _T], buffer: SnapshotBuffer
    ) -> None:
        try:
            result = work(snap)
        except BaseException as e:
            _log.warning("ckptstore: background save of step %d failed: %r", handle.step, e)
            with self._lock:
                self._running.remove(handle)
                self._failed.append(handle)
            handle._future.set_exception(e)
        else:
            with self._lock:
                self._running.remove(handle)
            handle._future.set_result(result)
        finally:
            del snap
            self._finish(buffer)

    def _finish(self, buffer: SnapshotBuffer | None) -> None:
        """Give a slot (and its snapshot buffer) back."""
        with self._slots:
            if buffer is not None:
                if not knobs.current.async_keep_snapshot:
                    buffer.release()
                self._free.append(buffer)
            self._taken -= 1
            self._slots.notify_all()

    def release_snapshots(self) -> None:
        """Free the kept snapshot buffers (those of saves in flight are freed when they finish)."""
        with self._lock:
            for s in self._free:
                s.release()
