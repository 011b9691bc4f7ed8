"""One behavioural suite, run on every backend: local disk (rename commit), the manifest-last protocol on a
local directory, memory://, S3 on moto and S3 on SeaweedFS (both real servers over HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError
from ckptstore.storage import FsspecStorage, LocalStorage
from tests.conftest import LOCATIONS, Location

#: Every kind of location (tests/conftest.py): the suite runs on each.
EVERYWHERE = pytest.mark.parametrize("location", list(LOCATIONS), indirect=True)


def spec(location: Location) -> str:
    """How a subprocess opens the same store (see _CHILD)."""
    url, opts = location
    return json.dumps({"url": url, "opts": opts, "fsspec_file": location.kind == "fsspec-local"})


# A second process on the same store. It opens the store from a JSON spec, runs one command and prints a
# JSON answer; "crash" dies (os._exit) at the commit point, after the data files are written.
_CHILD = r"""
import json, os, sys
import fsspec, numpy as np, ckptstore
from ckptstore import storage as st
spec, cmd, step = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if spec["fsspec_file"]:
    store = ckptstore.CheckpointStore(st.FsspecStorage(fsspec.filesystem("file", auto_mkdir=True), spec["url"]))
else:
    store = ckptstore.CheckpointStore(spec["url"], storage_options=spec["opts"] or None)
if cmd == "save":
    store.save(step, {"w": np.full(100, step, dtype=np.float32), "step": step})
elif cmd == "crash":
    def die(self, manifest, *, overwrite):
        os._exit(17)
    st._local._LocalStaging.commit = die
    st._fsspec._FsspecStaging.commit = die
    store.save(step, {"w": np.full(100, step, dtype=np.float32), "step": step})
print(json.dumps({"steps": store.steps(), "latest": store.latest_step(),
                  "restored": None if store.latest_step() is None else store.restore()["step"]}))
"""


def run_child(location: Location, cmd: str, step: int = 0, expect_rc: int = 0) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, spec(location), cmd, str(step)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return json.loads(proc.stdout) if expect_rc == 0 else {}


def raw_files(store: ckptstore.CheckpointStore) -> list[str]:
    """Every file under the store root, relative, listed fresh (the lock file aside)."""
    s = store.storage
    if isinstance(s, LocalStorage):
        out = []
        for d, _, files in os.walk(s.root):
            out += [os.path.relpath(os.path.join(d, f), s.root) for f in files]
        return sorted(f for f in out if f != ".ckptstore.lock")
    assert isinstance(s, FsspecStorage)
    return sorted(s._find())


def state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": np.arange(8, dtype=np.int64) + step},
        "opt": [np.full(3, step, dtype=np.float16), {"lr": 0.5, "name": "adam"}],
        "empty": np.zeros((0, 4), dtype=np.float32),
        "step": step,
    }


def assert_state(got: Any, step: int) -> None:
    want = state(step)
    assert got["step"] == step
    for k in ("w", "b"):
        np.testing.assert_array_equal(got["model"][k], want["model"][k])
        assert got["model"][k].dtype == want["model"][k].dtype
    np.testing.assert_array_equal(got["opt"][0], want["opt"][0])
    assert got["opt"][1] == {"lr": 0.5, "name": "adam"}
    assert got["empty"].shape == (0, 4)


@EVERYWHERE
def test_round_trip(location: Location) -> None:
    store = location.store()
    # Small files, so that one checkpoint spans several tensor files.
    with knobs.override(max_file_bytes=256):
        info = store.save(3, state(3), metadata={"loss": 1.5})
    assert info.step == 3 and info.metadata == {"loss": 1.5}
    assert_state(store.restore(), 3)
    assert_state(store.restore(3, verify=True), 3)
    assert_state(ckptstore.restore(info.path, storage_options=location.storage_options or None), 3)
    assert len([f for f in raw_files(store) if f.endswith(".safetensors")]) >= 2


@EVERYWHERE
def test_steps_latest_info_delete(location: Location) -> None:
    store = location.store()
    assert store.steps() == [] and store.latest_step() is None
    for step in (1, 10, 5):
        store.save(step, state(step), metadata={"step": step})
    assert store.steps() == [1, 5, 10] and store.latest_step() == 10
    info = store.info(5)
    assert info.step == 5 and info.metadata == {"step": 5} and info.nbytes > 0
    assert store.info().step == 10
    store.delete(10)
    assert store.steps() == [1, 5] and store.latest_step() == 5
    assert_state(store.restore(), 5)
    store.delete(1)
    store.delete(5)
    assert store.steps() == []
    assert raw_files(store) == []


@EVERYWHERE
def test_retention(location: Location) -> None:
    store = location.store(max_to_keep=2, keep_every_n_steps=3)
    for step in range(8):
        store.save(step, {"x": np.full(4, step)})
    assert store.steps() == [0, 3, 6, 7]
    # Nothing of a deleted step is left behind.
    dirs = {f.split("/")[0] for f in raw_files(store) if not f.startswith(".")}
    assert dirs == {f"step_{s:08d}" for s in (0, 3, 6, 7)}
    # A new store object on the same root applies its policy to what it finds.
    again = location.store(max_to_keep=1)
    again.save(8, {"x": np.full(4, 8)})
    assert again.steps() == [8]


@EVERYWHERE
def test_overwrite(location: Location) -> None:
    store = location.store()
    store.save(4, state(4))
    store.save(4, state(40), overwrite=True)
    assert store.steps() == [4]
    assert_state(store.restore(4), 40)
    # The replaced checkpoint's files are gone: one manifest, and the tensor files of one writer.
    files = raw_files(store)
    assert sum(f.endswith("manifest.msgpack") for f in files) == 1
    assert len({f.split("tensors-")[1].split("-")[0] for f in files if "tensors-" in f}) == 1


@EVERYWHERE
def test_exists_error_keeps_the_committed_checkpoint(location: Location) -> None:
    store = location.store()
    store.save(2, state(2))
    before = raw_files(store)
    with pytest.raises(CheckpointExistsError, match="step_00000002"):
        store.save(2, state(20))
    assert raw_files(store) == before
    assert_state(store.restore(2), 2)


@EVERYWHERE
def test_not_found(location: Location) -> None:
    store = location.store()
    with pytest.raises(CheckpointNotFoundError):
        store.restore()
    store.save(1, state(1))
    with pytest.raises(CheckpointNotFoundError, match="step_00000002"):
        store.restore(2)
    with pytest.raises(CheckpointNotFoundError, match="step_00000002"):
        store.info(2)
    with pytest.raises(CheckpointNotFoundError, match="step_00000002"):
        store.delete(2)
    assert store.steps() == [1]


@EVERYWHERE
def test_second_store_object_sees_fresh_listings(location: Location) -> None:
    writer, reader = location.store(), location.store()
    assert reader.steps() == []  # a listing that a cache would keep
    writer.save(1, state(1))
    assert reader.steps() == [1]
    assert_state(reader.restore(), 1)
    writer.save(2, state(2))
    assert reader.latest_step() == 2 and reader.info().step == 2
    writer.delete(2)
    assert reader.steps() == [1]
    writer.save(1, state(11), overwrite=True)
    assert_state(reader.restore(1), 11)
    # Retention through a store object that has listed before never works from a stale listing.
    reader_with_policy = location.store(max_to_keep=1)
    assert reader_with_policy.steps() == [1]
    writer.save(3, state(3))
    reader_with_policy.save(4, state(4))
    reader_with_policy.wait_until_finished()  # its retention pass runs after the commit, in the background
    assert writer.steps() == [4]


@pytest.mark.parametrize("location", ["local", "s3", "seaweedfs"], indirect=True)
def test_other_process_sees_checkpoints(location: Location) -> None:
    store = location.store()
    assert store.steps() == []  # listed (and cacheable) before the other process writes
    store.save(6, state(6))
    got = run_child(location, "save", 7)
    assert got == {"steps": [6, 7], "latest": 7, "restored": 7}
    assert store.steps() == [6, 7]
    assert store.restore()["step"] == 7
    store.delete(7)
    store.save(8, state(8))
    assert run_child(location, "list") == {"steps": [6, 8], "latest": 8, "restored": 8}


def _crash_mid_save(location: Location, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies after its data files are written, before its manifest."""
    if location.kind != "memory":
        run_child(location, "crash", step, expect_rc=17)
        return
    # memory:// lives in this process: crash the same way, without the clean-up of a live writer.
    from ckptstore import storage as st

    class Crash(BaseException):
        pass

    def die(self: Any, manifest: bytes, *, overwrite: bool) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(st._fsspec._FsspecStaging, "commit", die)
        m.setattr(st._fsspec._FsspecStaging, "abort", lambda self: None)
        with pytest.raises(Crash):
            location.store().save(step, state(step))


@EVERYWHERE
def test_half_written_step_is_never_listed_and_is_cleaned(location: Location, monkeypatch: pytest.MonkeyPatch) -> None:
    store = location.store()
    store.save(1, state(1))
    _crash_mid_save(location, 2, monkeypatch)
    leftovers = [f for f in raw_files(store) if "step_00000001" not in f]
    assert any(f.endswith(".safetensors") for f in leftovers), "the crashed writer wrote no data"
    assert store.steps() == [1] and store.latest_step() == 1
    assert_state(store.restore(), 1)
    with pytest.raises(CheckpointNotFoundError):
        store.restore(2)
    assert location.store().steps() == [1]
    if location.kind != "local":  # the manifest-last protocol
        # No liveness check on an object store: objects younger than the grace period are left alone
        # (their writer may still be uploading).
        store.save(3, state(3))
        assert set(leftovers) <= set(raw_files(store))
    with knobs.override(stale_after_s=0):
        store.save(4, state(4))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert all("step_00000002" not in f and ".tmp-" not in f for f in raw_files(store)), raw_files(store)
    # The step that was never committed can now be saved normally.
    store.save(2, state(2))
    assert_state(store.restore(2), 2)
