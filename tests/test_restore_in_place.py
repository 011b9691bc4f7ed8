"""Restoring into `like`'s torch modules and optimizers reads the checkpoint's bytes straight into their
tensors (issue #15): same storage, exact values, no second copy of the state in memory; a damaged tensor
part-way says the objects were partly overwritten, and fallback / resume leave an intact older state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import knobs, load, tensorio
from ckptstore.errors import CorruptCheckpointError, CorruptCheckpointWarning, StructureMismatchError
from ckptstore.storage import step_name
from tests.conftest import Location


def net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)
    )


Opt = Callable[[Any], torch.optim.Optimizer]
ADAMW: Opt = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
SGD_MOMENTUM: Opt = lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9)  # noqa: E731


def trained(seed: int, make_opt: Opt, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module and its optimizer after ``steps`` training steps (BatchNorm's running stats move too)."""
    torch.manual_seed(seed)
    m = net()
    opt = make_opt(m.parameters())
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(32, 8)).pow(2).mean().backward()
        opt.step()
    return m, opt


def tensors_of(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the module's and the optimizer's state, by name."""
    out = {f"model/{k}": v for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def assert_same_values(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


class Allocations:
    """Bytes of fresh tensor memory a restore asks for (``tensorio.new_buffer``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nbytes = 0
        real = tensorio.new_buffer

        def counting(n: int) -> np.ndarray:
            self.nbytes += n
            return real(n)

        monkeypatch.setattr(tensorio, "new_buffer", counting)


@pytest.mark.parametrize("make_opt", [ADAMW, SGD_MOMENTUM], ids=["adamw", "sgd-momentum"])
def test_module_and_stepped_optimizer_are_filled_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_opt: Opt
) -> None:
    m, opt = trained(0, make_opt)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m, "opt": opt, "step": 1})
    want = {k: v.clone() for k, v in tensors_of(m, opt).items()}

    m2, opt2 = trained(1, make_opt)  # other values, every optimizer state tensor already there
    before = tensors_of(m2, opt2)
    ptrs = {k: v.data_ptr() for k, v in before.items()}
    assert not torch.equal(before["model/0.weight"], want["model/0.weight"])
    params = [p.data_ptr() for p in m2.parameters()]
    allocated = Allocations(monkeypatch)

    out = store.restore(like={"model": m2, "opt": opt2, "step": 0})

    assert out["model"] is m2 and out["opt"] is opt2 and out["step"] == 1
    got = tensors_of(m2, opt2)
    assert_same_values(got, want)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs  # every parameter, buffer and state tensor
    assert [p.data_ptr() for p in m2.parameters()] == params
    assert allocated.nbytes == 0  # nothing read into fresh memory first
    # the optimizer still drives the very parameters of the module
    assert [p.data_ptr() for g in opt2.param_groups for p in g["params"]] == params


def test_optimizer_that_never_stepped_gets_its_state_allocated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, opt = trained(0, ADAMW)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m, "opt": opt})
    want = {k: v.clone() for k, v in tensors_of(m, opt).items()}

    torch.manual_seed(5)
    m2 = net()
    opt2 = ADAMW(m2.parameters())
    assert opt2.state_dict()["state"] == {}
    ptrs = {k: v.data_ptr() for k, v in m2.state_dict().items()}
    allocated = Allocations(monkeypatch)
    store.restore(like={"model": m2, "opt": opt2})

    assert_same_values(tensors_of(m2, opt2), want)
    assert {k: v.data_ptr() for k, v in m2.state_dict().items()} == ptrs
    opt_bytes = sum(v.nbytes for k, v in want.items() if k.startswith("opt/"))
    assert allocated.nbytes == opt_bytes  # the optimizer's state, read once; the module's in place
    # and the restored optimizer trains on: one more step matches the original's
    for mm, oo in ((m, opt), (m2, opt2)):
        torch.manual_seed(9)
        oo.zero_grad()
        mm(torch.randn(32, 8)).pow(2).mean().backward()
        oo.step()
    assert_same_values(tensors_of(m2, opt2), tensors_of(m, opt))


def test_other_dtype_in_like_is_converted_not_filled(tmp_path: Path) -> None:
    m, _ = trained(0, ADAMW)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m})
    m2 = net().double()
    store.restore(like={"model": m2})
    for k, v in m.state_dict().items():
        got = m2.state_dict()[k]
        assert got.dtype == (torch.float64 if v.is_floating_point() else v.dtype)
        assert torch.equal(got, v.to(got.dtype)), k


def test_tied_weights_end_as_load_state_dict_leaves_them(tmp_path: Path) -> None:
    def pair(tied: bool) -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 512, bias=False))
        if tied:
            m[1].weight = m[0].weight
        return m

    saved = pair(tied=False)  # 1 MiB each, checked on the helper thread: the racy size
    with torch.no_grad():
        saved[0].weight.fill_(1.0)
        saved[1].weight.fill_(2.0)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": saved})
    reference = pair(tied=True)
    reference.load_state_dict(saved.state_dict())  # torch's own answer: the last key wins
    target = pair(tied=True)
    ptr = target[0].weight.data_ptr()
    store.restore(like={"model": target})
    assert target[1].weight is target[0].weight and target[0].weight.data_ptr() == ptr
    assert torch.equal(target[0].weight, reference[0].weight) and float(target[0].weight.detach()[0, 0]) == 2.0


def test_bare_arrays_in_like_are_templates_not_filled(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    saved_t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    saved_n = np.arange(6, dtype=np.int64)
    store.save(1, {"t": saved_t, "n": saved_n})
    like_t, like_n = torch.zeros(3, 4), np.zeros(6, dtype=np.int64)
    out = store.restore(like={"t": like_t, "n": like_n})
    assert torch.equal(out["t"], saved_t) and (out["n"] == saved_n).all()
    assert out["t"].data_ptr() != like_t.data_ptr() and not np.shares_memory(out["n"], like_n)
    assert not like_t.any() and not like_n.any()  # the template is left as it was


def test_a_state_the_object_refuses_leaves_it_untouched(tmp_path: Path) -> None:
    m, opt = trained(0, ADAMW)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m, "opt": opt})
    # a module whose last layer has another shape: refused before any of its tensors is filled
    torch.manual_seed(3)
    other = net()
    other[3] = torch.nn.Linear(16, 5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StructureMismatchError) as err:
        store.restore(like={"model": other, "opt": ADAMW(other.parameters())})
    assert "partly overwritten" not in str(err.value)
    assert_same_values(dict(other.state_dict()), before)
    # an optimizer with another number of parameters (AdamW over part of the module): refused as before
    m2, _ = trained(1, ADAMW)
    opt2 = ADAMW(list(m2.parameters())[:2])
    opt2.zero_grad()
    m2(torch.randn(4, 8)).sum().backward()
    opt2.step()
    state_before = {k: v.clone() for k, v in opt2.state_dict()["state"][0].items()}
    with pytest.raises(StructureMismatchError):
        store.restore(like={"model": net(), "opt": opt2})
    for k, v in opt2.state_dict()["state"][0].items():
        assert torch.equal(v, state_before[k]), k


# --- a damaged tensor part-way --------------------------------------------------------------------------


def two_checkpoints(
    tmp_path: Path, url: str | None = None, options: dict[str, Any] | None = None
) -> tuple[ckptstore.CheckpointStore, dict[str, torch.Tensor], dict[str, Any]]:
    """Steps 1 and 2 (other values), each in several tensor files; step 2's optimizer state damaged in the
    middle of a late tensor. Returns the store (at ``url``, else under tmp_path), step 1's tensors and
    step 2's."""
    store = ckptstore.CheckpointStore(url or tmp_path / "run", storage_options=options)
    with knobs.override(max_file_bytes=1024):  # several files a checkpoint: the damage is in a later one
        m1, o1 = trained(0, ADAMW)
        store.save(1, {"model": m1, "opt": o1, "step": 1})
        m2, o2 = trained(1, ADAMW, steps=3)
        store.save(2, {"model": m2, "opt": o2, "step": 2})
    name = step_name(2)
    man = load.read_manifest(store.storage, name)
    assert len(man.files) >= 3
    late = man.tensors[-2]  # the optimizer's state of the last layer: after every tensor of the module
    assert late.name.startswith("opt/") and man.files[late.file].name != man.files[man.tensors[0].file].name
    rel = f"{name}/{man.files[late.file].name}"
    data = bytearray(store.storage.read_range(rel, 0, man.files[late.file].size))
    data[late.offset + late.nbytes // 2] ^= 0x10
    if url is None:
        Path(store.url, rel).write_bytes(data)
    else:  # the object rewritten as it is (the manifest still lists it, with its old checksum)
        fs = store.storage.fs  # type: ignore[attr-defined]
        fs.pipe(f"{store.url.removeprefix('s3://')}/{rel}", bytes(data))
    return (
        store,
        {k: v.clone() for k, v in tensors_of(m1, o1).items()},
        {k: v.clone() for k, v in tensors_of(m2, o2).items()},
    )


def fresh_target() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, int]]:
    m, opt = trained(7, ADAMW)
    return m, opt, {k: v.data_ptr() for k, v in tensors_of(m, opt).items()}


def test_damaged_tensor_part_way_says_the_objects_were_partly_overwritten(tmp_path: Path) -> None:
    store, _, step2 = two_checkpoints(tmp_path)
    m, opt, _ = fresh_target()
    with pytest.raises(CorruptCheckpointError, match=r"checksum.*the objects in `like` were partly overwritten"):
        store.restore(2, like={"model": m, "opt": opt, "step": 0})
    # it says true: the module's tensors hold step 2's bytes already
    assert torch.equal(m.state_dict()["0.weight"], step2["model/0.weight"])
    # the damage is found before anything is touched by verify(): the checkpoint itself is reported
    with pytest.raises(CorruptCheckpointError):
        store.verify(2)


def test_fallback_after_a_part_way_failure_leaves_the_older_checkpoint_in_full(tmp_path: Path) -> None:
    store, step1, _ = two_checkpoints(tmp_path)
    m, opt, ptrs = fresh_target()
    with pytest.warns(CorruptCheckpointWarning, match=r"restored step 1 .*step 2: .*partly overwritten"):
        out = store.restore(like={"model": m, "opt": opt, "step": 0}, fallback=True)
    assert out["step"] == 1
    got = tensors_of(m, opt)
    assert_same_values(got, step1)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs


def test_resume_after_a_part_way_failure_leaves_the_older_checkpoint_in_full(tmp_path: Path) -> None:
    store, step1, _ = two_checkpoints(tmp_path)
    m, opt, ptrs = fresh_target()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        state, step = store.resume({"model": m, "opt": opt, "step": 0})
    assert step == 1 and state["step"] == 1 and state["model"] is m
    assert any(issubclass(w.category, CorruptCheckpointWarning) for w in seen)
    got = tensors_of(m, opt)
    assert_same_values(got, step1)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs


# --- memory ---------------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, ckptstore

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
        return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])  # 64 MiB of fp32

    torch.manual_seed(0)
    store = ckptstore.CheckpointStore(sys.argv[1])
    m = model()
    store.save(1, {"model": m})
    nbytes = sum(t.nbytes for t in m.state_dict().values())
    target = model()
    in_place, _ = peak_growth(lambda: store.restore(like={"model": target}))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), target.state_dict().values()))
    fresh, out = peak_growth(lambda: store.restore())  # without `like`: the state in fresh memory (control)
    print(nbytes, in_place, fresh)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_restore_into_an_existing_model_adds_little_peak_memory(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    nbytes, in_place, fresh = map(int, p.stdout.split())
    assert fresh > 0.8 * nbytes  # the measurement sees a restore into fresh memory (control)
    assert in_place < 0.25 * nbytes, f"peak grew {in_place / nbytes:.0%} of the state"


# --- on an object store ---------------------------------------------------------------------------------


def test_on_s3_module_and_optimizer_are_filled_in_place(s3_url: Location, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranged GETs land in the existing tensors: no fresh buffer, the same storage, exact values."""
    m, opt = trained(0, ADAMW)
    store = ckptstore.CheckpointStore(s3_url.url, storage_options=s3_url.storage_options)
    with knobs.override(read_part_bytes=256, read_coalesce_bytes=0):  # many parts, several at once
        store.save(1, {"model": m, "opt": opt, "step": 1})
        want = {k: v.clone() for k, v in tensors_of(m, opt).items()}
        m2, opt2 = trained(1, ADAMW)
        ptrs = {k: v.data_ptr() for k, v in tensors_of(m2, opt2).items()}
        allocated = Allocations(monkeypatch)
        out = store.restore(like={"model": m2, "opt": opt2, "step": 0})
    assert out["step"] == 1
    got = tensors_of(m2, opt2)
    assert_same_values(got, want)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs
    assert allocated.nbytes == 0


def test_on_s3_a_damaged_tensor_part_way_then_fallback_leaves_the_older_checkpoint(
    s3_url: Location, tmp_path: Path
) -> None:
    store, step1, step2 = two_checkpoints(tmp_path, s3_url.url, s3_url.storage_options)
    m, opt, ptrs = fresh_target()
    with pytest.raises(CorruptCheckpointError, match=r"checksum.*the objects in `like` were partly overwritten"):
        store.restore(2, like={"model": m, "opt": opt, "step": 0})
    assert torch.equal(m.state_dict()["0.weight"], step2["model/0.weight"])
    with pytest.warns(CorruptCheckpointWarning, match=r"restored step 1 .*step 2: .*partly overwritten"):
        out = store.restore(like={"model": m, "opt": opt, "step": 0}, fallback=True)
    assert out["step"] == 1
    got = tensors_of(m, opt)
    assert_same_values(got, step1)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs


def test_an_optimizer_of_many_parameters_restores_exactly_and_without_torchs_quadratic_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's Optimizer.load_state_dict looks each state tensor's parameter up with `in` on its group's list
    of ids; the restore hands it lists whose `in` is a set lookup (TorchAdapter.state_for_load)."""
    from ckptstore.frameworks import torch as torch_fw

    def model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = torch.nn.ParameterList([torch.nn.Parameter(torch.rand(4)) for _ in range(300)])
        opt = torch.optim.AdamW([{"params": list(m)[:100]}, {"params": list(m)[100:], "lr": 0.5}])
        m[0].sum().backward()
        for p in m:
            p.grad = torch.rand_like(p)
        opt.step()
        return m, opt

    torch.manual_seed(0)
    m1, o1 = model()
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m1, "opt": o1})
    torch.manual_seed(1)
    m2, o2 = model()
    lookups: list[int] = []
    real = torch_fw._ParamIds.__contains__
    monkeypatch.setattr(torch_fw._ParamIds, "__contains__", lambda self, x: lookups.append(1) or real(self, x))
    store.restore(like={"model": m2, "opt": o2})
    assert lookups  # torch asked the groups through the set-backed lists
    assert_same_values(tensors_of(m2, o2), tensors_of(m1, o1))  # type: ignore[arg-type]
    assert [g["lr"] for g in o2.param_groups] == [g["lr"] for g in o1.param_groups]
    assert [len(g["params"]) for g in o2.param_groups] == [100, 200]
    assert all(type(g["params"]) is list for g in o2.param_groups)  # the optimizer keeps its own lists
    ids = torch_fw._ParamIds([3, 1, 2])
    assert 2 in ids and 7 not in ids and list(ids) == [3, 1, 2] and len(ids) == 3
