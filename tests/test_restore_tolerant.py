"""A resume that tolerates a changed state (#14, item 6): ``restore(strict=False)``, torch modules saved or
restored compiled / wrapped (``_orig_mod.``, ``module.``), ``key_map=``, and scalar types (0-d tensors
against Python number placeholders, framework integer scalars as steps, framework scalars in metadata)."""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import CkptStoreError, PartialRestoreWarning, StructureMismatchError
from tests.fw_helpers import REPO


def _net(*widths: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in itertools.pairwise(widths)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-identical parameters, by the modules' own (unwrapped) names."""
    sa, sb = _unwrapped(a).state_dict(), _unwrapped(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(_bits(sa[k]), _bits(sb[k])) for k in sa)


def _unwrapped(m: torch.nn.Module) -> torch.nn.Module:
    while isinstance(m, torch.nn.DataParallel) or hasattr(m, "_orig_mod"):
        m = m.module if isinstance(m, torch.nn.DataParallel) else m._orig_mod  # type: ignore[assignment]
    return m


def _restore_caught(fn: Callable[[], Any]) -> tuple[Any, list[PartialRestoreWarning], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    partial = [w.message for w in caught if isinstance(w.message, PartialRestoreWarning)]
    return out, partial, caught


@pytest.fixture
def store(tmp_path: Path) -> ckptstore.CheckpointStore:
    return ckptstore.CheckpointStore(tmp_path / "run")


def _train_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _net(3, 4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "step": 7}


# --- strict=False -------------------------------------------------------------------------------------


def test_added_scheduler_is_missing_and_left_as_is(store: ckptstore.CheckpointStore) -> None:
    saved = _train_state(0)
    store.save(1, saved)

    fresh = _train_state(1)
    sched = torch.optim.lr_scheduler.StepLR(fresh["opt"], step_size=3, gamma=0.5)
    sched_before = dict(sched.state_dict())
    like = {**fresh, "sched": sched}

    with pytest.raises(StructureMismatchError, match=r"keys differ; in `like` only: \['sched'\]"):
        store.restore(1, like=like)  # strict=True (the default) is unchanged

    out, partial, _ = _restore_caught(lambda: store.restore(1, like=like, strict=False))
    assert list(out) == ["model", "opt", "step", "sched"]
    assert out["sched"] is sched and sched.state_dict() == sched_before
    assert out["step"] == 7 and _same(fresh["model"], saved["model"])
    assert torch.equal(
        fresh["opt"].state_dict()["state"][0]["exp_avg"], saved["opt"].state_dict()["state"][0]["exp_avg"]
    )
    (w,) = partial
    assert w.missing == ["state['sched']"] and w.unexpected == []
    assert "state['sched']" in str(w)


def test_removed_entry_is_unexpected_and_dropped(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"w": np.arange(4.0), "old": {"a": np.ones(2), "b": 1}, "n": 3})
    template_w = np.zeros(4, np.float32)

    out, partial, _ = _restore_caught(
        lambda: store.restore(1, like={"w": template_w, "new": "kept", "n": 0}, strict=False)
    )
    assert list(out) == ["w", "new", "n"] and out["new"] == "kept" and out["n"] == 3
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [0.0, 1.0, 2.0, 3.0]  # like's dtype, as always
    (w,) = partial
    assert w.missing == ["state['new']"] and w.unexpected == ["state['old']"]
    msg = str(w)
    assert "missing" in msg and "state['new']" in msg and "state['old']" in msg


def test_nested_dicts_report_full_key_paths(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"outer": {"a": np.ones(1), "gone": np.ones(1)}})
    out, partial, _ = _restore_caught(
        lambda: store.restore(1, like={"outer": {"a": np.zeros(1), "added": np.full(1, 9.0)}}, strict=False)
    )
    assert out["outer"]["a"][0] == 1.0 and out["outer"]["added"][0] == 9.0 and "gone" not in out["outer"]
    (w,) = partial
    assert w.missing == ["state['outer']['added']"] and w.unexpected == ["state['outer']['gone']"]


def test_module_with_an_added_layer(store: ckptstore.CheckpointStore) -> None:
    saved = _train_state(0)
    store.save(1, saved)
    torch.manual_seed(1)
    new = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.Adam(new.parameters(), lr=0.5)
    added = new[2].weight.detach().clone()

    with pytest.raises(StructureMismatchError, match="Missing key"):
        store.restore(1, like={"model": new, "step": 0}, keys=["model", "step"])
    # The old optimizer's state does not fit the new parameters (torch refuses it), even with strict=False ...
    with pytest.raises(StructureMismatchError, match=r"state\['opt'\]"):
        store.restore(1, like={"model": new, "opt": opt, "step": 0}, strict=False)
    # ... so it is dropped: the new optimizer is missing, left as it is.
    out, partial, _ = _restore_caught(
        lambda: store.restore(1, like={"model": new, "opt": opt, "step": 0}, strict=False, key_map={"opt": None})
    )
    assert out["opt"] is opt and opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(_bits(new[i].weight), _bits(saved["model"][i].weight)) for i in (0, 1))
    assert torch.equal(new[2].weight, added)  # missing: left as it was
    (w,) = partial
    assert w.missing == ["state['model']['2.weight']", "state['model']['2.bias']", "state['opt']"]
    assert w.unexpected == []


def test_module_with_a_removed_layer(store: ckptstore.CheckpointStore) -> None:
    torch.manual_seed(0)
    old = _net(3, 4, 4, 2)
    store.save(1, {"model": old})
    new = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4))

    with pytest.raises(StructureMismatchError, match="Unexpected key"):
        store.restore(1, like={"model": new})

    _, partial, _ = _restore_caught(lambda: ckptstore.restore(store.info(1).path, like={"model": new}, strict=False))
    assert _same(new, torch.nn.Sequential(old[0], old[1]))
    (w,) = partial
    assert w.missing == [] and w.unexpected == ["state['model']['2.weight']", "state['model']['2.bias']"]


def test_shape_mismatch_stays_an_error(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"model": _net(3, 4, 2), "x": np.zeros(3)})
    with pytest.raises(StructureMismatchError, match=r"state\['model'\]\['0.weight'\].*shape"):
        store.restore(1, like={"model": _net(3, 5, 2), "x": np.zeros(3)}, strict=False)
    with pytest.raises(StructureMismatchError, match=r"state\['x'\].*shape"):
        store.restore(1, like={"model": _net(3, 4, 2), "x": np.zeros(4)}, strict=False)


def test_a_stateful_object_whose_state_gained_a_key(tmp_path: Path) -> None:
    class Counter:
        def __init__(self, **state: Any) -> None:
            self.state = state

        def state_dict(self) -> dict[str, Any]:
            return dict(self.state)

        def load_state_dict(self, state: dict[str, Any]) -> None:
            assert state.keys() == self.state.keys()  # a strict object: every key, nothing else
            self.state = dict(state)

    ckptstore.save(tmp_path / "c", {"c": Counter(seen=5, dropped="x")})
    new = Counter(seen=0, added=42)
    with pytest.raises(StructureMismatchError, match=r"state\['c'\].*load_state_dict rejects"):
        ckptstore.restore(tmp_path / "c", like={"c": new})
    _, partial, _ = _restore_caught(lambda: ckptstore.restore(tmp_path / "c", like={"c": new}, strict=False))
    assert new.state == {"seen": 5, "added": 42}
    (w,) = partial
    assert w.missing == ["state['c']['added']"] and w.unexpected == ["state['c']['dropped']"]


def test_no_warning_when_everything_matches(store: ckptstore.CheckpointStore) -> None:
    state = _train_state(0)
    store.save(1, state)
    _, partial, caught = _restore_caught(lambda: store.restore(1, like=_train_state(1), strict=False))
    assert partial == [] and not any(issubclass(w.category, PartialRestoreWarning) for w in caught)


def test_warning_points_at_the_callers_line(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"a": 1, "b": np.ones(1)})
    for call in (
        lambda: store.restore(1, like={"b": np.zeros(1)}, strict=False),
        lambda: store.restore(1, like={"b": np.zeros(1)}, strict=False, fallback=True),
        lambda: ckptstore.restore(store.info(1).path, like={"b": np.zeros(1)}, strict=False),
    ):
        _, _, caught = _restore_caught(call)
        (w,) = [c for c in caught if c.category is PartialRestoreWarning]
        assert w.filename == __file__


# --- torch modules saved or restored wrapped ----------------------------------------------------------


def _plain(m: torch.nn.Module) -> torch.nn.Module:
    return m


def _compiled(m: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(m)  # type: ignore[return-value]  # built, never run


def _data_parallel(m: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.DataParallel(m)  # "module." as DDP


def _compiled_dp(m: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(torch.nn.DataParallel(m))  # type: ignore[return-value]


def _dp_compiled(m: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.DataParallel(torch.compile(m))  # type: ignore[arg-type]


WRAPS = [
    (_compiled, _plain),
    (_plain, _compiled),
    (_data_parallel, _plain),
    (_plain, _data_parallel),
    (_compiled_dp, _plain),
    (_plain, _dp_compiled),
    (_data_parallel, _compiled),
]


@pytest.mark.parametrize(("saved_as", "restored_as"), WRAPS, ids=[f"{a.__name__}->{b.__name__}" for a, b in WRAPS])
def test_wrapped_module_restores_into_another_wrapping(
    store: ckptstore.CheckpointStore, saved_as: Callable[..., Any], restored_as: Callable[..., Any]
) -> None:
    torch.manual_seed(0)
    src = saved_as(_net(3, 4, 2))
    store.save(1, {"model": src, "step": 1})
    torch.manual_seed(1)
    dst = restored_as(_net(3, 4, 2))
    assert not _same(dst, src)
    assert set(dst.state_dict()) != set(src.state_dict())  # the wrappers' prefixes differ

    _, partial, _ = _restore_caught(lambda: store.restore(1, like={"model": dst, "step": 0}))
    assert _same(dst, src) and partial == []


def test_wrapped_checkpoint_with_a_changed_model(store: ckptstore.CheckpointStore) -> None:
    torch.manual_seed(0)
    store.save(1, {"model": torch.compile(_net(3, 4, 2))})
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))

    with pytest.raises(StructureMismatchError):  # strict: a renaming that does not fit 1:1 is not applied
        store.restore(1, like={"model": dst})

    _, partial, _ = _restore_caught(lambda: store.restore(1, like={"model": dst}, strict=False))
    (w,) = partial
    assert w.missing == ["state['model']['3.weight']", "state['model']['3.bias']"] and w.unexpected == []
    saved = store.restore(1)["model"]
    assert torch.equal(_bits(dst[0].weight), _bits(torch.from_numpy(saved["_orig_mod.0.weight"])))


# --- key_map ------------------------------------------------------------------------------------------


def test_key_map_dict_renames_and_drops(store: ckptstore.CheckpointStore) -> None:
    saved = _train_state(0)
    store.save(1, {"net": saved["model"], "optim": saved["opt"], "tmp": np.ones(3), "model2": 5})
    fresh = _train_state(1)

    out = store.restore(
        1,
        like={"model": fresh["model"], "opt": fresh["opt"], "model2": 0},
        key_map={"net": "model", "optim/": "opt", "tmp": None},
    )
    assert list(out) == ["model", "opt", "model2"] and out["model2"] == 5  # "net" does not cover "model2"
    assert _same(fresh["model"], saved["model"])
    want, got = saved["opt"].state_dict()["state"], fresh["opt"].state_dict()["state"]
    assert list(got) == [0, 1, 2, 3]  # the optimizer's int keys stayed ints
    assert all(torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"]) for i in want)

    assert set(store.restore(1, key_map={"net": None, "optim": None})) == {"tmp", "model2"}
    lifted = store.restore(1, key_map={"net": ""}, keys="net")  # keys= selects by the saved names
    assert set(lifted) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_key_map_callable(store: ckptstore.CheckpointStore) -> None:
    torch.manual_seed(0)
    src = _net(3, 4, 2)
    store.save(1, {"enc": src, "junk": {"x": np.ones(2)}})
    dst = _net(3, 4, 2)
    seen: list[str] = []

    def rename(path: str) -> str | None:
        seen.append(path)
        return None if path.startswith("junk/") else path.replace("enc/", "encoder/layers.")

    like = {"encoder": {"layers.0.weight": torch.zeros(4, 3)}}
    out, partial, _ = _restore_caught(lambda: store.restore(1, like=like, key_map=rename, strict=False))
    assert "enc/0.weight" in seen and "junk/x" in seen
    assert torch.equal(_bits(out["encoder"]["layers.0.weight"]), _bits(src[0].weight))
    assert list(out) == ["encoder"] and list(out["encoder"]) == ["layers.0.weight"]
    (w,) = partial  # what key_map drops is not "unexpected"; what it renames is reported by its new path
    assert w.missing == [] and w.unexpected == [
        f"state['encoder']['layers.{k}']" for k in ("0.bias", "1.weight", "1.bias")
    ]

    out = store.restore(
        1, like={"m": dst}, key_map=lambda p: "m/" + p.removeprefix("enc/") if p.startswith("enc/") else None
    )
    assert _same(dst, src)


def test_key_map_errors(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"a": np.ones(1), "b": np.ones(1), "c": {"d": 1}})
    with pytest.raises(StructureMismatchError, match="already takes"):
        store.restore(1, key_map={"a": "b"})
    with pytest.raises(StructureMismatchError, match="already takes"):
        store.restore(1, key_map={"a": "c/d/e"})
    with pytest.raises(StructureMismatchError, match="key_map must be"):
        store.restore(1, key_map=["a"])  # type: ignore[arg-type]
    with pytest.raises(StructureMismatchError, match="key_map entries"):
        store.restore(1, key_map={"a": 3})  # type: ignore[dict-item]
    with pytest.raises(StructureMismatchError, match=re.escape("key_map('a') raised KeyError")):
        store.restore(1, key_map=lambda p: {"b": "b", "c/d": "c/d"}[p])
    with pytest.raises(StructureMismatchError, match="no key path"):
        store.restore(1, key_map=lambda p: "x//y" if p == "a" else p)


# --- scalar types -------------------------------------------------------------------------------------


def test_nanogpt_best_val_loss_comes_back_as_a_float(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"best_val_loss": torch.tensor(1.5), "iter_num": torch.tensor(300), "loss_curve": torch.ones(3)})
    out = store.restore(1, like={"best_val_loss": 1e9, "iter_num": 0, "loss_curve": 0.0})
    assert type(out["best_val_loss"]) is float and out["best_val_loss"] == 1.5
    assert bool(torch.tensor(2.0) < out["best_val_loss"]) is False and bool(torch.tensor(1.0) < out["best_val_loss"])
    assert type(out["iter_num"]) is int and out["iter_num"] == 300
    assert isinstance(out["loss_curve"], np.ndarray)  # not 0-d: as saved

    # nanoGPT's full pattern: a template with objects in it too, and numpy / JAX / bf16 0-d arrays
    import jax.numpy as jnp

    model = _net(2, 2)
    store.save(
        2,
        {
            "model": model,
            "f": np.array(0.25, np.float32),
            "i": jnp.int32(4),
            "b": torch.tensor(0.5, dtype=torch.bfloat16),
            "fi": np.array(2.5),
        },
    )
    out = store.restore(2, like={"model": _net(2, 2), "f": 0.0, "i": 0, "b": 0.0, "fi": 0})
    assert (type(out["f"]), out["f"]) == (float, 0.25)
    assert (type(out["i"]), out["i"]) == (int, 4)
    assert (type(out["b"]), out["b"]) == (float, 0.5)
    assert (type(out["fi"]), out["fi"]) == (float, 2.5)  # a float value against an int placeholder stays a float


def test_framework_integer_scalars_as_steps(store: ckptstore.CheckpointStore) -> None:
    import jax.numpy as jnp

    for i, step in enumerate([np.int64(5), torch.tensor(6), jnp.int32(7), np.uint8(8)]):
        store.save(step, {"i": i})
        assert store.info(step).step == int(step)
        assert store.restore(step)["i"] == i
    assert store.steps() == [5, 6, 7, 8]
    store.delete(torch.tensor(6, dtype=torch.int32))
    assert store.steps() == [5, 7, 8]

    bad = [
        np.float64(5.0),
        5.0,
        torch.tensor(5.0),
        np.bool_(True),
        True,
        torch.tensor(True),
        torch.tensor([5]),
        np.int64(-1),
    ]
    for step in bad:
        with pytest.raises(CkptStoreError, match="step must be an int"):
            store.restore(step)
    with pytest.raises(CkptStoreError, match="step must be an int"):
        store.save(jnp.float32(3), {})


def test_framework_scalars_in_metadata(store: ckptstore.CheckpointStore) -> None:
    import jax.numpy as jnp

    meta = {
        "val_loss": np.float32(0.5),
        "lr": torch.tensor(0.25),
        "tokens": np.int64(3),
        "ok": np.bool_(True),
        "j": jnp.float32(1.5),
        "hist": [np.float64(1.0), torch.tensor(2)],
        "name": "run",
    }
    store.save(1, {"x": 1}, metadata=meta)
    got = store.info(1).metadata
    assert got == {"val_loss": 0.5, "lr": 0.25, "tokens": 3, "ok": True, "j": 1.5, "hist": [1.0, 2], "name": "run"}
    assert [type(got[k]) for k in ("val_loss", "lr", "tokens", "ok", "j")] == [float, float, int, bool, float]
    assert [type(v) for v in got["hist"]] == [float, int]

    with pytest.raises(CkptStoreError, match=r"metadata\['v'\] is an array"):
        store.save(2, {"x": 1}, metadata={"v": torch.ones(2)})

    # ckptstore.save of one directory takes its manifest's step from metadata["step"], an np.int64 too
    from ckptstore import load
    from ckptstore.storage import open_parent

    path = Path(store.url).parent / "one"
    ckptstore.save(path, {"x": 1}, metadata={"step": np.int64(3)})
    assert load.read_manifest(*open_parent(path)).step == 3


# --- the documented example ---------------------------------------------------------------------------


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "docs" / "frameworks.md").read_text()
    section = text.split("## Resuming a changed state", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"^```py\n(.*?)^```$", section, flags=re.S | re.M)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/frameworks.md: Resuming a changed state", "exec"), {"__name__": "__doc_example__"})
