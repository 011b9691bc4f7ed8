"""Background saves of JAX arrays on the CPU: no snapshot copy (JAX arrays are immutable, and JAX does not
donate a buffer that a NumPy view holds), so a training step that donates its state while the save is in
flight changes nothing saved; an array deleted under the save fails it, and nothing is committed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckptstore
from ckptstore import tensorio
from ckptstore.errors import ArrayDeletedError
from ckptstore.storage import TMP_PREFIX


def _state() -> dict[str, Any]:
    key = jax.random.key(0)
    return {
        "w": jax.random.normal(key, (256, 1024)),
        "b": jnp.arange(1000, dtype=jnp.bfloat16),
        "step": jnp.int32(3),
        "host": np.arange(300_000, dtype=np.float32),  # a NumPy array beside them: copied, as before
    }


def _host(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _equal(got: dict[str, Any], expected: dict[str, np.ndarray]) -> bool:
    return got.keys() == expected.keys() and all(
        np.asarray(got[k]).dtype == v.dtype and np.array_equal(np.asarray(got[k]), v) for k, v in expected.items()
    )


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Background writes wait until the test sets this: the test acts while the save is surely in flight."""
    opened = threading.Event()
    real = tensorio.write_file

    def write_file(*args: Any, **kwargs: Any) -> Any:
        assert opened.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorio, "write_file", write_file)
    return opened


def test_jax_arrays_are_saved_in_the_background_without_a_snapshot_copy(tmp_path: Path) -> None:
    state = _state()
    expected = _host(state)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state, blocking=False).result()
    (buffer,) = store._saver._free
    assert buffer.nbytes == state["host"].nbytes  # the NumPy array alone was copied
    assert _equal(store.restore(1, like=state), expected)
    assert _equal(store.restore(1), expected)


def test_a_step_that_donates_the_state_while_it_is_saved_changes_nothing_saved(
    tmp_path: Path, gate: threading.Event
) -> None:
    state = {k: v for k, v in _state().items() if k != "host"}
    expected = _host(state)
    train_step = jax.jit(lambda s: jax.tree.map(lambda x: x * 3 + 1, s), donate_argnums=0)
    store = ckptstore.CheckpointStore(tmp_path)
    handle = store.save(1, state, blocking=False)
    for _ in range(3):  # the training goes on, donating its state to each step
        state = train_step(state)
    gate.set()
    handle.result()
    assert _equal(store.restore(1), expected)
    after = {k: np.asarray(v) for k, v in state.items()}  # and the training's own values are right
    assert np.allclose(after["w"], ((expected["w"] * 3 + 1) * 3 + 1) * 3 + 1, atol=1e-4)
    assert int(after["step"]) == ((3 * 3 + 1) * 3 + 1) * 3 + 1


def test_an_array_deleted_under_a_background_save_fails_it_and_nothing_is_committed(
    tmp_path: Path, gate: threading.Event
) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    first = _state()
    expected = _host(first)
    gate.set()
    store.save(1, first)
    gate.clear()
    state = _state()
    handle = store.save(2, state, blocking=False)
    state["w"].delete()
    gate.set()
    with pytest.raises(ArrayDeletedError, match=r"state\['w'\] was deleted or donated"):
        handle.result()
    assert store.steps() == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert _equal(store.restore(1), expected)
    store.save(2, _state(), blocking=False).result()  # the handle reported it: the next save goes on
    assert store.steps() == [1, 2]
