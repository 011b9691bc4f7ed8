"""Flax NNX objects (``nnx.Module``, ``nnx.Optimizer``, ``nnx.Rngs``) in a ckptstore state, in real Flax.

Saved as ``nnx.state(obj)`` (plain arrays under readable key paths) and restored in place with
``nnx.update`` (ckptstore/frameworks/flax.py). The exact-resume test runs tests/flax_nnx_worker.py in
subprocesses: a training loop killed with SIGKILL between two checkpoints, then the same script rerun,
which resumes and finishes, then trains the uninterrupted reference from scratch; every variable of the
model, the optimizer and the RNGs must be bit-identical, and each loss of the steps the rerun trained
equal to the reference's. The rest runs small models in this process, on CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.doc_examples import run_integrations_example
from tests.fw_helpers import REPO, run_python

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import ckptstore  # noqa: E402
from ckptstore.errors import PartialRestoreWarning, StructureMismatchError  # noqa: E402
from tests import flax_nnx_worker as worker  # noqa: E402

WORKER = REPO / "tests" / "flax_nnx_worker.py"


def run_worker(*args: str, expect_rc: int = 0) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"worker exited with {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc.stdout


def test_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    # Saves every 3 steps (max_to_keep=2); killed after step 7, between the checkpoints of steps 6 and 9.
    assert "starting at step 0" in run_worker(root, str(tmp_path / "killed.npz"), "--kill-after", "7", expect_rc=-9)
    assert ckptstore.CheckpointStore(root).steps() == [3, 6]

    out, ref = tmp_path / "resumed.npz", tmp_path / "reference.npz"
    assert "starting at step 6" in run_worker(root, str(out), "--reference", str(ref))  # the same script, rerun
    resumed, reference = np.load(out), np.load(ref)

    variables = sorted(k for k in reference.files if k.startswith(("var/", "dtype/")))
    assert variables == sorted(k for k in resumed.files if k.startswith(("var/", "dtype/")))
    # The model (bfloat16 kernel, batch statistics, dropout stream), Adam's moments and count, the
    # optimizer's step and the data stream: all there, all bit for bit.
    for name in ("model/l1/kernel", "model/bn/mean", "model/drop/rngs/key", "opt/opt_state/0/mu/l1/kernel", "opt/step"):
        assert f"var/{name}" in variables, name
    assert str(reference["dtype/model/l1/kernel"]) == "bfloat16(8, 16)"
    for k in variables:
        assert resumed[k].tobytes() == reference[k].tobytes(), k
    assert resumed["steps"].tolist() == list(range(7, 13))  # the rerun trained steps 7..12
    assert resumed["losses"].tobytes() == reference["losses"][6:].tobytes()
    assert ckptstore.CheckpointStore(root).steps() == [9, 12]


# --- in this process ------------------------------------------------------------------------------------


def train(model: Any, optimizer: Any, rngs: Any, steps: int) -> None:
    for _ in range(steps):
        idx = jax.random.permutation(rngs.data(), worker.X.shape[0])[: worker.BATCH]
        worker.train_step(model, optimizer, worker.X[idx], worker.Y[idx])


def values(*objects: Any) -> dict[str, np.ndarray]:
    """Every variable of the objects as a host array (typed keys as their key data), by path."""
    out = {}
    for i, obj in enumerate(objects):
        for keypath, variable in nnx.to_flat_state(nnx.state(obj)):
            value = variable.get_value()
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            out["/".join(map(str, (i, *keypath)))] = np.asarray(value)
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Any, tuple[Any, Any, Any]]:
    """A store holding step 3 of the worker's training, and the objects that were saved."""
    objects = worker.build(0)
    train(*objects, 3)
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(3, dict(zip(("model", "opt", "rngs"), objects)))
    return store, objects


def test_module_optimizer_and_rngs_restore_in_place_and_train_on_identically(trained: Any) -> None:
    store, (model, optimizer, rngs) = trained
    model2, optimizer2, rngs2 = worker.build(1)  # another seed: every value differs
    kernel, key = model2.l1.kernel, rngs2.data.key
    like = {"model": model2, "opt": optimizer2, "rngs": rngs2}
    out = store.restore(like=like)

    # In place: the same objects come back, their Variable objects kept, their values replaced.
    assert out["model"] is model2 and out["opt"] is optimizer2 and out["rngs"] is rngs2
    assert model2.l1.kernel is kernel and rngs2.data.key is key
    assert model2.l1.kernel.dtype == jnp.bfloat16 and isinstance(model2.l1.kernel[...], jax.Array)
    assert int(optimizer2.step[...]) == 3 and int(rngs2.data.count[...]) == 3
    assert_same(values(model2, optimizer2, rngs2), values(model, optimizer, rngs))

    # Training goes on exactly: the same batches (the data stream), dropout masks (the model's
    # stream), Adam moments and schedule position (the optimizer's count).
    train(model, optimizer, rngs, 2)
    train(model2, optimizer2, rngs2, 2)
    assert_same(values(model2, optimizer2, rngs2), values(model, optimizer, rngs))


def test_the_checkpoint_holds_plain_arrays_under_readable_key_paths(trained: Any) -> None:
    store, (model, optimizer, _) = trained
    out = store.restore()  # no like: nested dicts of NumPy arrays
    kernel = out["model"]["l1"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16 and kernel.tobytes() == np.asarray(model.l1.kernel[...]).tobytes()
    assert set(out["model"]) == {"l1", "bn", "drop", "l2"}
    assert set(out["model"]["bn"]) == {"scale", "bias", "mean", "var"}
    assert out["opt"]["step"] == 3 and out["opt"]["opt_state"][0]["count"] == 3  # optax's int keys kept
    mu = optimizer.opt_state[0].mu["l1"]["kernel"][...]
    assert out["opt"]["opt_state"][0]["mu"]["l1"]["kernel"].tobytes() == np.asarray(mu).tobytes()
    # An RNG stream: its count, and its typed key as the JAX adapter saves one.
    assert out["rngs"]["data"]["count"] == 3
    assert out["rngs"]["data"]["key"]["impl"] == "threefry2x32"
    assert out["rngs"]["data"]["key"]["key_data"].tolist() == [0, 2]  # nnx.Rngs(data=2)
    # keys= selects whole objects (not paths inside one, as for torch modules).
    part = store.restore(keys="model")
    assert set(part) == {"model"} and part["model"]["l1"]["kernel"].tobytes() == kernel.tobytes()


def test_restore_without_like_feeds_nnx_update(tmp_path: Path) -> None:
    model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: m(jnp.ones((1, 3))).astype(jnp.float32).sum())(model))
    rngs = nnx.Rngs(7)
    rngs()
    ckptstore.save(tmp_path / "ckpt", {"model": model, "opt": optimizer, "rngs": rngs})

    out = ckptstore.restore(tmp_path / "ckpt", framework="jax")
    model2 = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    optimizer2 = nnx.Optimizer(model2, optax.adam(1e-2), wrt=nnx.Param)
    nnx.update(model2, out["model"])
    nnx.update(optimizer2, out["opt"])
    assert_same(values(model2, optimizer2), values(model, optimizer))
    # A typed key comes back as {"impl", "key_data"} without like, as anywhere in JAX state.
    key = out["rngs"]["default"]["key"]
    rngs2 = nnx.Rngs(0)
    nnx.update(
        rngs2,
        {
            "default": {
                "count": out["rngs"]["default"]["count"],
                "key": jax.random.wrap_key_data(key["key_data"], impl=key["impl"]),
            }
        },
    )
    assert_same(values(rngs2), values(rngs))


class Net(nnx.Module):
    """A model whose layers tests vary: ``extra`` adds one, ``width`` changes one's shape."""

    def __init__(self, rngs: Any, *, extra: bool = False, width: int = 4) -> None:
        self.l1 = nnx.Linear(3, width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(width, 1, param_dtype=jnp.bfloat16, rngs=rngs)
        if extra:
            self.extra = nnx.Linear(1, 1, rngs=rngs)


def save_net(path: Path) -> tuple[Any, Any]:
    model = Net(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    store = ckptstore.CheckpointStore(path)
    store.save(1, {"model": model, "opt": optimizer})
    return store, model


def test_a_model_with_another_layer_raises_naming_the_path_and_is_left_untouched(tmp_path: Path) -> None:
    store, _ = save_net(tmp_path / "run")
    model2 = Net(nnx.Rngs(5), extra=True)
    before = values(model2)
    like = {"model": model2, "opt": nnx.Optimizer(model2, optax.adam(1e-2), wrt=nnx.Param)}
    with pytest.raises(
        StructureMismatchError, match=re.escape("state['model']: keys differ; in `like` only: ['extra']")
    ):
        store.restore(like=like)
    assert_same(values(model2), before)  # nothing written: the state is checked in full first

    # Another object's state where like has a module: a pytree node of unnamed children (a list).
    ckptstore.save(tmp_path / "pair", {"model": jax.tree_util.Partial(jnp.add, jnp.ones(2))})
    with pytest.raises(StructureMismatchError, match=re.escape("state['model']: the checkpoint holds no NNX state")):
        ckptstore.restore(tmp_path / "pair", like={"model": model2})

    wider = Net(nnx.Rngs(5), width=8)
    with pytest.raises(StructureMismatchError, match=re.escape("state['model']['l1']['bias']: the checkpoint's array")):
        store.restore(like={"model": wider, "opt": nnx.Optimizer(wider, optax.adam(1e-2), wrt=nnx.Param)})


def test_strict_false_restores_the_layers_that_match_and_names_the_rest(tmp_path: Path) -> None:
    store, model = save_net(tmp_path / "run")
    model2 = Net(nnx.Rngs(5), extra=True)
    extra = values(model2.extra)
    like = {"model": model2, "opt": nnx.Optimizer(model2, optax.adam(1e-2), wrt=nnx.Param)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.restore(like=like, strict=False)
    (w,) = [c.message for c in caught if isinstance(c.message, PartialRestoreWarning)]
    assert w.missing == [
        "state['model']['extra']",
        "state['opt']['opt_state'][0]['mu']['extra']",
        "state['opt']['opt_state'][0]['nu']['extra']",
    ]
    assert w.unexpected == []
    for name in ("l1", "drop", "l2"):
        assert_same(values(getattr(model2, name)), values(getattr(model, name)))
    assert_same(values(model2.extra), extra)  # kept as it was


def test_rngs_are_saved_without_drawing_a_key(tmp_path: Path) -> None:
    # nnx.Rngs answers any attribute with a stream: rngs.state_dict is one, and must not be called.
    rngs = nnx.Rngs(3)
    ckptstore.save(tmp_path / "ckpt", {"rngs": rngs})
    assert int(rngs.default.count[...]) == 0
    expected = jax.random.key_data(rngs())
    rngs2 = nnx.Rngs(9)
    ckptstore.restore(tmp_path / "ckpt", like={"rngs": rngs2})
    assert jax.random.key_data(rngs2()).tolist() == expected.tolist()


def test_any_nnx_pytree_restores_in_place_metrics_and_model_and_optimizer(tmp_path: Path) -> None:
    both = nnx.ModelAndOptimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1))
    metric = nnx.metrics.Average()
    metric.update(values=jnp.array([1.0, 4.0]))
    ckptstore.save(tmp_path / "ckpt", {"both": both, "metric": metric})
    both2 = nnx.ModelAndOptimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(1)), optax.sgd(0.1))
    metric2 = nnx.metrics.Average()
    out = ckptstore.restore(tmp_path / "ckpt", like={"both": both2, "metric": metric2})
    assert out["both"] is both2 and out["metric"] is metric2
    assert float(metric2.compute()) == 2.5
    assert_same(values(both2), values(both))


def test_a_pure_dict_and_a_module_restore_into_each_other(tmp_path: Path) -> None:
    model = Net(nnx.Rngs(0, dropout=1))
    ckptstore.save(tmp_path / "a", {"model": nnx.to_pure_dict(nnx.state(model))})  # saved by hand
    model2 = Net(nnx.Rngs(5))
    assert ckptstore.restore(tmp_path / "a", like={"model": model2})["model"] is model2
    assert_same(values(model2), values(model))

    ckptstore.save(tmp_path / "b", {"model": model})
    template = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(5))))
    out = ckptstore.restore(tmp_path / "b", like={"model": template})["model"]
    assert out["l2"]["kernel"].dtype == jnp.bfloat16 and isinstance(out["l2"]["kernel"], jax.Array)
    nnx.update(model3 := Net(nnx.Rngs(6)), out)
    assert_same(values(model3), values(model))


def test_variables_and_state_outside_an_object_are_saved_as_before(tmp_path: Path) -> None:
    # A state split by hand: nnx.State is a mapping, each Variable a JAX pytree node with its value.
    model = Net(nnx.Rngs(0))
    ckptstore.save(tmp_path / "ckpt", {"state": nnx.state(model), "p": nnx.Param(jnp.arange(3.0))})
    out = ckptstore.restore(tmp_path / "ckpt")
    assert out["state"]["l1"]["kernel"]["value"].shape == (3, 4) and out["p"]["value"].tolist() == [0, 1, 2]
    model2 = Net(nnx.Rngs(5))
    like = {"state": nnx.state(model2), "p": nnx.Param(jnp.zeros(3))}
    restored = ckptstore.restore(tmp_path / "ckpt", like=like)
    nnx.update(model2, restored["state"])
    assert_same(values(model2), values(model))
    assert isinstance(restored["p"], nnx.Param) and restored["p"][...].tolist() == [0, 1, 2]


def test_an_async_save_holds_the_state_as_it_was(tmp_path: Path) -> None:
    model, optimizer, rngs = worker.build(0)
    store = ckptstore.CheckpointStore(tmp_path / "run")
    handle = store.save(0, {"model": model, "opt": optimizer, "rngs": rngs}, blocking=False)
    expected = values(model, optimizer, rngs)
    train(model, optimizer, rngs, 1)  # while the save may still run
    handle.result()
    model2, optimizer2, rngs2 = worker.build(1)
    store.restore(like={"model": model2, "opt": optimizer2, "rngs": rngs2})
    assert_same(values(model2, optimizer2, rngs2), expected)


def test_a_resume_equals_one_from_orbax_the_native_checkpointer(tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    objects = worker.build(0)
    train(*objects, 4)
    names = ("model", "opt", "rngs")
    ckptstore.save(tmp_path / "ours", dict(zip(names, objects)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", {n: nnx.state(o) for n, o in zip(names, objects)})
    checkpointer.wait_until_finished()

    ours = worker.build(1)
    ckptstore.restore(tmp_path / "ours", like=dict(zip(names, ours)))
    native = worker.build(2)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {n: nnx.state(o) for n, o in zip(names, native)})
    restored = checkpointer.restore(tmp_path / "orbax", abstract)
    for name, obj in zip(names, native):
        nnx.update(obj, restored[name])
    assert_same(values(*ours), values(*native))
    train(*ours, 2)
    train(*native, 2)
    train(*objects, 2)
    assert_same(values(*ours), values(*native))
    assert_same(values(*ours), values(*objects))


def test_import_ckptstore_imports_no_flax() -> None:
    # Nor does saving JAX state: the Flax adapter is loaded only for Flax objects.
    code = (
        "import os, sys, ckptstore\n"
        "os.environ['JAX_PLATFORMS'] = 'cpu'\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('flax', 'jax') or m.endswith('.flax')))\n"
        "import jax.numpy as jnp, tempfile\n"
        "ckptstore.save(tempfile.mkdtemp() + '/c', {'w': jnp.ones(2)})\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'flax' or m.endswith('.flax')))\n"
    )
    out = run_python(code)
    assert out.split("\n")[:2] == ["[]", "[]"]


def test_the_docs_flax_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Flax NNX")
    assert ckptstore.CheckpointStore(tmp_path / "ckpts" / "nnx-run").steps() == [20, 30]
