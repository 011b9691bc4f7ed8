"""The fast paths of the write and read loops give exactly what the plain paths gave."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import pytest

import ckptstore
from ckptstore import manifest, tensorio, tree


def _mixed_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    state: dict[str, np.ndarray] = {}
    for i in range(300):
        kind = i % 5
        if kind == 0:
            state[f"b{i}"] = rng.random(2 * i + 1) > 0.5  # odd byte counts: the next tensor is unaligned
        elif kind == 1:
            state[f"i8_{i}"] = rng.integers(-100, 100, 3 * i + 1, dtype=np.int8)
        elif kind == 2:
            state[f"f64_{i}"] = rng.random((i % 7, 3))
        elif kind == 3:
            state[f"bf16_{i}"] = rng.random(i + 1).astype(ml_dtypes.bfloat16)
        else:
            state[f"f32_{i}"] = rng.random((2, i + 1), dtype=np.float32)
    state["large"] = rng.random(600_000)  # above the small-tensor size: read into its own array
    state["after_large"] = np.arange(5, dtype=np.int16)
    state["scalar"] = np.array(7.5, dtype=np.float32)
    state["transposed"] = np.arange(12, dtype=np.int32).reshape(3, 4).T  # written through the chunked path
    return state


@pytest.mark.parametrize("block_bytes", [tensorio.BLOCK_BYTES, 1000])
@pytest.mark.parametrize("verify", [False, True])
def test_small_tensors_round_trip_bit_exact_and_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int, verify: bool
) -> None:
    monkeypatch.setattr(tensorio, "BLOCK_BYTES", block_bytes)  # many blocks, and blocks of one tensor
    state = _mixed_state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    out = store.restore(1, verify=verify)
    assert out.keys() == state.keys()
    for k, v in state.items():
        got = out[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert got.tobytes() == np.ascontiguousarray(v).tobytes(), k
        assert got.ctypes.data % got.dtype.alignment == 0, k


def test_restoring_some_tensors_reads_only_those(tmp_path: Path) -> None:
    from ckptstore import load
    from ckptstore.storage import step_name

    state = _mixed_state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    m = load.read_manifest(store.storage, step_name(1))
    picked = [3, 4, 10, 200, len(m.tensors) - 1]  # adjacent and far apart
    got = load.load_tensors(store.storage, step_name(1), m, picked, verify=True)
    assert sorted(got) == picked
    names = list(state)
    for i in picked:
        assert got[i].tobytes() == np.ascontiguousarray(state[names[i]]).tobytes()


def test_header_text_is_what_json_dumps_gives() -> None:
    arrays = [
        tree.ArrayLeaf(("a", 'qu"ote\\é\n'), np.zeros((2, 3), np.float32), "F32"),
        tree.ArrayLeaf((0, "x"), np.zeros((), np.int64), "I64"),
        tree.ArrayLeaf(("empty",), np.zeros((0, 5)), "F64"),
    ]
    names = tensorio.tensor_names(arrays)
    entries: dict[str, object] = {"__metadata__": {"writer": "ckptstore"}}
    pos = 0
    for name, leaf in zip(names, arrays):
        n = leaf.array.nbytes
        entries[name] = {"dtype": leaf.dtype, "shape": list(leaf.array.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    assert tensorio._header(arrays, names, [0, 1, 2])[8:] == raw


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_tensor_reference_codec_matches_msgpack(n: int) -> None:
    packed = msgpack.packb(n)
    assert manifest._uint(n) == packed
    assert manifest._read_uint(packed) == n


@pytest.mark.parametrize("payload", [b"", b"\xcc", b"\xd0\x05", b"\xcd\x01", b"\xff"])
def test_tensor_reference_fast_decoder_leaves_odd_payloads_to_msgpack(payload: bytes) -> None:
    assert manifest._read_uint(payload) is None


def _large_state() -> dict[str, np.ndarray]:
    """Tensors above OVERLAP_BYTES and SMALL_TENSOR_BYTES (hashed on the helper thread on save and on
    restore), contiguous and not, with small ones between them."""
    rng = np.random.default_rng(5)
    return {
        "a": rng.random(300_000),  # 2.4 MB
        "tiny": np.arange(3, dtype=np.int8),
        "b": rng.random((700, 500)).T,  # non-contiguous, 2.8 MB
        "c": rng.integers(0, 1 << 30, 400_000, dtype=np.int64),
        "d": rng.random(300_000, dtype=np.float32),  # 1.2 MB
    }


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 1 << 19])
def test_large_tensors_checksums_are_those_of_their_bytes(tmp_path: Path, chunk_bytes: int) -> None:
    import xxhash
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from ckptstore import knobs, load
    from ckptstore.storage import step_name

    state = _large_state()
    assert min(state[k].nbytes for k in "abcd") >= max(tensorio.OVERLAP_BYTES, tensorio.SMALL_TENSOR_BYTES)
    store = ckptstore.CheckpointStore(tmp_path)
    with knobs.override(chunk_bytes=chunk_bytes):  # 512 KiB: several pieces a tensor, each hashed while written
        store.save(1, state)
    m = load.read_manifest(store.storage, step_name(1))
    for t in m.tensors:
        expected = np.ascontiguousarray(state[t.name])
        assert t.xxh3 == xxhash.xxh3_64_intdigest(expected.tobytes()), t.name
    (path,) = tmp_path.glob("step_*/*.safetensors")
    with safe_open(str(path), "np") as f:
        padding = (f.metadata() or {}).get("padding")  # zeros that put a tensor at its page offset (format.md)
    got = load_file(str(path))
    assert {k for k in got if not (padding and k.startswith(padding))} == set(state)
    for k, v in got.items():
        assert v.tobytes() == (bytes(v.nbytes) if k not in state else np.ascontiguousarray(state[k]).tobytes())


@pytest.mark.parametrize("victim", ["a", "c", "d"])  # the first, a middle and the last large tensor
def test_corrupt_large_tensor_is_caught_by_the_overlapped_check(tmp_path: Path, victim: str) -> None:
    from ckptstore import load
    from ckptstore.errors import CorruptCheckpointError
    from ckptstore.storage import step_name

    state = _large_state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    m = load.read_manifest(store.storage, step_name(1))
    entry = next(t for t in m.tensors if t.name == victim)
    (path,) = tmp_path.glob("step_*/*.safetensors")
    with open(path, "r+b") as f:  # flip one byte in the middle of the victim
        f.seek(entry.offset + entry.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=repr(victim)):
        store.restore(1)
    out = store.restore(1, verify=False)  # unchecked, the bytes as they are on disk
    assert out[victim].tobytes() != np.ascontiguousarray(state[victim]).tobytes()
    assert all(out[k].tobytes() == np.ascontiguousarray(state[k]).tobytes() for k in state if k != victim)


class _FailingFile:
    """A file whose n-th write fails with ENOSPC (the helper thread may be hashing the same piece)."""

    def __init__(self, fail_at: int) -> None:
        self.writes = 0
        self.fail_at = fail_at

    def write(self, data: object) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        return len(memoryview(data))  # type: ignore[arg-type]

    def fileno(self) -> int:
        raise OSError("not a real file")


@pytest.mark.parametrize("fail_at", [2, 4, 6])
def test_write_failure_while_hashing_on_the_helper_thread_propagates(fail_at: int) -> None:
    import threading

    _, arrays = tree.flatten(_large_state())
    names = tensorio.tensor_names(arrays)
    plan = tensorio.FilePlan("x.safetensors", tuple(range(len(arrays))))
    f = _FailingFile(fail_at)
    with pytest.raises(OSError, match="No space left"):
        tensorio.write_file(f, arrays, names, plan, 0)  # type: ignore[arg-type]
    assert f.writes == fail_at
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptstore-hash")]  # none left behind


@pytest.mark.parametrize("hugepages", [False, True])
def test_large_restored_arrays_are_private_writable_memory(tmp_path: Path, hugepages: bool) -> None:
    import os

    from ckptstore import knobs

    state = _large_state()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    with knobs.override(hugepages=hugepages):
        out = store.restore(1)
    a = out["a"]
    assert a.nbytes >= tensorio.MAPPED_BUFFER_BYTES and a.flags.writeable
    assert a.ctypes.data % 4096 == 0  # a mapping of its own
    a[:] = -1.0  # writing changes this array only: not the file, not another restore
    assert store.restore(1)["a"].tobytes() == state["a"].tobytes()
    if os.path.exists("/proc/self/maps"):  # private memory, not shared (shmem would be shared across fork)
        addr = a.ctypes.data
        with open("/proc/self/maps") as maps:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= addr < hi:
                    assert line.split()[1] == "rw-p", line
                    break
            else:
                raise AssertionError("the array's memory is not in /proc/self/maps")
    del out, a  # the mapping goes with its last view (no error, nothing left to close)


def test_new_buffer_sizes() -> None:
    for n in (0, 1, tensorio.MAPPED_BUFFER_BYTES - 1, tensorio.MAPPED_BUFFER_BYTES, 3 << 20):
        buf = tensorio.new_buffer(n)
        assert buf.dtype == np.uint8 and buf.shape == (n,) and buf.flags.writeable
        buf[:] = 5
        assert int(buf.sum()) == 5 * n


@pytest.mark.parametrize("mmap", [False, True])
def test_restored_and_saved_arrays_are_freed_without_the_garbage_collector(tmp_path: Path, mmap: bool) -> None:
    """Dropping a restored state frees its memory at once, and a save keeps no reference to the caller's
    arrays: no reference cycle (a recursive closure was one) holds them until a collection."""
    import gc
    import weakref

    store = ckptstore.CheckpointStore(tmp_path)
    arr = np.ones(300_000)
    saved = weakref.ref(arr)
    gc.collect()
    gc.disable()
    try:
        store.save(1, {"a": arr, "nested": [{"b": np.arange(10)}], "n": 3})
        del arr
        assert saved() is None
        out = store.restore(1, mmap=mmap)
        restored = [weakref.ref(out["a"]), weakref.ref(out["nested"][0]["b"])]
        del out
        assert [r() for r in restored] == [None, None]
    finally:
        gc.enable()
