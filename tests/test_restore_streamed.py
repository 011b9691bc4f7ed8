"""Tensors that a restore converts or assigns into `like`'s framework objects (Keras variables, Flax NNX
objects, JAX arrays) are read one at a time as the rebuild asks for them and dropped after (load._Tensors,
tree.streamed_indices): the state never lies whole in host memory beside the objects it goes into."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras, ckptstore

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    def peak_growth(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        out = fn()
        return status("VmHWM") - before, out

    def model():
        m = keras.Sequential([keras.Input((2048,))] + [keras.layers.Dense(2048) for _ in range(4)])  # 64 MiB
        return m

    keras.utils.set_random_seed(0)
    store = ckptstore.CheckpointStore(sys.argv[1])
    m = model()
    store.save(1, {"model": m})
    nbytes = sum(v.numpy().nbytes for v in m.variables)
    target = model()
    peak_growth(lambda: store.restore(like={"model": target}))  # the backend's first assign allocates its own
    streamed, _ = peak_growth(lambda: store.restore(like={"model": target}))
    assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), target.get_weights()))
    fresh, out = peak_growth(lambda: store.restore())  # without `like`: the state in fresh memory (control)
    print(nbytes, streamed, fresh)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_restore_into_a_keras_model_adds_little_peak_memory(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    nbytes, streamed, fresh = map(int, p.stdout.split()[-3:])
    assert fresh > 0.8 * nbytes  # the measurement sees a restore into fresh memory (control)
    assert streamed < 0.4 * nbytes, f"peak grew {streamed / nbytes:.0%} of the state"
