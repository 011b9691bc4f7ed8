"""Save from one framework, restore into another: every pair of NumPy, PyTorch, JAX and TensorFlow, with
``like=`` a template of the target framework and with ``framework=``; the bits of every value survive
(all 65,536 bfloat16 patterns, all 256 float8 patterns, NaN payloads included)."""

from __future__ import annotations

import importlib
import itertools
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptstore
from tests import fw_helpers  # noqa: F401  (fixes KERAS_BACKEND and quiets TF before the import)

FRAMEWORKS = ["numpy", "torch", "jax", "tf"]


def host_values() -> dict[str, np.ndarray]:
    every16 = np.arange(1 << 16, dtype=np.uint16)
    every8 = np.arange(1 << 8, dtype=np.uint8)
    rng = np.random.default_rng(0)
    nan_payloads = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x00000001], dtype=np.uint32)
    return {
        "bf16": every16.view(ml_dtypes.bfloat16).reshape(256, 256),
        "f16": every16.view(np.float16),
        "f8_e4m3": every8.view(ml_dtypes.float8_e4m3fn),
        "f8_e5m2": every8.view(ml_dtypes.float8_e5m2),
        "f32": np.concatenate([nan_payloads.view(np.float32), rng.standard_normal(12, dtype=np.float32)]),
        "i32": rng.integers(-(1 << 31), 1 << 31, size=(3, 4), dtype=np.int32),
        "u8": every8,
        "bool": rng.integers(0, 2, size=7).astype(bool),
        "scalar": np.array(3.25, dtype=np.float32),
    }


def to_framework(fw: str, host: np.ndarray) -> Any:
    if fw == "numpy":
        return host.copy()
    if fw == "torch":
        return ckptstore.frameworks.adapter_named("torch").from_numpy(host.copy(), None)
    if fw == "jax":
        jnp = importlib.import_module("jax.numpy")
        return jnp.asarray(host)
    tf = importlib.import_module("tensorflow")
    return tf.constant(host)


def to_host(fw: str, x: Any) -> np.ndarray:
    if fw == "torch":
        return ckptstore.frameworks.adapter_named("torch").to_numpy(x, copy=True)
    if fw == "tf":
        return np.asarray(x.numpy())
    return np.asarray(x)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind != "b" else a


def is_of(fw: str, x: Any) -> bool:
    adapter = ckptstore.frameworks.adapter_named(fw)
    return adapter.is_array(x)


PAIRS = list(itertools.permutations(FRAMEWORKS, 2))


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_save_from_one_restore_into_another(tmp_path: Any, src: str, dst: str) -> None:
    host = host_values()
    ckptstore.save(tmp_path / "c", {k: to_framework(src, v) for k, v in host.items()})
    like = {k: to_framework(dst, np.zeros_like(v)) for k, v in host.items()}

    for out in (
        ckptstore.restore(tmp_path / "c", like=like),
        ckptstore.restore(tmp_path / "c", framework=dst),
    ):
        for k, expected in host.items():
            assert is_of(dst, out[k]), (k, type(out[k]))
            got = to_host(dst, out[k])
            assert got.dtype == expected.dtype and got.shape == expected.shape, k
            np.testing.assert_array_equal(bits(got), bits(expected), err_msg=k)


def test_torch_module_state_into_jax_and_back(tmp_path: Any) -> None:
    """A torch model restored as a JAX params dict (by ``framework=`` or ``like=``), saved again from JAX
    and loaded back into a fresh torch model (``like=`` the model): identical bfloat16 parameters."""
    torch = importlib.import_module("torch")
    jax = importlib.import_module("jax")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    ckptstore.save(tmp_path / "t", {"model": model})

    params = ckptstore.restore(tmp_path / "t", framework="jax")["model"]
    assert all(isinstance(v, jax.Array) and v.dtype == jax.numpy.bfloat16 for v in params.values())
    template = {k: jax.numpy.zeros(v.shape, jax.numpy.float32) for k, v in params.items()}
    as_f32 = ckptstore.restore(tmp_path / "t", like={"model": template})["model"]  # like's dtype wins
    assert all(v.dtype == jax.numpy.float32 for v in as_f32.values()) and as_f32.keys() == params.keys()
    ckptstore.save(tmp_path / "j", {"model": params})

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    ckptstore.restore(tmp_path / "j", like={"model": fresh})
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
