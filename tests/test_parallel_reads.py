"""Local restores read a file with several threads, each a piece at a time with one positional read
(tensorio.read_parallel): large tensors in several pieces, runs of small ones gathered into one scatter
read, checksums checked as each tensor's last piece lands, the first failure raised."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs, tensorio
from ckptstore.errors import CorruptCheckpointError
from ckptstore.manifest import TensorEntry
from ckptstore.storage import MAX_READ_BUFFERS

torch = pytest.importorskip("torch")


def entry(name: str, offset: int, nbytes: int) -> TensorEntry:
    return TensorEntry(name=name, file=0, offset=offset, nbytes=nbytes, dtype="U8", shape=(nbytes,), xxh3=0)


def test_pieces_cut_large_tensors_and_gather_small_adjacent_ones() -> None:
    items = [
        (entry("big", 0, 10_000), np.empty(10_000, np.uint8)),  # 3 pieces of 4096 at most
        (entry("a", 10_000, 10), np.empty(10, np.uint8)),  # joins the big one's last piece
        (entry("b", 10_010, 20), np.empty(20, np.uint8)),
        (entry("gap", 20_000, 5), np.empty(5, np.uint8)),  # not adjacent: a piece of its own
    ]
    pieces, count = tensorio._pieces(items, 4096)
    assert [(p.offset, p.nbytes) for p in pieces] == [(0, 4096), (4096, 4096), (8192, 1838), (20_000, 5)]
    assert [p.tensors for p in pieces] == [[0], [0], [0, 1, 2], [3]]
    assert count == [3, 1, 1, 1]
    assert sum(len(v) for p in pieces for v in p.views) == 10_035


def test_pieces_hold_at_most_max_read_buffers() -> None:
    n = MAX_READ_BUFFERS * 2 + 5
    items = [(entry(f"t{i}", 4 * i, 4), np.empty(4, np.uint8)) for i in range(n)]
    pieces, _ = tensorio._pieces(items, 1 << 20)
    assert [len(p.views) for p in pieces] == [MAX_READ_BUFFERS, MAX_READ_BUFFERS, 5]


@pytest.fixture
def preadv_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Every os.preadv call: the calling thread and the buffers it filled."""
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd: int, buffers: Any, offset: int) -> int:
        calls.append((threading.get_ident(), len(buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    yield calls


def model_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))}


def test_restore_in_place_with_small_pieces_gives_the_bytes(
    tmp_path: Path, preadv_calls: list[tuple[int, int]]
) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    saved = model_state()
    store.save(1, saved)
    fresh = {"model": torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))}
    with knobs.override(chunk_bytes=64 << 10, read_threads=1):
        store.restore(like=fresh, verify=True)
    for a, b in zip(saved["model"].state_dict().values(), fresh["model"].state_dict().values()):
        assert torch.equal(a, b)
    # 1 MiB of weights in 64 KiB pieces: 16 or more, all read by the caller's thread.
    assert len(preadv_calls) >= 16
    assert {thread for thread, _ in preadv_calls} == {threading.get_ident()}


def test_pieces_are_read_by_several_threads_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    saved = model_state()
    store.save(1, saved)
    fresh = {"model": torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))}
    # The first read waits (10 s at most) for another thread to start a read: it passes only if two
    # reads are in flight at once.
    together = threading.Barrier(2, timeout=10)
    first = threading.Lock()
    real = os.preadv

    def meet(fd: int, buffers: Any, offset: int) -> int:
        if first.acquire(blocking=False) or together.n_waiting:
            together.wait()
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", meet)
    with knobs.override(chunk_bytes=64 << 10, read_threads=4):
        store.restore(like=fresh, verify=True)
    assert together.broken is False
    for a, b in zip(saved["model"].state_dict().values(), fresh["model"].state_dict().values()):
        assert torch.equal(a, b)


def test_eager_restore_with_small_pieces_gives_the_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {
        "big": rng.random((300, 700)),
        "small": [rng.random(k) for k in (1, 3, 7, 100)],
        "odd": np.arange(3, dtype=np.int8),
    }
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state)
    with knobs.override(chunk_bytes=4096, read_threads=3):
        got = store.restore(verify=True)
    np.testing.assert_array_equal(got["big"], state["big"])
    for a, b in zip(got["small"], state["small"]):
        np.testing.assert_array_equal(a, b)
        assert a.ctypes.data % a.dtype.alignment == 0  # views of a block are aligned (copied if not)
    np.testing.assert_array_equal(got["odd"], state["odd"])


def test_many_small_tensors_are_read_a_thousand_per_call(tmp_path: Path, preadv_calls: list[tuple[int, int]]) -> None:
    n = 5000
    store = ckptstore.CheckpointStore(tmp_path)
    params = {f"p{i}": torch.nn.Parameter(torch.full((3,), float(i))) for i in range(n)}
    store.save(1, {"model": torch.nn.ParameterDict(params)})
    like = {"model": torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(3)) for k in params})}
    store.restore(like=like, verify=True)  # in place: each tensor's bytes land in its own parameter
    assert all(float(like["model"][f"p{i}"][0].detach()) == i for i in (0, 1, n // 2, n - 1))
    assert sum(k for _, k in preadv_calls) == n
    assert len(preadv_calls) <= -(-n // MAX_READ_BUFFERS) + 1


def corrupt(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def tensor_file(store: ckptstore.CheckpointStore, step: int) -> Path:
    (path,) = (Path(store.url) / f"step_{step:08d}").glob("*.safetensors")
    return path


@pytest.mark.parametrize("threads", [1, 4])
def test_a_checksum_failure_in_one_piece_is_raised_naming_the_tensor(threads: int, tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    state = {"a": np.ones(50_000), "b": np.full(50_000, 2.0), "c": np.full(50_000, 3.0)}
    store.save(1, state)
    size = tensor_file(store, 1).stat().st_size
    corrupt(tensor_file(store, 1), size - 800_000 + 123)  # inside "b", the last but one (400,000 bytes each)
    with (
        knobs.override(chunk_bytes=32 << 10, read_threads=threads),
        pytest.raises(CorruptCheckpointError, match=r"'b' fails its checksum"),
    ):
        store.restore(verify=True)


def test_a_truncated_file_names_the_tensor_and_the_bytes_there(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"a": np.ones(1000, np.uint8), "b": np.ones(1000, np.uint8)})
    path = tensor_file(store, 1)
    m = store.storage  # the file's size is checked against the manifest first: read the tensors directly
    f = m.open_read(f"step_00000001/{path.name}")
    try:
        size = path.stat().st_size
        items = [
            (entry("a", size - 2000, 1000), np.empty(1000, np.uint8)),
            (entry("b", size - 1000, 1000), np.empty(1000, np.uint8)),
        ]
        os.truncate(path, size - 300)
        with (
            knobs.override(chunk_bytes=256, read_threads=4),
            pytest.raises(CorruptCheckpointError, match=r"'b' is truncated \(700 of 1000 bytes\)"),
        ):
            tensorio.read_parallel(f, items, verify=False, source="f")
    finally:
        f.close()


def test_run_threads_raises_the_earliest_jobs_failure_and_stops_taking_jobs() -> None:
    done: list[int] = []

    def work(i: int) -> None:
        if i == 3:
            time.sleep(0.05)  # job 7 fails first in time; job 3's failure is the one raised
            raise ValueError("job 3")
        if i == 7:
            raise ValueError("job 7")
        done.append(i)

    with pytest.raises(ValueError, match="job 3"):
        tensorio.run_threads(work, list(range(1000)), 1)
    assert done == [0, 1, 2]
    for _ in range(5):
        done.clear()
        with pytest.raises(ValueError, match="job 3"):
            tensorio.run_threads(work, list(range(1000)), 4)
        assert len(done) < 100  # the threads stopped taking jobs
