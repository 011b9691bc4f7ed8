"""Exact resume: a run stopped after a save and resumed in a NEW process (fresh objects, restore with like=)
ends bit-identical to a run that never stopped: parameters, Adam's moments, the loss curve."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ckptstore

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOTAL = 14


def run_worker(store: pathlib.Path, out: pathlib.Path, *extra: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "tests.resume_worker", str(store), str(out), "--total", str(TOTAL), *extra],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    return load_file(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return run_worker(tmp / "store", tmp / "out.safetensors")


@pytest.mark.parametrize("stop", [6, 9])  # on an epoch boundary (epochs are 6 steps) and mid-epoch
def test_resume_in_a_new_process_is_bit_identical(
    tmp_path: pathlib.Path, uninterrupted: dict[str, torch.Tensor], stop: int
) -> None:
    store = tmp_path / "store"
    first = run_worker(store, tmp_path / "first.safetensors", "--stop", str(stop))
    assert first["step"].tolist() == [stop, stop]
    assert ckptstore.CheckpointStore(store).latest_step() == stop
    resumed = run_worker(store, tmp_path / "resumed.safetensors", "--resume")

    assert resumed["step"].tolist() == [TOTAL, TOTAL]
    assert resumed.keys() == uninterrupted.keys()
    for name, want in uninterrupted.items():
        assert torch.equal(resumed[name], want), name
    # the restored run really continued: its loss curve starts with the first run's
    assert torch.equal(resumed["losses"][:stop], first["losses"])
    assert ckptstore.CheckpointStore(store).steps() == [9, 12]  # max_to_keep=2 held across both processes


def test_weights_only_resume_differs(tmp_path: pathlib.Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    """The control that shows the test above can fail: restoring the weights but not the optimizer, the LR
    schedule, the data order and the RNGs continues differently."""
    store = tmp_path / "store"
    run_worker(store, tmp_path / "first.safetensors", "--stop", "6")
    partial = run_worker(store, tmp_path / "partial.safetensors", "--weights-only")
    assert partial["step"].tolist()[0] == TOTAL
    assert torch.equal(partial["losses"][:6], uninterrupted["losses"][:6])
    assert not torch.equal(partial["losses"][6:], uninterrupted["losses"][6:])
    assert not torch.equal(partial["param/0.weight"], uninterrupted["param/0.weight"])
