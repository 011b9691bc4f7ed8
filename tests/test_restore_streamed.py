"""Tensors that a restore converts or assigns into `like`'s framework objects (Keras variables, Flax NNX
objects, JAX arrays) are read one at a time as the rebuild asks for them and dropped after (load._Tensors,
tree.streamed_indices): the state never lies whole in host memory beside the objects it goes into."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest

import ckptstore
from ckptstore import load, tensorio
from ckptstore.errors import CorruptCheckpointError, CorruptCheckpointWarning
from ckptstore.storage import step_name

keras = pytest.importorskip("keras")


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(64), keras.layers.Dense(32), keras.layers.Dense(4)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.default_rng(seed).random((32, 16)).astype("float32")
    model.fit(x, x[:, :4], epochs=1, batch_size=8, verbose=0)
    return model


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v) for v in model.get_weights()] + [np.array(v.value) for v in model.optimizer.variables]


def test_keras_variables_are_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(0)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": model, "opt": model.optimizer, "epoch": 1})
    target = build(1)
    calls: list[int] = []
    real = tensorio.read_tensors
    monkeypatch.setattr(
        tensorio, "read_tensors", lambda f, items, **kw: calls.append(len(items)) or real(f, items, **kw)
    )
    out = store.restore(like={"model": target, "opt": target.optimizer, "epoch": 0})
    assert out["epoch"] == 1 and out["model"] is target
    for a, b in zip(weights(target), weights(model)):
        np.testing.assert_array_equal(a, b)
    nvars = len(model.variables) + len(model.optimizer.variables)
    assert calls and max(calls) == 1 and len(calls) == nvars  # one tensor per read, each variable once


def test_a_damaged_variable_part_way_says_partly_overwritten_and_fallback_restores_the_older(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    m1, m2 = build(0), build(2)
    store.save(1, {"model": m1})
    store.save(2, {"model": m2})
    man = load.read_manifest(store.storage, step_name(2))
    last = max(man.tensors, key=lambda e: e.offset)  # read after the others: the first ones are in already
    path = Path(store.url, step_name(2), man.files[last.file].name)
    data = bytearray(path.read_bytes())
    data[last.offset] ^= 0xFF
    path.write_bytes(data)
    target = build(3)
    with pytest.raises(CorruptCheckpointError, match=r"checksum.*partly overwritten"):
        store.restore(2, like={"model": target})
    with pytest.warns(CorruptCheckpointWarning, match="restored step 1"):
        store.restore(like={"model": target}, fallback=True)
    for a, b in zip(target.get_weights(), m1.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_numpy_templates_and_no_template_are_read_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    state = {f"a{i}": np.full(10, float(i)) for i in range(20)}
    store.save(1, state)
    calls: list[int] = []
    real = tensorio.read_tensors
    monkeypatch.setattr(
        tensorio, "read_tensors", lambda f, items, **kw: calls.append(len(items)) or real(f, items, **kw)
    )
    got = store.restore(like={k: np.zeros(10) for k in state})
    assert calls == [20]  # one read of the file's tensors together
    assert all(np.array_equal(got[k], v) for k, v in state.items())


class LiveBuffers:
    """The most bytes of fresh host buffers (``tensorio.new_buffer``) alive at once during a restore."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live = self.peak = 0
        real = tensorio.new_buffer

        def new_buffer(n: int) -> np.ndarray:
            buf = real(n)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(buf, self._freed, n)
            return buf

        monkeypatch.setattr(tensorio, "new_buffer", new_buffer)

    def _freed(self, n: int) -> None:
        self.live -= n


def test_a_keras_restore_holds_one_variable_in_host_memory_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ckptstore itself holds: one variable's bytes at a time (the whole state before). The process's
    peak RSS also counts the backend's own temporary copies, which vary with its allocator (measured: 25 to
    62 % of the state, against 99 % before; docs/frameworks.md)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((256,))] + [keras.layers.Dense(256) for _ in range(8)])
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": model})
    nbytes = sum(np.asarray(v.value).nbytes for v in model.variables)
    largest = max(np.asarray(v.value).nbytes for v in model.variables)
    target = keras.Sequential([keras.Input((256,))] + [keras.layers.Dense(256) for _ in range(8)])
    live = LiveBuffers(monkeypatch)
    store.restore(like={"model": target})
    for a, b in zip(model.get_weights(), target.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert 0 < live.peak <= 2 * largest < nbytes / 4, (live.peak, largest, nbytes)
    live.peak = 0
    store.restore()  # without `like`: the state in fresh memory, all of it at once (control)
    assert live.peak >= nbytes
