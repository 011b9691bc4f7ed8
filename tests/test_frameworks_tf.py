"""TensorFlow and Keras 3 adapters: tensors and variables of every dtype, Keras models, optimizers, metrics
and seed generators restored in place (into rebuilt, renamed objects too), tf.Module, tf.random.Generator.

TensorFlow is imported by a fixture, not at collection, so that test files collected earlier do not run
with it loaded.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptstore
from ckptstore import manifest
from ckptstore.errors import StructureMismatchError, UnsupportedTypeError
from tests import fw_helpers  # noqa: F401  (fixes KERAS_BACKEND and quiets TF before the import)


@pytest.fixture(scope="module")
def tf() -> ModuleType:
    return importlib.import_module("tensorflow")


@pytest.fixture(scope="module")
def keras(tf: ModuleType) -> ModuleType:
    keras = importlib.import_module("keras")
    assert keras.backend.backend() == "tensorflow"
    return keras


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind != "b" else a


NP_DTYPES = [
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    np.int64,
    np.int32,
    np.uint8,
    np.bool_,
    np.complex64,
]


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_tensor_and_variable_roundtrip_bits(tmp_path: Any, tf: ModuleType, dtype: Any) -> None:
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    host = rng.integers(0, 2, size=(4, 3)).astype(bool) if dt.kind == "b" else rng.bytes(12 * dt.itemsize)
    host = host if dt.kind == "b" else np.frombuffer(host, dtype=dt).reshape(4, 3)
    t = tf.constant(host)
    v = tf.Variable(host)
    ckptstore.save(tmp_path / "c", {"t": t, "v": v})

    like_v = tf.Variable(np.zeros_like(host))
    out = ckptstore.restore(tmp_path / "c", like={"t": tf.constant(np.zeros_like(host)), "v": like_v})
    assert isinstance(out["t"], tf.Tensor) and out["t"].dtype == t.dtype
    assert out["v"] is like_v  # variables are assigned in place
    np.testing.assert_array_equal(bits(out["t"].numpy()), bits(host))
    np.testing.assert_array_equal(bits(like_v.numpy()), bits(host))

    as_tf = ckptstore.restore(tmp_path / "c", framework="tf")
    assert isinstance(as_tf["v"], tf.Tensor) and as_tf["v"].dtype == t.dtype


def test_string_tensor_is_a_named_error(tmp_path: Any, tf: ModuleType) -> None:
    with pytest.raises(UnsupportedTypeError, match=r"state\['s'\]"):
        ckptstore.save(tmp_path / "c", {"s": tf.constant(["a", "b"])})


def make_model(keras: ModuleType) -> tuple[Any, Any]:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5, seed=1),
            keras.layers.Dense(1),
        ]
    )
    opt = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=opt, loss="mse")
    return model, opt


def test_keras_model_and_optimizer_restore_into_a_renamed_rebuild(tmp_path: Any, keras: ModuleType) -> None:
    model, opt = make_model(keras)
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 3), dtype=np.float32), rng.random((8, 1), dtype=np.float32)
    for _ in range(3):
        model.train_on_batch(x, y)
    ckptstore.save(tmp_path / "c", {"model": model, "opt": opt})

    model2, opt2 = make_model(keras)  # Keras renames: sequential_1, dense_2, adam_1
    assert [v.path for v in model2.variables] != [v.path for v in model.variables]
    opt2.build(model2.trainable_variables)
    out = ckptstore.restore(tmp_path / "c", like={"model": model2, "opt": opt2})
    assert out["model"] is model2 and out["opt"] is opt2
    assert int(opt2.iterations.numpy()) == 3
    for a, b in zip(model.variables + opt.variables, model2.variables + opt2.variables, strict=True):
        np.testing.assert_array_equal(bits(np.asarray(a.numpy())), bits(np.asarray(b.numpy())))
    np.testing.assert_array_equal(model2.predict_on_batch(x), model.predict_on_batch(x))

    # Each variable's path is in the manifest for people to read (tensor names and skeleton keys).
    m = manifest.decode((tmp_path / "c" / manifest.MANIFEST_NAME).read_bytes())
    names = [t.name for t in m.tensors]
    assert "model/" + model.variables[0].path in names and "opt/" + opt.iterations.path in names
    assert list(m.tree["model"].state) == [v.path for v in model.variables]

    plain = ckptstore.restore(tmp_path / "c")  # without like: {path: array}
    assert plain["opt"][opt.iterations.path] == 3


def test_unbuilt_optimizer_and_other_architecture_are_named_errors(tmp_path: Any, keras: ModuleType) -> None:
    model, opt = make_model(keras)
    opt.build(model.trainable_variables)
    ckptstore.save(tmp_path / "c", {"model": model, "opt": opt})

    model2, opt2 = make_model(keras)
    with pytest.raises(StructureMismatchError, match=r"state\['opt'\].*not built.*optimizer.build"):
        ckptstore.restore(tmp_path / "c", like={"model": model2, "opt": opt2})

    bigger = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2), keras.layers.Dense(1)])
    with pytest.raises(StructureMismatchError, match=r"state\['model'\].*9 variables.*has 6"):
        ckptstore.restore(tmp_path / "c", like={"model": bigger, "opt": None})
    wider = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1),
        ]
    )
    with pytest.raises(StructureMismatchError, match=r"state\['model'\]\['sequential.*/dense.*/kernel'\].*shape"):
        ckptstore.restore(tmp_path / "c", like={"model": wider, "opt": None})


def test_keras_metric_seed_generator_and_variable_leaves(tmp_path: Any, keras: ModuleType) -> None:
    metric = keras.metrics.Mean()
    metric.update_state([1.0, 2.0, 6.0])
    seeds = keras.random.SeedGenerator(7)
    keras.random.uniform((2,), seed=seeds)
    var = keras.Variable(np.arange(3, dtype=ml_dtypes.bfloat16))
    ckptstore.save(tmp_path / "c", {"metric": metric, "seeds": seeds, "var": var})
    expected = keras.ops.convert_to_numpy(keras.random.uniform((3,), seed=seeds))

    like = {"metric": keras.metrics.Mean(), "seeds": keras.random.SeedGenerator(0), "var": keras.Variable(np.zeros(3))}
    like["var"] = keras.Variable(np.zeros(3, dtype=ml_dtypes.bfloat16))
    out = ckptstore.restore(tmp_path / "c", like=like)
    assert float(out["metric"].result()) == 3.0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.random.uniform((3,), seed=out["seeds"])), expected)
    assert out["var"] is like["var"] and str(out["var"].dtype) == "bfloat16"
    np.testing.assert_array_equal(out["var"].numpy(), np.arange(3, dtype=ml_dtypes.bfloat16))


def test_tf_module_and_random_generator(tmp_path: Any, tf: ModuleType) -> None:
    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((3, 2), seed=(1, 2)), name="w")
            self.b = tf.Variable(tf.zeros(2, dtype=tf.bfloat16), name="b")

    lin = Linear()
    lin.b.assign(tf.constant([1.5, -2.0], dtype=tf.bfloat16))
    gen = tf.random.Generator.from_seed(11)
    gen.normal((4,))
    ckptstore.save(tmp_path / "c", {"lin": lin, "gen": gen})
    expected = gen.normal((3,)).numpy()

    lin2, gen2 = Linear(), tf.random.Generator.from_seed(0)
    out = ckptstore.restore(tmp_path / "c", like={"lin": lin2, "gen": gen2})
    assert out["lin"] is lin2 and out["gen"] is gen2
    np.testing.assert_array_equal(lin2.w.numpy(), lin.w.numpy())
    np.testing.assert_array_equal(bits(lin2.b.numpy()), bits(lin.b.numpy()))
    np.testing.assert_array_equal(gen2.normal((3,)).numpy(), expected)

    philox_vs_threefry = tf.random.Generator.from_seed(0, alg="threefry")
    with pytest.raises(StructureMismatchError, match=r"state\['gen'\]"):
        ckptstore.restore(tmp_path / "c", like={"lin": Linear(), "gen": philox_vs_threefry})
