"""JAX adapter: arrays of every dtype, pytrees (NamedTuples, registered nodes), optax states, PRNG keys,
placement on like's device."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import ckptstore
from ckptstore.errors import StructureMismatchError, UnsupportedTypeError
from tests.fw_helpers import run_python


def roundtrip(tmp_path: Any, state: Any, **kw: Any) -> Any:
    ckptstore.save(tmp_path / "ckpt", state, overwrite=True)
    return ckptstore.restore(tmp_path / "ckpt", **kw)


def bits(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind != "b" else a


DTYPES = [
    jnp.float32,
    jnp.float16,
    jnp.bfloat16,
    jnp.float8_e4m3fn,
    jnp.float8_e5m2,
    jnp.int8,
    jnp.uint8,
    jnp.int16,
    jnp.int32,
    jnp.uint32,
    jnp.bool_,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_array_roundtrip_keeps_dtype_bits_and_placement(tmp_path: Any, dtype: Any) -> None:
    dt = np.dtype(dtype)
    raw = np.frombuffer(np.random.default_rng(0).bytes(15 * dt.itemsize), dtype=np.uint8)
    host = (raw[:15] > 127 if dt.kind == "b" else raw.view(dt)).reshape(3, 5)  # every bit pattern, NaNs too
    x = jnp.asarray(host)
    like = jnp.zeros_like(x)
    out = roundtrip(tmp_path, {"x": x}, like={"x": like})["x"]
    assert isinstance(out, jax.Array)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.sharding == like.sharding
    np.testing.assert_array_equal(bits(out), bits(x))


def test_without_like_arrays_come_back_as_numpy_or_as_framework_jax(tmp_path: Any) -> None:
    x = jnp.arange(4, dtype=jnp.bfloat16)
    ckptstore.save(tmp_path / "c", {"x": x})
    plain = ckptstore.restore(tmp_path / "c")["x"]
    assert type(plain) is np.ndarray and plain.dtype == np.dtype(ml_dtypes.bfloat16)
    as_jax = ckptstore.restore(tmp_path / "c", framework="jax")["x"]
    assert isinstance(as_jax, jax.Array) and as_jax.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bits(as_jax), bits(x))


def test_optax_adam_state_count_and_structure_roundtrip(tmp_path: Any) -> None:
    params = {"w": jnp.ones((2, 3)), "b": [jnp.zeros(3), (jnp.ones(()), jnp.arange(2.0, dtype=jnp.bfloat16))]}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    state = opt.init(params)
    for _ in range(3):
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    like = {"params": jax.tree_util.tree_map(jnp.zeros_like, params), "opt": opt.init(params)}
    out = roundtrip(tmp_path, {"params": params, "opt": state}, like=like)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure({"params": params, "opt": state})
    adam = out["opt"][1][0]
    assert type(adam) is type(state[1][0])  # ScaleByAdamState, not a dict
    assert isinstance(adam.count, jax.Array) and adam.count.dtype == jnp.int32 and int(adam.count) == 3
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves({"params": params, "opt": state})):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: Any
    name: str = "run"  # static: comes from like


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "step"], meta_fields=["name"])


class Pair:
    """A node registered without field names: its children are saved as a list."""

    def __init__(self, left: Any, right: Any, tag: str) -> None:
        self.left, self.right, self.tag = left, right, tag


jax.tree_util.register_pytree_node(Pair, lambda p: ((p.left, p.right), p.tag), lambda tag, ch: Pair(*ch, tag))


def test_registered_pytree_nodes_rebuilt_with_like(tmp_path: Any) -> None:
    opt = optax.sgd(0.1, momentum=0.9)
    params = {"w": jnp.arange(3.0)}
    state = TrainState(params, opt.init(params), jnp.asarray(7), "saved")
    tree = {"ts": state, "pair": Pair(jnp.ones(2, jnp.bfloat16), Pair(jnp.zeros(1), None, "inner"), "outer")}

    ckptstore.save(tmp_path / "c", tree)
    plain = ckptstore.restore(tmp_path / "c")
    assert set(plain["ts"]) == {"params", "opt_state", "step"}  # named children: a dict
    assert isinstance(plain["pair"], list) and len(plain["pair"]) == 2  # unnamed: a list

    like = {
        "ts": TrainState({"w": jnp.zeros(3)}, opt.init(params), jnp.asarray(0), "like"),
        "pair": Pair(jnp.zeros(2, jnp.bfloat16), Pair(jnp.ones(1), None, "inner-like"), "outer-like"),
    }
    out = ckptstore.restore(tmp_path / "c", like=like)
    assert isinstance(out["ts"], TrainState) and out["ts"].name == "like"
    assert int(out["ts"].step) == 7
    np.testing.assert_array_equal(out["ts"].params["w"], np.arange(3.0))
    assert jax.tree_util.tree_structure(out["ts"]) == jax.tree_util.tree_structure(like["ts"])
    assert isinstance(out["pair"], Pair) and out["pair"].tag == "outer-like"
    assert isinstance(out["pair"].right, Pair) and out["pair"].right.right is None
    np.testing.assert_array_equal(np.asarray(out["pair"].left, np.float32), np.ones(2))


def test_pytree_node_that_does_not_fit_like_names_the_path(tmp_path: Any) -> None:
    ckptstore.save(tmp_path / "c", {"p": Pair(jnp.ones(2), jnp.ones(2), "t")})
    other = TrainState({"w": jnp.zeros(3)}, (), jnp.asarray(0))
    with pytest.raises(StructureMismatchError, match=r"state\['p'\]"):
        ckptstore.restore(tmp_path / "c", like={"p": other})
    with pytest.raises(StructureMismatchError, match=r"state\['p'\]"):
        ckptstore.restore(tmp_path / "c", like={"p": Pair(jnp.ones(3), jnp.ones(2), "t")})  # shape


class Hidden(NamedTuple):
    key: Any
    count: Any


def test_prng_keys_typed_and_raw_roundtrip(tmp_path: Any) -> None:
    typed = jax.random.split(jax.random.key(42), 3)
    raw = jax.random.PRNGKey(7)
    rbg = jax.random.key(5, impl="rbg")
    state = {"typed": typed, "raw": raw, "rbg": rbg, "nt": Hidden(jax.random.key(1), 0)}
    like = {
        "typed": jax.random.split(jax.random.key(0), 3),
        "raw": jax.random.PRNGKey(0),
        "rbg": jax.random.key(0, impl="rbg"),
        "nt": Hidden(jax.random.key(0), 0),
    }
    out = roundtrip(tmp_path, state, like=like)
    assert jax.dtypes.issubdtype(out["typed"].dtype, jax.dtypes.prng_key) and out["typed"].shape == (3,)
    np.testing.assert_array_equal(jax.random.uniform(out["typed"][2]), jax.random.uniform(typed[2]))
    assert out["raw"].dtype == jnp.uint32
    np.testing.assert_array_equal(jax.random.normal(out["raw"], (4,)), jax.random.normal(raw, (4,)))
    np.testing.assert_array_equal(jax.random.bits(out["rbg"]), jax.random.bits(rbg))
    np.testing.assert_array_equal(jax.random.key_data(out["nt"].key), jax.random.key_data(state["nt"].key))

    with pytest.raises(StructureMismatchError, match=r"state\['rbg'\].*rbg key.*threefry2x32"):
        ckptstore.restore(tmp_path / "ckpt", like={**like, "rbg": jax.random.key(0)})


def test_unregistered_objects_are_still_unsupported_with_jax_imported(tmp_path: Any) -> None:
    class Opaque:
        pass

    with pytest.raises(UnsupportedTypeError, match=r"state\['x'\]\[0\].*Opaque"):
        ckptstore.save(tmp_path / "c", {"x": [Opaque()]})
    assert not (tmp_path / "c").exists()


def test_restore_places_arrays_on_likes_device() -> None:
    # Two CPU devices need an XLA flag set before JAX starts: a fresh process.
    out = run_python(
        """
        import os, sys, tempfile
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np, ckptstore
        d0, d1 = jax.devices()[:2]
        x = jax.device_put(jnp.arange(6, dtype=jnp.bfloat16), d0)
        path = os.path.join(tempfile.mkdtemp(), "c")
        ckptstore.save(path, {"x": x})
        like = {"x": jax.device_put(jnp.zeros(6, jnp.bfloat16), d1)}
        out = ckptstore.restore(path, like=like)["x"]
        assert out.devices() == {d1}, out.devices()
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
        print("ok", len(jax.devices()))
        """
    )
    assert out.split() == ["ok", "2"]


def test_int64_beyond_int32_without_x64_is_a_named_error(tmp_path: Any) -> None:
    assert not jax.config.jax_enable_x64
    ckptstore.save(tmp_path / "c", {"small": np.arange(3, dtype=np.int64), "big": np.array([1 << 40], np.int64)})
    with pytest.raises(UnsupportedTypeError, match=r"state\['big'\].*int64.*jax_enable_x64"):
        ckptstore.restore(tmp_path / "c", framework="jax")
    out = ckptstore.restore(tmp_path / "c", framework="jax", like={"small": 0, "big": np.zeros(1, np.int64)})
    assert out["small"].dtype == jnp.int32 and out["small"].tolist() == [0, 1, 2]  # fits: converted
    assert out["big"].dtype == np.int64 and out["big"][0] == 1 << 40  # a NumPy template keeps it whole


def test_saving_a_traced_value_is_a_named_error(tmp_path: Any) -> None:
    errors: list[str] = []

    @jax.jit
    def step(x: Any) -> Any:
        try:
            ckptstore.save(tmp_path / "c", {"x": x})
        except UnsupportedTypeError as e:
            errors.append(str(e))
        return x

    step(jnp.ones(2))
    assert len(errors) == 1 and "state['x']" in errors[0] and "traced" in errors[0]
