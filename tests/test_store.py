"""CheckpointStore's API (steps, latest_step, info, delete, overwrite), ckptstore.save/restore on one directory,
memory:// and the on-disk layout."""

from __future__ import annotations

import os
import pathlib
import time

import fsspec
import msgpack
import numpy as np
import pytest
import safetensors.numpy

import ckptstore
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, StorageError
from tests.conftest import Location

# Tests that take `location` (tests/conftest.py) run on local disk, then on memory://.


def state_of(step: int) -> dict[str, object]:
    return {"w": np.full((4, 3), step, dtype=np.float32), "step": step, "name": f"s{step}"}


# --- listing and info ---------------------------------------------------------------------------------


def test_empty_store(location: Location) -> None:
    store = location.store()
    assert store.steps() == []
    assert store.latest_step() is None
    with pytest.raises(CheckpointNotFoundError):
        store.restore()
    with pytest.raises(CheckpointNotFoundError):
        store.info()
    with pytest.raises(CheckpointNotFoundError):
        store.restore(0)
    with pytest.raises(CheckpointNotFoundError):
        store.delete(0)


def test_steps_latest_and_restore_default(location: Location) -> None:
    store = location.store()
    for step in (5, 1, 30, 12):
        store.save(step, state_of(step))
    assert store.steps() == [1, 5, 12, 30]
    assert store.latest_step() == 30
    assert store.restore()["step"] == 30
    back = store.restore(5)
    assert back["step"] == 5 and back["name"] == "s5"
    assert (back["w"] == 5).all() and back["w"].shape == (4, 3)
    with pytest.raises(CheckpointNotFoundError, match="step_00000006"):
        store.restore(6)


def test_save_returns_info_equal_to_info(location: Location) -> None:
    store = location.store()
    before = time.time()
    meta = {"epoch": 3, "loss": 0.25, "tags": ["a", "b"], "pair": (1, 2), 7: "int key", "none": None}
    saved = store.save(42, state_of(42), metadata=meta)
    after = time.time()
    assert saved.step == 42
    assert before - 1 <= saved.created <= after + 1
    assert saved.metadata == meta
    assert type(saved.metadata["pair"]) is tuple
    assert saved.nbytes >= 4 * 3 * 4
    assert saved.path.rstrip("/").endswith("step_00000042")
    info = store.info(42)
    assert (info.step, info.path, info.created, info.metadata) == (42, saved.path, saved.created, meta)
    assert info.nbytes >= 48
    assert store.info() == info  # default: the latest
    # the path is what ckptstore.restore takes
    back = ckptstore.restore(info.path, storage_options=location.storage_options or None)
    assert back["step"] == 42


def test_info_reads_the_manifest_only(local_url: Location) -> None:
    store = local_url.store()
    store.save(3, state_of(3), metadata={"epoch": 1})
    step_dir = pathlib.Path(store.info(3).path)
    tensor_files = list(step_dir.glob("*.safetensors"))
    assert tensor_files
    for f in tensor_files:  # unreadable: a directory where a file was (chmod does not stop root)
        f.unlink()
        f.mkdir()
    info = store.info(3)
    assert info.metadata == {"epoch": 1} and info.step == 3
    assert store.steps() == [3]
    with pytest.raises(CorruptCheckpointError, match="safetensors"):
        store.restore(3)


def test_info_reads_the_manifest_only_memory(memory_url: Location) -> None:
    store = memory_url.store()
    store.save(3, state_of(3), metadata={"epoch": 1})
    mem = fsspec.filesystem("memory")
    data = [p for p in mem.store if p.endswith(".safetensors")]
    assert data
    for p in data:
        mem.rm_file(p)
    assert store.info(3).metadata == {"epoch": 1}
    with pytest.raises(CorruptCheckpointError, match="missing"):
        store.restore(3)


def test_two_store_objects_see_each_other(location: Location) -> None:
    a, b = location.store(), location.store()
    a.save(1, state_of(1))
    assert b.steps() == [1]
    b.save(2, state_of(2))
    assert a.latest_step() == 2
    a.delete(2)
    assert b.steps() == [1]


# --- delete and overwrite ---------------------------------------------------------------------------


def test_delete(location: Location) -> None:
    store = location.store()
    for step in (1, 2, 3):
        store.save(step, state_of(step))
    store.delete(2)
    assert store.steps() == [1, 3]
    with pytest.raises(CheckpointNotFoundError):
        store.restore(2)
    with pytest.raises(CheckpointNotFoundError):
        store.delete(2)
    assert store.restore(3)["step"] == 3
    store.save(2, state_of(2))  # the step can be saved again
    assert store.steps() == [1, 2, 3]


def test_delete_removes_the_data(local_url: Location) -> None:
    store = local_url.store()
    store.save(1, state_of(1))
    store.delete(1)
    assert not any(n.startswith("step_") for n in os.listdir(local_url.url))
    assert not any(n.startswith((".tmp-", ".trash-")) for n in os.listdir(local_url.url))


def test_delete_removes_the_data_memory(memory_url: Location) -> None:
    store = memory_url.store()
    store.save(1, state_of(1))
    store.save(2, state_of(2))
    store.delete(1)
    keys = list(fsspec.filesystem("memory").store)
    assert keys and not any("step_00000001" in k for k in keys)


def test_existing_step_without_overwrite(location: Location) -> None:
    store = location.store()
    store.save(7, state_of(7), metadata={"v": 1})
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        store.save(7, {"other": 1}, metadata={"v": 2})
    assert store.restore(7)["name"] == "s7"  # untouched
    assert store.info(7).metadata == {"v": 1}


def test_overwrite_replaces_and_old_data_is_gone(location: Location) -> None:
    store = location.store()
    store.save(7, {"a": np.ones(100), "b": np.ones(3)}, metadata={"v": 1})
    old_files = set(files_of(location, 7))
    store.save(7, {"c": np.zeros(2, np.int8)}, metadata={"v": 2}, overwrite=True)
    assert store.steps() == [7]
    back = store.restore(7)
    assert list(back) == ["c"] and back["c"].tolist() == [0, 0]
    assert store.info(7).metadata == {"v": 2}
    new_files = set(files_of(location, 7))
    assert "manifest.msgpack" in new_files
    assert not (old_files - {"manifest.msgpack"}) & new_files  # the old tensor files are gone
    assert len([f for f in new_files if f.endswith(".safetensors")]) == 1


def test_overwrite_of_a_new_step_is_a_plain_save(location: Location) -> None:
    store = location.store()
    store.save(1, state_of(1), overwrite=True)
    assert store.steps() == [1]


def files_of(location: Location, step: int) -> list[str]:
    name = f"step_{step:08d}"
    if "://" not in location.url:
        return os.listdir(os.path.join(location.url, name))
    mem = fsspec.filesystem("memory")
    root = location.url.split("://", 1)[1]
    return [p.rsplit("/", 1)[-1] for p in mem.find(f"/{root}/{name}")]


# --- on-disk layout -----------------------------------------------------------------------------------


def test_layout_on_local_disk(local_url: Location) -> None:
    store = local_url.store()
    store.save(42, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": {"b": np.ones(2, np.int64)}, "k": 1})
    store.save(123456789, {"x": np.zeros(1)})
    names = sorted(os.listdir(local_url.url))
    assert "step_00000042" in names and "step_123456789" in names
    assert not [n for n in names if n.startswith((".tmp-", ".trash-"))]
    step_dir = os.path.join(local_url.url, "step_00000042")
    files = os.listdir(step_dir)
    assert "manifest.msgpack" in files
    tensors = [f for f in files if f.endswith(".safetensors")]
    assert len(tensors) == 1
    # safetensors opens the file by itself; keys are the key paths
    loaded = safetensors.numpy.load_file(os.path.join(step_dir, tensors[0]))
    assert sorted(loaded) == ["n/b", "w"]
    assert loaded["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and loaded["w"].dtype == np.float32
    assert loaded["n/b"].tolist() == [1, 1]
    # the manifest is plain msgpack (extension types only inside the tree)
    with open(os.path.join(step_dir, "manifest.msgpack"), "rb") as f:
        doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    assert doc["format"] == "ckptstore" and doc["version"] == 1 and doc["step"] == 42
    assert [e["name"] for e in doc["files"]] == tensors


def test_layout_on_memory(memory_url: Location) -> None:
    store = memory_url.store()
    store.save(42, {"w": np.arange(3, dtype=np.int16)})
    files = files_of(memory_url, 42)
    assert "manifest.msgpack" in files
    tensors = [f for f in files if f.endswith(".safetensors")]
    assert len(tensors) == 1
    mem = fsspec.filesystem("memory")
    blob = mem.cat_file(f"{store.info(42).path}/{tensors[0]}")
    assert safetensors.numpy.load(blob)["w"].tolist() == [0, 1, 2]


def test_only_committed_directories_are_listed(local_url: Location) -> None:
    store = local_url.store()
    store.save(1, state_of(1))
    root = local_url.url
    os.mkdir(os.path.join(root, "step_00000009"))  # no manifest: not committed
    os.mkdir(os.path.join(root, "step_5"))  # not a step name (no padding)
    os.mkdir(os.path.join(root, "step_000000007"))  # padded beyond 8 digits: not what step_name gives
    with open(os.path.join(root, "step_00000005"), "w") as f:  # a file, not a directory
        f.write("x")
    os.mkdir(os.path.join(root, "other"))
    assert store.steps() == [1]
    with pytest.raises(CheckpointNotFoundError):
        store.restore(9)


def test_store_accepts_pathlike_and_file_url(tmp_path: pathlib.Path) -> None:
    a = ckptstore.CheckpointStore(tmp_path / "run")
    a.save(1, state_of(1))
    b = ckptstore.CheckpointStore(f"file://{tmp_path / 'run'}")
    assert b.steps() == [1]
    assert b.restore()["step"] == 1
    assert os.path.isdir(tmp_path / "run" / "step_00000001")


def test_store_creates_nested_root(tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(str(tmp_path / "a" / "b" / "c"))
    store.save(0, {"x": 1})
    assert store.restore() == {"x": 1}


# --- one directory: ckptstore.save / restore --------------------------------------------------------


def test_single_directory_save_restore(location: Location) -> None:
    path = location.join("final")
    opts = location.storage_options or None
    ckptstore.save(path, state_of(3), metadata={"note": "final"}, storage_options=opts)
    back = ckptstore.restore(path, storage_options=opts)
    assert back["step"] == 3 and back["w"].shape == (4, 3)
    with pytest.raises(CheckpointExistsError):
        ckptstore.save(path, {"x": 1}, storage_options=opts)
    ckptstore.save(path, {"x": 1}, storage_options=opts, overwrite=True)
    assert ckptstore.restore(path, storage_options=opts) == {"x": 1}


def test_single_directory_missing(location: Location) -> None:
    with pytest.raises(CheckpointNotFoundError):
        ckptstore.restore(location.join("nothing"), storage_options=location.storage_options or None)


def test_restore_of_a_store_root_says_so(local_url: Location) -> None:
    store = local_url.store()
    store.save(1, state_of(1))
    with pytest.raises(CheckpointNotFoundError, match="CheckpointStore"):
        ckptstore.restore(local_url.url)


def test_single_directory_records_metadata_step(tmp_path: pathlib.Path) -> None:
    ckptstore.save(tmp_path / "a", {"x": 1}, metadata={"step": 12})
    ckptstore.save(tmp_path / "b", {"x": 1}, metadata={"step": True})  # not a step: recorded as 0
    for name in ("a", "b"):
        assert ckptstore.restore(tmp_path / name) == {"x": 1}
    with open(tmp_path / "a" / "manifest.msgpack", "rb") as f:
        assert msgpack.unpackb(f.read(), raw=False, strict_map_key=False)["step"] == 12
    with open(tmp_path / "b" / "manifest.msgpack", "rb") as f:
        assert msgpack.unpackb(f.read(), raw=False, strict_map_key=False)["step"] == 0


def test_single_directory_leaves_no_temp(tmp_path: pathlib.Path) -> None:
    ckptstore.save(tmp_path / "ck", {"a": np.ones(3)})
    names = [p.name for p in tmp_path.iterdir()]
    assert [n for n in names if not n.startswith(".") or n.startswith((".tmp-", ".trash-"))] == ["ck"]


# --- memory:// ----------------------------------------------------------------------------------------


def test_memory_store_round_trip(memory_url: Location) -> None:
    store = memory_url.store()
    assert store.url.startswith("memory://")
    for step in range(3):
        store.save(step, state_of(step), metadata={"i": step})
    assert store.steps() == [0, 1, 2]
    back = store.restore(1)
    assert back["step"] == 1 and (back["w"] == 1).all()
    assert store.info(2).metadata == {"i": 2}
    store.delete(0)
    assert store.steps() == [1, 2]
    # a fresh store object on the same URL sees the same steps
    assert memory_url.store().steps() == [1, 2]


def test_verify_passes_on_an_intact_checkpoint(location: Location) -> None:
    store = location.store()
    store.save(1, state_of(1))
    assert store.restore(1, verify=True)["step"] == 1
    assert ckptstore.restore(store.info(1).path, verify=True)["name"] == "s1"


def test_single_directory_save_never_replaces_what_is_not_a_checkpoint(tmp_path: pathlib.Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("important")
    (tmp_path / "afile").write_text("x")
    for target in (project, tmp_path / "afile"):
        for overwrite in (False, True):
            with pytest.raises(CheckpointExistsError, match="not a checkpoint"):
                ckptstore.save(target, {"a": 1}, overwrite=overwrite)
    assert (project / "src" / "main.py").read_text() == "important"
    assert (tmp_path / "afile").read_text() == "x"
    (tmp_path / "empty").mkdir()  # an empty directory is fine (made beforehand with makedirs, say)
    ckptstore.save(tmp_path / "empty", {"a": 1})
    assert ckptstore.restore(tmp_path / "empty") == {"a": 1}


def test_store_root_that_is_a_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "afile").write_text("x")
    store = ckptstore.CheckpointStore(tmp_path / "afile")
    with pytest.raises(StorageError):
        store.steps()
    with pytest.raises(StorageError):
        store.save(1, {"a": 1})
    assert (tmp_path / "afile").read_text() == "x"
