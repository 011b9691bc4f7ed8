"""Restores into device tensors go through a bounce buffer (ckptstore.bounce): windows of the file read into
one half while the other half's copies run, a half reused only after its fence. Without a GPU the same
pipeline is driven with CPU tensors as its targets; the CUDA tests run where a GPU is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import bounce, knobs, load, tensorio
from ckptstore.errors import CorruptCheckpointError, CorruptCheckpointWarning
from ckptstore.frameworks import torch as torch_fw
from ckptstore.manifest import TensorEntry
from ckptstore.storage import step_name

CUDA = torch.cuda.is_available()


def trained(seed: int, device: str = "cpu", steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.LayerNorm(300), torch.nn.Linear(300, 8)).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(16, 64, device=device)).pow(2).mean().backward()
        opt.step()
    return m, opt


def tensors_of(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture
def cpu_through_bounce(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CPU tensors of `like` take the bounce-buffer path, as CUDA tensors do; counts the targets made."""
    made: list[int] = []
    real = torch_fw.TorchAdapter.fill_view

    def fill_view(self: Any, x: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        if real(self, x, dtype, shape) is None:
            return None
        made.append(1)
        return self.device_target(x)

    monkeypatch.setattr(torch_fw.TorchAdapter, "fill_view", fill_view)
    monkeypatch.setattr(torch_fw.BounceBuffer, "_kept", None)
    return made


@pytest.mark.parametrize("bounce_bytes", [4096, 1 << 20])  # halves smaller than a tensor, and larger
def test_module_and_optimizer_are_filled_through_the_bounce_buffer(
    bounce_bytes: int, tmp_path: Path, cpu_through_bounce: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, opt = trained(0)
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m, "opt": opt, "step": 1})
    want = {k: v.clone() for k, v in tensors_of(m, opt).items()}
    m2, opt2 = trained(1)
    ptrs = {k: v.data_ptr() for k, v in tensors_of(m2, opt2).items()}
    fresh: list[int] = []
    real_new = tensorio.new_buffer
    monkeypatch.setattr(tensorio, "new_buffer", lambda n: fresh.append(n) or real_new(n))
    with knobs.override(bounce_bytes=bounce_bytes, chunk_bytes=1024, read_threads=3):
        out = store.restore(like={"model": m2, "opt": opt2, "step": 0})
        buffer = torch_fw.BounceBuffer._kept
        store.restore(like={"model": m2, "opt": opt2, "step": 0})  # a second restore reuses the buffer
    assert out["step"] == 1 and out["model"] is m2
    got = tensors_of(m2, opt2)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs
    assert len(cpu_through_bounce) >= len(want) - 1  # every tensor but the optimizer's step counters
    assert sum(fresh) == 0  # no host copy of the state: only the bounce buffer
    assert buffer is not None and buffer.host.nbytes == bounce_bytes
    assert torch_fw.BounceBuffer._kept is buffer


def test_a_damaged_tensor_fails_its_checksum_and_fallback_restores_the_older_step(
    tmp_path: Path, cpu_through_bounce: list[int]
) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    m1, o1 = trained(0)
    store.save(1, {"model": m1, "opt": o1})
    m2, o2 = trained(1, steps=3)
    store.save(2, {"model": m2, "opt": o2})
    want1 = {k: v.clone() for k, v in tensors_of(m1, o1).items()}
    man = load.read_manifest(store.storage, step_name(2))
    big = max(man.tensors, key=lambda e: e.nbytes)
    path = Path(store.url, step_name(2), man.files[big.file].name)
    data = bytearray(path.read_bytes())
    data[big.offset + big.nbytes - 3] ^= 0x01  # in the tensor's last window
    path.write_bytes(data)
    m, opt = trained(5)
    with (
        knobs.override(bounce_bytes=8192),
        pytest.raises(CorruptCheckpointError, match=rf"{big.name!r} fails its checksum.*partly overwritten"),
    ):
        store.restore(2, like={"model": m, "opt": opt})
    with knobs.override(bounce_bytes=8192), pytest.warns(CorruptCheckpointWarning, match="restored step 1"):
        store.restore(like={"model": m, "opt": opt}, fallback=True)
    for k, v in tensors_of(m, opt).items():
        assert torch.equal(v, want1[k]), k


def test_windows_cut_the_file_into_contiguous_runs_of_at_most_the_size() -> None:
    def e(name: str, offset: int, nbytes: int) -> TensorEntry:
        return TensorEntry(name=name, file=0, offset=offset, nbytes=nbytes, dtype="U8", shape=(nbytes,), xxh3=0)

    items: list[Any] = [(e("a", 0, 10), None), (e("b", 10, 25), None), (e("c", 100, 4), None)]
    assert bounce.windows(items, 16) == [
        [(0, 0, 0, 10), (1, 0, 10, 6)],
        [(1, 6, 16, 16)],
        [(1, 22, 32, 3)],
        [(2, 0, 100, 4)],  # not adjacent: a window of its own
    ]


class LateCopies:
    """A device whose copies happen only when the fence is waited for (as a DMA engine reads the host
    bytes some time after the copy is issued): a pipeline that reuses a half too early gets wrong bytes."""

    def __init__(self, nbytes: int, pending: list[Callable[[], None]]) -> None:
        self.memory = np.zeros(nbytes, np.uint8)
        self.nbytes = nbytes
        self.address = ("late", id(self))
        self.pending = pending

    def copy_in(self, offset: int, host: np.ndarray) -> None:
        def land(dst: np.ndarray = self.memory[offset : offset + host.nbytes], src: np.ndarray = host) -> None:
            dst[:] = src

        self.pending.append(land)

    def bounce_buffer(self, nbytes: int) -> Any:
        pending = self.pending

        class Buffer:
            host = np.zeros(nbytes, np.uint8)

            def fence(self) -> Callable[[], None]:
                mine = list(pending)
                pending.clear()
                return lambda: [land() for land in mine] and None

        return Buffer()


def test_a_half_is_read_into_again_only_after_its_copies_landed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, n, dtype=np.uint8) for n in (5000, 123, 7000, 1)]
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {f"t{i}": a for i, a in enumerate(arrays)})
    man = load.read_manifest(store.storage, step_name(1))
    pending: list[Callable[[], None]] = []
    entries = sorted(man.tensors, key=lambda e: e.offset)
    targets = [LateCopies(e.nbytes, pending) for e in entries]
    f = store.storage.open_read(f"{step_name(1)}/{man.files[0].name}")
    try:
        with knobs.override(bounce_bytes=2048, chunk_bytes=300):
            bounce.fill(f, list(zip(entries, targets)), verify=True, source="test")
    finally:
        f.close()
    by_name = {e.name: t.memory for e, t in zip(entries, targets)}
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(by_name[f"t{i}"], a)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the accelerator machine)")
def test_cuda_module_and_optimizer_are_filled_in_place_through_pinned_memory(tmp_path: Path) -> None:
    m, opt = trained(0, "cuda")
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"model": m, "opt": opt})
    want = {k: v.clone() for k, v in tensors_of(m, opt).items()}
    m2, opt2 = trained(1, "cuda")
    ptrs = {k: v.data_ptr() for k, v in tensors_of(m2, opt2).items()}
    with knobs.override(bounce_bytes=1 << 16):
        store.restore(like={"model": m2, "opt": opt2})
    torch.cuda.synchronize()
    got = tensors_of(m2, opt2)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs
    kept = torch_fw.BounceBuffer._kept
    assert kept is not None and kept._tensor.is_pinned()
