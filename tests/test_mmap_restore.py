"""restore(mmap=True): arrays mapped on local tensor files, private and copy-on-write."""

from __future__ import annotations

import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import CorruptCheckpointError


def state() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "odd": np.arange(3, dtype=np.uint8),  # leaves the next tensor at an odd offset
        "b": rng.standard_normal(7).astype(np.float64),
        "h": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.int16),
        "step": 7,
    }


def test_mapped_arrays_equal_read_ones_and_never_write_the_file(tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, state())
    read = store.restore(1)
    mapped = store.restore(1, mmap=True)
    for key, arr in read.items():
        if isinstance(arr, np.ndarray):
            assert mapped[key].dtype == arr.dtype and mapped[key].shape == arr.shape
            assert mapped[key].tobytes() == arr.tobytes()
    assert mapped["step"] == 7
    # the big array is a view of a mapping, not a copy; and it is writable (copy-on-write)
    assert not mapped["w"].flags.owndata and mapped["w"].flags.writeable
    mapped["w"][:] = 0
    assert store.restore(1)["w"].tobytes() == read["w"].tobytes()  # the file is untouched
    store.verify(1)


def test_mapped_arrays_survive_deletion_by_retention(tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "s", max_to_keep=1)
    store.save(1, state())
    expected = store.restore(1)["w"].copy()
    mapped = store.restore(1, mmap=True, verify=False)["w"]
    store.save(2, state())  # retention deletes step 1 and its files
    assert store.steps() == [2] and not os.path.exists(tmp_path / "s" / "step_00000001")
    assert mapped.tobytes() == expected.tobytes()


def test_mmap_with_like_and_framework(tmp_path: pathlib.Path) -> None:
    ckptstore.save(tmp_path / "c", {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    out = ckptstore.restore(tmp_path / "c", mmap=True, like={"w": torch.zeros(3, 4, dtype=torch.float64)})
    assert out["w"].dtype == torch.float64 and out["w"].sum().item() == 66
    out = ckptstore.restore(tmp_path / "c", mmap=True, framework="torch")
    assert isinstance(out["w"], torch.Tensor) and out["w"][2, 3].item() == 11


def test_mmap_still_checks_sizes_and_checksums(tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, state())
    (f,) = (tmp_path / "s" / "step_00000001").glob("*.safetensors")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.restore(1, mmap=True)
    f.write_bytes(bytes(data[:-5]))  # truncated
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        store.restore(1, mmap=True, verify=False)


def test_mmap_is_ignored_where_there_is_no_local_file(memory_url) -> None:  # type: ignore[no-untyped-def]
    store = memory_url.store()
    store.save(1, state())
    out = store.restore(1, mmap=True)
    assert out["w"].tobytes() == state()["w"].tobytes()  # type: ignore[union-attr]


def test_a_mapped_file_truncated_in_place_kills_its_reader_with_sigbus(tmp_path: pathlib.Path) -> None:
    """What the README says of restore(mmap=True): unlinking the file (retention) is safe, truncating it in
    place is not. Shown in a child process, which dies of SIGBUS when it touches the lost pages."""
    import signal
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import glob, os, numpy as np, ckptstore
        store = ckptstore.CheckpointStore({str(tmp_path)!r})
        store.save(1, {{"w": np.ones(1 << 20, np.float32)}})
        state = store.restore(mmap=True, verify=False)
        for f in glob.glob(os.path.join({str(tmp_path)!r}, "step_*", "*.safetensors")):
            os.truncate(f, 4096)
        print(float(state["w"].sum()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stderr[-500:])
