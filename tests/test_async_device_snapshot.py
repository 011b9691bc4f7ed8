"""An async save's snapshot copies tensors on an accelerator device-to-host straight into its (pinned)
buffer: the walk of the state leaves them as DeviceArrays (tree.flatten(defer_devices=True)) and
asyncsave.SnapshotBuffer copies them while it copies the host arrays. Without a GPU the same path is
driven with CPU tensors; the CUDA test runs where a GPU is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.frameworks import torch as torch_fw

CUDA = torch.cuda.is_available()


@pytest.fixture
def cpu_as_device(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CPU tensors take the device path; records the sizes of the host buffers asked for."""
    buffers: list[int] = []
    real = torch_fw.DeviceArray.host_buffer

    def host_buffer(self: Any, nbytes: int) -> Any:
        buffers.append(nbytes)
        return real(self, nbytes)

    monkeypatch.setattr(torch_fw.TorchAdapter, "device_array", lambda self, x: torch_fw.DeviceArray(x))
    monkeypatch.setattr(torch_fw.DeviceArray, "host_buffer", host_buffer)
    return buffers


def state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(64, 32),
        "bf16": torch.randn(100).to(torch.bfloat16),
        "t": torch.randn(16, 8).t(),  # not contiguous
        "i": torch.arange(10),
        "np": np.arange(7.0),
        "step": 3,
    }


def test_device_tensors_are_snapshotted_into_the_buffer_and_isolated(tmp_path: Path, cpu_as_device: list[int]) -> None:
    s = state()
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
    store = ckptstore.CheckpointStore(tmp_path)
    handle = store.save(1, s, blocking=False)
    for k in ("w", "bf16", "t", "i"):  # the training goes on at once: the checkpoint must not see this
        s[k].add_(1)
    handle.result()
    assert len(cpu_as_device) == 1
    got = store.restore(framework="torch")
    for k in ("w", "bf16", "t", "i"):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    np.testing.assert_array_equal(got["np"], want["np"])
    assert got["step"] == 3
    store.save(2, s, blocking=False).result()  # the buffer is kept: no new one
    assert len(cpu_as_device) == 1
    assert torch.equal(store.restore(2, framework="torch")["w"], s["w"])
    store.close()


def test_blocking_saves_take_the_usual_path(tmp_path: Path, cpu_as_device: list[int]) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state())
    assert cpu_as_device == []
    assert torch.equal(store.restore(framework="torch")["w"], state()["w"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the accelerator machine)")
def test_cuda_tensors_are_snapshotted_into_pinned_memory(tmp_path: Path) -> None:
    s = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in state().items()}
    want = {k: (v.cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
    store = ckptstore.CheckpointStore(tmp_path)
    handle = store.save(1, s, blocking=False)
    for k in ("w", "bf16", "t", "i"):
        s[k].add_(1)
    handle.result()
    got = store.restore(framework="torch")
    for k in ("w", "bf16", "t", "i"):
        assert torch.equal(got[k], want[k]), k
    (kept,) = store._saver._free  # the snapshot buffer, kept for the next save
    assert kept._buf is not None and torch.from_numpy(kept._buf).is_pinned()
    store.close()
