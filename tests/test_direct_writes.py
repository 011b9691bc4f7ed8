"""Local tensor files written with O_DIRECT (tensorio._DirectSink): the same files, bytes for bytes, as
through the page cache; a blocking save's bytes through two kept staging buffers (tensorio._StagedSink),
a background save's aligned runs taken from where they lie; the page cache used where direct I/O is
refused; a failing direct write fails the save and loses nothing saved before."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import ckptstore
from ckptstore import asyncsave, knobs, tensorio, tree
from ckptstore.errors import StorageError
from ckptstore.storage import TMP_PREFIX

fcntl = pytest.importorskip("fcntl")
pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")

A = tensorio.DIRECT_ALIGN
_real_fcntl = fcntl


def _state() -> dict[str, np.ndarray]:
    """Page-multiple tensors between odd ones, a non-contiguous one, tiny ones and an empty one."""
    rng = np.random.default_rng(7)
    return {
        "bias0": rng.random(1001, dtype=np.float32),  # odd: 4004 bytes
        "w0": rng.random((512, 1024), dtype=np.float32),  # 2 MiB
        "bias1": rng.integers(0, 100, 333, dtype=np.int8),
        "w1": rng.random((300, 1024)),  # 2.4 MB, a multiple of 4096
        "emb": rng.random((5003, 77), dtype=np.float32).astype(ml_dtypes.bfloat16),  # odd and large
        "t": rng.random((700, 600)).T,  # non-contiguous, 3.4 MB
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5),
    }


def _files(root: Path, step: int) -> list[Path]:
    return sorted((root / f"step_{step:08d}").glob("*.safetensors"))


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _first_tensor(path: Path) -> str:
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == 0)


def _padding(path: Path) -> dict[str, int]:
    """The padding entries of a tensor file (those the header's metadata names), with their sizes."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    prefix = header["__metadata__"].get("padding")
    pads = {k: v["shape"][0] for k, v in header.items() if prefix and k.startswith(prefix)}
    assert all(header[k]["dtype"] == "U8" and 0 < n < A for k, n in pads.items())
    return pads


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """A tensor file read by safetensors itself, its padding left out."""
    got = load_file(str(path))
    pads = _padding(path)
    assert all(not got[k].any() for k in pads)  # zeros
    return {k: v for k, v in got.items() if k not in pads}


def _at_phase(arr: np.ndarray, phase: int) -> np.ndarray:
    """A copy of ``arr`` whose memory starts ``phase`` bytes into a page (a torch tensor's starts 64 in)."""
    raw = np.empty(arr.nbytes + 2 * A, np.uint8)
    start = (phase - raw.ctypes.data) % A
    out = raw[start : start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    assert out.ctypes.data % A == phase
    return out


def _equal(a: dict[str, Any], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], v) and a[k].dtype == v.dtype for k, v in b.items())


class _Pwrites:
    """Counts the bytes of every pwritev (the sink's one write call), by whether its descriptor had
    O_DIRECT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.direct = self.buffered = 0
        real = os.pwritev

        def pwritev(fd: int, buffers: Any, offset: int) -> int:
            n = real(fd, buffers, offset)
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                self.direct += n
            else:
                self.buffered += n
            return n

        monkeypatch.setattr(os, "pwritev", pwritev)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view[:1], np.uint8).ctypes.data)


def _first_bytes(buffers: list[Any], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``buffers``, as buffers."""
    out = []
    for b in map(memoryview, buffers):
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(b)
    return out


def _save(store: ckptstore.CheckpointStore, step: int, state: Any, mode: str) -> None:
    """A save by ``mode``: "staged" (blocking), "in place" (blocking, ``staged_writes`` off) or "background"."""
    if mode == "background":
        store.save(step, state, blocking=False).result()
        return
    with knobs.override(staged_writes=mode == "staged"):
        store.save(step, state)


MODES = ["staged", "in place", "background"]


@pytest.mark.parametrize("mode", ["in place", "background"])
@pytest.mark.parametrize("chunk_bytes", [16 << 20, 64 << 10, 3 * A + 5])
def test_direct_files_are_the_files_the_page_cache_would_hold(tmp_path: Path, mode: str, chunk_bytes: int) -> None:
    state = _state()
    store = ckptstore.CheckpointStore(tmp_path)
    with knobs.override(chunk_bytes=chunk_bytes):
        _save(store, 1, state, mode)
        with knobs.override(direct_writes=False):
            store.save(2, state)
    (direct,), (cached,) = _files(tmp_path, 1), _files(tmp_path, 2)
    # The header is padded so that the first tensor's bytes lie in a file page as in their memory page: the
    # caller's array (in place) or the snapshot buffer's, whose large arrays start on a page.
    first = state[_first_tensor(direct)]
    assert _data_start(direct) % A == ((tensorio.memory_phase(first) or 0) if mode == "in place" else 0)
    assert _data_start(cached) % 8 == 0 and _data_start(cached) < _data_start(direct)
    # The same tensors and bytes after the header, but for padding that puts a large array at its phase:
    # nothing padded at the end, nothing lost at a seam.
    padding = sum(_padding(direct).values())
    assert direct.stat().st_size - _data_start(direct) == cached.stat().st_size - _data_start(cached) + padding
    assert _padding(cached) == {}
    assert _equal(_tensors(direct), state)
    assert _equal(store.restore(1, verify=True), state)
    assert _equal(store.restore(2, verify=True), state)


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 64 << 10, 3 * A + 5])
def test_a_blocking_save_stages_its_bytes_into_the_file_the_page_cache_would_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    state = {"big": np.random.default_rng(2).random((3 << 20) // 8), **_state()}  # several buffers' worth
    store = ckptstore.CheckpointStore(tmp_path)
    tensorio.release_staging()
    writes: list[tuple[str, int, int]] = []  # (thread, buffer address, bytes) of each direct pwritev
    real = os.pwritev

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        n = real(fd, buffers, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            writes.append((threading.current_thread().name, _address(memoryview(buffers[0])), n))
        return n

    monkeypatch.setattr(os, "pwritev", pwritev)
    with knobs.override(chunk_bytes=chunk_bytes):
        store.save(1, state)
        buffers = tensorio._staging.buffers
        store.save(2, state)
        assert tensorio._staging.buffers is buffers  # kept for the thread's next save
        with knobs.override(direct_writes=False):
            store.save(3, state)
    (staged,), (again,), (cached,) = _files(tmp_path, 1), _files(tmp_path, 2), _files(tmp_path, 3)
    # Where the bytes lay in memory does not matter: no padding, the plain writer's file byte for byte.
    assert staged.read_bytes() == cached.read_bytes() == again.read_bytes()
    size = staged.stat().st_size
    # Every full buffer went out from the helper thread, from the two buffers in turn; only the last part
    # (its aligned blocks direct, from the caller's thread) and the last partial block (buffered) did not.
    addresses = [_address(b) for b in buffers]
    full = [w for w in writes[: len(writes) // 2] if w[0] == "ckptstore-write"]
    assert len(full) == size // len(buffers[0]) and (len(full) >= 2 or chunk_bytes > size)
    assert [a for _, a, _ in full] == [addresses[k % 2] for k in range(len(full))]
    assert all(n == len(buffers[0]) for _, _, n in full)
    assert sum(n for _, _, n in writes) == 2 * (size // A * A)
    assert _equal(store.restore(1, verify=True), state)
    store.close()
    assert tensorio._staging.buffers is None  # close frees the caller's


def test_aligned_tensors_come_first_in_a_file_and_start_aligned() -> None:
    _, arrays = tree.flatten(_state())
    plan = tensorio.plan_files(arrays, "x", 1 << 30)[0]
    sizes = [arrays[i].array.nbytes for i in plan.indices]
    aligned = [n % A == 0 for n in sizes]
    assert aligned == sorted(aligned, reverse=True)  # all multiples of A before any other
    assert sorted(plan.indices) == list(range(len(arrays)))


def test_a_background_save_writes_its_aligned_tensors_from_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    store = ckptstore.CheckpointStore(tmp_path)
    staged: list[int] = []
    real = tensorio._DirectSink.write

    def write(self: Any, data: Any) -> None:
        before = self.fill
        real(self, data)
        staged.append(self.fill - before)  # what this call left in the staging buffer (or flushed from it)

    monkeypatch.setattr(tensorio._DirectSink, "write", write)
    counts = _Pwrites(monkeypatch)
    store.save(1, state, blocking=False).result()
    aligned = sum(v.nbytes for v in state.values() if v.nbytes % A == 0)
    odd = sum(v.nbytes for v in state.values() if v.nbytes % A)
    assert counts.direct >= aligned  # every aligned tensor went to the disk directly
    assert counts.buffered < A  # the last partial block alone went through the page cache
    # Staged (copied): the header and the odd tensors; the aligned ones were written from the snapshot.
    assert 0 < sum(n for n in staged if n > 0) <= _data_start(_files(tmp_path, 1)[0]) + odd
    assert _equal(store.restore(1), state)


def test_tensors_that_start_inside_a_page_are_written_from_where_they_lie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    state = {  # most bytes 64 into a page (as torch allocates), one tensor at another phase, odd ones
        "a": _at_phase(rng.random((256, 1024), dtype=np.float32), 64),
        "odd": _at_phase(rng.random(999, dtype=np.float32), 64),
        "b": _at_phase(rng.random((512, 1024), dtype=np.float32), 64),
        "c": _at_phase(rng.random((256, 1024), dtype=np.float32), 128),
        "d": _at_phase(rng.random((64, 1024), dtype=np.float32), 12),  # a header cannot end there
    }
    _, arrays = tree.flatten(state)
    (plan,) = tensorio.plan_files(arrays, "x", 1 << 30)
    assert [arrays[i].path[-1] for i in plan.indices] == ["a", "b", "c", "d", "odd"]
    staged: list[int] = []
    real = tensorio._DirectSink._put

    def put(self: Any, *views: memoryview) -> None:
        for view in views:
            if len(view) and _address(view) == _address(self.stage):
                staged.append(len(view))
        real(self, *views)

    monkeypatch.setattr(tensorio._DirectSink, "_put", put)
    store = ckptstore.CheckpointStore(tmp_path)
    _save(store, 1, state, "in place")
    (path,) = _files(tmp_path, 1)
    assert _data_start(path) % A == 64 and _first_tensor(path) == "a"
    # c, at another phase, lies behind 64 bytes of padding, at its phase: written from where it lies too.
    assert list(_padding(path).values()) == [64]
    # Copied through the staging buffer, and nothing else: the header and a's head up to its first page
    # boundary, the page where a ends and b starts, the page where b ends, the padding lies and c starts,
    # c's last 128 bytes, d (12 bytes into a page: no padding serves a phase that is not a multiple of 8)
    # and the odd one.
    others = state["d"].nbytes + state["odd"].nbytes
    assert sum(staged) == _data_start(path) + (A - 64) + A + A + 128 + others
    assert _equal(store.restore(1, verify=True), state)
    assert _equal(_tensors(path), state)


def test_tensors_at_other_phases_lie_at_their_phase_behind_padding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tensors allocated from the heap start anywhere in a page. In one file, each large one lies behind
    # padding (a uint8 tensor of less than a page, named in the header's metadata: safetensors allows no
    # holes) at the offset within a page where its memory starts: written from where it lies, not copied.
    rng = np.random.default_rng(5)
    mib = 1 << 20
    state = {
        "a": _at_phase(rng.random(10 * mib // 4, dtype=np.float32), 64),  # the heaviest phase: the file's
        "b": _at_phase(rng.random(6 * mib // 4, dtype=np.float32), 128),
        "odd": _at_phase(rng.random(999, dtype=np.float32), 64),
        "c": _at_phase(rng.random(2 * mib // 4, dtype=np.float32), 128),  # b and c: 8 MiB at 128
        "d": _at_phase(rng.random(mib // 4, dtype=np.float32), 256),
        "__padding__/x": _at_phase(rng.random(mib // 4, dtype=np.float32), 512),  # a name padding avoids
    }
    _, arrays = tree.flatten(state)
    names = [[arrays[i].path[-1] for i in plan.indices] for plan in tensorio.plan_files(arrays, "x", 1 << 30)]
    assert names == [["a", "b", "c", "d", "__padding__/x", "odd"]]  # where there are no direct writes
    plans = tensorio.plan_files(arrays, "x", 1 << 30, by_phase=True)
    assert [[arrays[i].path[-1] for i in plan.indices] for plan in plans] == [names[0]]
    assert [plan.padded for plan in plans] == [True]
    staged: list[int] = []
    real = tensorio._DirectSink._put

    def put(self: Any, *views: memoryview) -> None:
        staged.extend(len(v) for v in views if len(v) and _address(v) == _address(self.stage))
        real(self, *views)

    monkeypatch.setattr(tensorio._DirectSink, "_put", put)
    store = ckptstore.CheckpointStore(tmp_path)
    _save(store, 1, state, "in place")
    (path,) = _files(tmp_path, 1)
    assert _data_start(path) % A == 64
    assert sorted(_padding(path).values()) == [64, 128, 256]  # before b, d and x
    # Copied, and nothing else: the header and a's head, the page at each of the four seams between large
    # tensors (padding or none), x's last 512 bytes and the odd one.
    assert sum(staged) == _data_start(path) + (A - 64) + 4 * A + 512 + state["odd"].nbytes
    assert _equal(store.restore(1, verify=True), state)
    assert store.verify(1) == [1]
    assert _equal(_tensors(path), state)
    # An object store gets one file without padding (no direct writes there).
    remote = ckptstore.CheckpointStore("memory://by-phase")
    remote.save(1, state)
    assert len(ckptstore.load.read_manifest(remote.storage, "step_00000001").files) == 1
    assert _equal(remote.restore(1, verify=True), state)
    # A blocking save stages its bytes: no padding either.
    store.save(2, state)
    (path,) = _files(tmp_path, 2)
    assert _padding(path) == {} and _equal(_tensors(path), state)


def test_snapshot_buffers_put_large_arrays_on_pages() -> None:
    offsets, total = asyncsave._offsets([100, 1 << 20, 3, 70_000, 5, 64])
    assert offsets[1] % A == 0 and offsets[3] % A == 0  # large: on a page
    assert offsets[2] % 64 == 0 and offsets[4] % 64 == 0 and offsets[5] % 64 == 0  # small: on a cache line
    assert offsets == sorted(offsets) and total == offsets[-1] + 64
    assert all(offsets[k] + n <= offsets[k + 1] for k, n in enumerate([100, 1 << 20, 3, 70_000, 5]))


def test_a_filesystem_without_direct_io_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoDirect:  # fcntl as on a filesystem that refuses O_DIRECT (F_SETFL fails with EINVAL)
        F_GETFL, F_SETFL = fcntl.F_GETFL, fcntl.F_SETFL

        @staticmethod
        def fcntl(fd: int, cmd: int, arg: int = 0) -> int:
            if cmd == _real_fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return int(_real_fcntl.fcntl(fd, cmd, arg))

    monkeypatch.setattr(tensorio, "_fcntl", NoDirect)
    state = _state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    assert _data_start(_files(tmp_path, 1)[0]) % A != 0  # no padding: the plain writer's file
    assert _equal(store.restore(1, verify=True), state)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["einval", "short"])
def test_a_direct_write_refused_or_cut_short_goes_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, mode: str
) -> None:
    real = os.pwritev
    faults = [0]

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        if direct and sum(map(len, buffers)) > 2 * A and not faults[0]:
            faults[0] += 1
            if fault == "einval":  # a device whose blocks are larger than A: nothing written
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, _first_bytes(buffers, A + 100), offset)  # as a filesystem may: part of it
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    state = _state()
    store = ckptstore.CheckpointStore(tmp_path)
    _save(store, 1, state, mode)
    store.save(2, state)
    assert faults[0] == 1  # in the first save; the second wrote directly again
    assert _equal(store.restore(1, verify=True), state)
    assert _equal(store.restore(2, verify=True), state)


@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_during_a_direct_write_fails_the_save_and_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    state = _state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    real = os.pwritev
    left_direct: list[int] = []

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        if offset >= 2 << 20:
            left_direct.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    real_close = tensorio._DirectSink.close

    def close(self: Any) -> None:
        real_close(self)
        assert not fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT  # the descriptor is left as it was

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(tensorio._DirectSink, "close", close)
    with pytest.raises(StorageError, match="No space left") as info:
        _save(store, 2, state, mode)
    assert "tensors-" in str(info.value)  # names the file
    assert left_direct
    monkeypatch.undo()
    assert store.steps() == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)], "a temp directory was left"
    assert _equal(store.restore(1, verify=True), state)
    store.save(2, state)  # the disk has room again
    assert _equal(store.restore(2, verify=True), state)


def test_small_files_and_other_writers_keep_the_plain_path(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    small = {"a": np.arange(1000, dtype=np.float32)}  # under DIRECT_MIN_BYTES
    store.save(1, small)
    assert _data_start(_files(tmp_path, 1)[0]) % A != 0
    with open(tmp_path / "f", "wb") as raw:
        wrapped = type("Wrapped", (), {"write": raw.write, "fileno": raw.fileno, "tell": raw.tell})()
        assert tensorio._DirectSink.open(wrapped) is None  # type: ignore[arg-type]
        assert tensorio._DirectSink.open(raw) is not None


def test_verify_accepts_padding_only_as_ckptstore_writes_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    state = {
        "a": _at_phase(rng.random(1 << 18, dtype=np.float32), 64),
        "b": _at_phase(rng.random(1 << 18, dtype=np.float32), 128),
    }
    store = ckptstore.CheckpointStore(tmp_path)
    _save(store, 1, state, "in place")
    (path,) = _files(tmp_path, 1)
    assert list(_padding(path).values()) == [64]
    assert store.verify(1) == [1]
    original = path.read_bytes()
    size = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8 : 8 + size])
    (pad,) = _padding(path)

    def damaged(change: Any) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        text = json.dumps(h, separators=(",", ":")).encode()
        assert len(text) <= size
        path.write_bytes(original[:8] + text + b" " * (size - len(text)) + original[8 + size :])

    for change, says in [
        (lambda h: h[pad].update(dtype="I8"), "padding"),  # not what ckptstore writes
        (lambda h: h["__metadata__"].pop("padding"), "list different tensors"),  # unnamed: a stray tensor
        (
            lambda h: h[pad].update(
                shape=[32], data_offsets=[h[pad]["data_offsets"][0], h[pad]["data_offsets"][0] + 32]
            ),
            "gap",
        ),
    ]:
        damaged(change)
        with pytest.raises(ckptstore.errors.CorruptCheckpointError, match=says):
            store.verify(1)
    path.write_bytes(original)
    assert store.verify(1) == [1]
