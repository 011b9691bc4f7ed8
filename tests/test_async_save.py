"""Background saves: snapshot isolation, errors, one save in flight, retention order, exit waits."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import knobs, pipeline
from ckptstore.asyncsave import SaveHandle
from ckptstore.errors import AsyncSaveError, CheckpointExistsError, CkptStoreError, UnsupportedTypeError


class Gate:
    """Holds every checkpoint write until released, so a test decides what happens while a save is in
    flight. The write itself is the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        real = pipeline.save

        def write(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            self.entered.set()
            try:
                assert self.release.wait(30), "test never released the gate"
                return real(*args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        monkeypatch.setattr(pipeline, "save", write)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(monkeypatch)


def test_async_save_returns_handle_and_commits(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    state = {"w": np.arange(1000, dtype=np.float32), "step": 3, "nested": [np.ones((2, 3)), "x"]}
    handle = store.save(3, state, blocking=False, metadata={"loss": 0.5})
    assert isinstance(handle, SaveHandle)
    info = handle.result()
    assert handle.done()
    assert info.step == 3 and info.metadata == {"loss": 0.5}
    assert store.steps() == [3]
    out = store.restore(3)
    np.testing.assert_array_equal(out["w"], state["w"])
    np.testing.assert_array_equal(out["nested"][0], np.ones((2, 3)))
    assert out["step"] == 3 and out["nested"][1] == "x"


def test_snapshot_isolation_numpy_and_torch(tmp_path: Path, gate: Gate) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    a = np.zeros(100_000, dtype=np.float32)
    t = torch.zeros(64, 64, dtype=torch.bfloat16)
    view = np.zeros((50, 40), dtype=np.int64).T  # non-contiguous: staged in C order
    handle = store.save(1, {"a": a, "t": t, "view": view}, blocking=False)
    assert gate.entered.wait(10)
    assert not handle.done()
    a += 1  # the training loop updates in place while the save is in flight
    t.add_(1)
    view[:] = 7
    gate.release.set()
    handle.result()
    out = store.restore(1, like={"a": a, "t": t, "view": view})
    assert not out["a"].any()
    assert out["t"].dtype == torch.bfloat16 and not out["t"].any()
    assert out["view"].shape == (40, 50) and not out["view"].any()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_snapshot_copied_on_several_threads_is_exact_and_isolated(
    tmp_path: Path, gate: Gate, threads: int
) -> None:
    from ckptstore import asyncsave

    rng = np.random.default_rng(0)
    state = {
        "huge": rng.random(9 << 20),  # 72 MiB, one array: cut into 32 MiB pieces shared by the threads
        "t": torch.arange(3 << 20, dtype=torch.float32),  # 12 MiB
        "transposed": rng.random((1500, 900)).T,  # non-contiguous: copied whole, into C order
        "small": np.arange(7, dtype=np.int16),
        "empty": np.zeros((0, 3)),
    }
    assert sum(v.nbytes for v in state.values()) >= asyncsave.PARALLEL_COPY_BYTES
    expected = {k: np.array(v) for k, v in state.items()}
    store = ckptstore.CheckpointStore(tmp_path)
    with knobs.override(snapshot_threads=threads):
        handle = store.save(1, state, blocking=False)
    assert gate.entered.wait(10)
    state["huge"][:] = -1  # in place, while the save is in flight
    state["t"].fill_(-1)
    state["transposed"][:] = -1
    gate.release.set()
    handle.result()
    out = store.restore(1)
    for k, v in expected.items():
        got = out[k].numpy() if isinstance(out[k], torch.Tensor) else out[k]
        assert got.shape == v.shape and got.tobytes() == np.ascontiguousarray(v).tobytes(), k
    store.close()


def test_snapshot_buffer_reuse_keeps_each_save_intact(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    x = np.zeros(10_000, dtype=np.float32)
    y = torch.zeros(3, 5, dtype=torch.float64)
    for step in range(4):
        x[:] = step
        y.fill_(step * 10)
        store.save(step, {"x": x, "y": y, "empty": np.zeros((0, 4)), "s": np.float32(step)}, blocking=False)
    store.wait_until_finished()
    for step in range(4):
        out = store.restore(step)
        assert (out["x"] == step).all() and (out["y"] == step * 10).all()
        assert out["empty"].shape == (0, 4) and out["s"] == step
    store.close()


def test_at_most_one_save_in_flight(tmp_path: Path, gate: Gate) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    first = store.save(1, {"a": np.ones(10)}, blocking=False)
    assert gate.entered.wait(10)
    returned = threading.Event()

    def second() -> None:
        store.save(2, {"a": np.ones(10)}, blocking=False)
        returned.set()

    th = threading.Thread(target=second)
    th.start()
    # While the first save is held, the second has no slot: it does not even take its snapshot.
    assert not returned.wait(0.5)
    assert len(store._saver.in_flight()) == 1
    gate.release.set()
    first.result()
    th.join(10)
    assert returned.is_set()
    store.wait_until_finished()
    assert gate.max_active == 1
    assert store.steps() == [1, 2]


def test_in_flight_limit_is_a_knob(tmp_path: Path, gate: Gate) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    with knobs.override(async_max_in_flight=2):
        h1 = store.save(1, {"a": np.ones(10)}, blocking=False)
        h2 = store.save(2, {"a": np.ones(10)}, blocking=False)  # a second slot: returns at once
        assert not h1.done() and not h2.done()
        gate.release.set()
        store.wait_until_finished()
    assert gate.max_active == 2
    assert store.steps() == [1, 2]


def test_blocking_save_waits_for_the_one_in_flight(tmp_path: Path, gate: Gate) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    h = store.save(1, {"a": np.ones(3)}, blocking=False)
    assert gate.entered.wait(10)
    threading.Timer(0.2, gate.release.set).start()
    store.save(2, {"a": np.ones(3)})  # blocks until step 1 is committed, then commits step 2
    assert h.done() and store.steps() == [1, 2]


def test_retention_runs_after_the_save_it_depends_on(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path, max_to_keep=2)
    for step in range(1, 6):
        store.save(step, {"a": np.full(100, step)}, blocking=False)
    store.wait_until_finished()
    assert store.steps() == [4, 5]
    assert (store.restore()["a"] == 5).all()


def test_synchronous_errors_raise_from_save(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    with pytest.raises(UnsupportedTypeError, match=r"state\['bad'\]"):
        store.save(1, {"bad": object()}, blocking=False)
    store.save(1, {"a": np.ones(2)})
    with pytest.raises(CheckpointExistsError):
        store.save(1, {"a": np.ones(2)}, blocking=False)
    with pytest.raises(CkptStoreError, match="step must be"):
        store.save(-1, {}, blocking=False)
    # None of these took a slot for good: a further async save goes through.
    store.save(2, {"a": np.ones(2)}, blocking=False).result()
    assert store.steps() == [1, 2]


def _fail_in_background(store: ckptstore.CheckpointStore, root: Path, gate: Gate) -> SaveHandle[Any]:
    """Start a save whose real write fails: while the save is held, a plain file takes the root's place."""
    handle = store.save(7, {"a": np.ones(1000)}, blocking=False)
    assert gate.entered.wait(10)
    shutil.rmtree(root, ignore_errors=True)
    root.write_bytes(b"not a directory")
    gate.release.set()
    deadline = time.monotonic() + 10
    while not handle.done():  # done() reports nothing: the store still owes the error to its caller
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return handle


def test_background_error_surfaces_on_handle(tmp_path: Path, gate: Gate) -> None:
    root = tmp_path / "store"
    store = ckptstore.CheckpointStore(root)
    handle = _fail_in_background(store, root, gate)
    with pytest.raises(OSError):
        handle.result()
    # Reported through the handle: the store does not raise it a second time.
    store.wait_until_finished()
    root.unlink()
    store.save(8, {"a": np.ones(2)})
    assert store.steps() == [8]


def test_background_error_surfaces_on_next_save(tmp_path: Path, gate: Gate) -> None:
    root = tmp_path / "store"
    store = ckptstore.CheckpointStore(root)
    _fail_in_background(store, root, gate)
    root.unlink()
    with pytest.raises(AsyncSaveError, match="step 7") as exc:
        store.save(8, {"a": np.ones(2)}, blocking=False)
    assert isinstance(exc.value.__cause__, OSError)
    assert store.steps() == []  # the failing save committed nothing; the next one did not start
    store.save(8, {"a": np.ones(2)}, blocking=False).result()  # raised once, then the store goes on
    assert store.steps() == [8]


def test_background_error_surfaces_on_blocking_save_and_close(tmp_path: Path, gate: Gate) -> None:
    root = tmp_path / "store"
    store = ckptstore.CheckpointStore(root)
    _fail_in_background(store, root, gate)
    with pytest.raises(AsyncSaveError):
        store.close()
    store.close()  # reported already

    gate.entered.clear()
    gate.release.clear()
    root.unlink()
    store2 = ckptstore.CheckpointStore(root)
    _fail_in_background(store2, root, gate)
    root.unlink()
    with pytest.raises(AsyncSaveError):
        store2.save(9, {"a": np.ones(2)})
    with ckptstore.CheckpointStore(root) as store3:
        store3.save(9, {"a": np.ones(2)}, blocking=False)
    assert store3.steps() == [9]  # leaving the with block waited for the save


@pytest.mark.parametrize("how", ["return", "sys.exit", "exception"])
def test_interpreter_exit_waits_for_the_save(tmp_path: Path, how: str) -> None:
    root = tmp_path / "store"
    ending = {"return": "", "sys.exit": "sys.exit(0)", "exception": "raise RuntimeError('training crashed')"}[how]
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        import ckptstore
        from ckptstore import pipeline

        real = pipeline.save
        def slow_write(*args, **kwargs):
            time.sleep(1.0)  # still in flight when the main thread ends
            return real(*args, **kwargs)
        pipeline.save = slow_write

        def main():
            store = ckptstore.CheckpointStore({str(root)!r})
            handle = store.save(5, {{"w": np.arange(1 << 20, dtype=np.float32)}}, blocking=False)
            assert not handle.done()
            {ending}

        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == (how != "exception"), proc.stderr
    store = ckptstore.CheckpointStore(root)
    assert store.steps() == [5]
    np.testing.assert_array_equal(store.restore()["w"], np.arange(1 << 20, dtype=np.float32))
