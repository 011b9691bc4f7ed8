"""The storage boundary: what the backends promise about paths and errors, beyond the behaviour suite.

* a store given as an ``FsspecStorage`` with a relative root lists, restores and applies retention;
* a checkpoint deleted while a reader lists its files is a missing file, never a raw ``FileNotFoundError``;
* a data file whose writer fails part-way is discarded: an upload in parts is aborted, never completed;
* every failure of a filesystem call comes out of the storage as a :class:`StorageError` naming the path,
  with the errno kept.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CkptStoreError, StorageError
from ckptstore.storage import TRASH_PREFIX, FsspecStorage, LocalOps, LocalStorage, new_token, open_storage
from tests.conftest import Location
from tests.s3proxy import FaultProxy


def test_fsspec_storage_with_a_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = FsspecStorage(fsspec.filesystem("file", auto_mkdir=True), "rel")
    store = ckptstore.CheckpointStore(storage, max_to_keep=1)
    store.save(1, {"w": np.arange(3)})
    assert store.steps() == [1]
    np.testing.assert_array_equal(store.restore()["w"], np.arange(3))
    store.save(2, {"w": np.arange(4)})
    assert store.steps() == [2]  # retention deleted step 1
    step1 = [p for p in (tmp_path / "rel").rglob("*") if "step_00000001" in str(p) and p.is_file()]
    assert step1 == []  # (a filesystem with real directories keeps the empty directory)


def test_sizes_of_a_directory_emptied_while_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "d").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "d" / name).write_bytes(b"x" * 3)
    real_scandir = os.scandir

    def scandir_then_delete(path: Any) -> Any:
        entries = list(real_scandir(path))
        os.unlink(os.path.join(path, "b"))  # retention deleting under the reader, after the listing
        return iter(entries)

    monkeypatch.setattr("ckptstore.storage._local.os.scandir", scandir_then_delete)
    assert storage.sizes("d") == {"a": 3, "c": 3}


def test_a_failed_upload_in_parts_is_aborted_not_completed(s3_proxy: tuple[Location, FaultProxy]) -> None:
    loc, proxy = s3_proxy
    storage = open_storage(loc.url, loc.storage_options)
    staging = storage.begin("step_00000001", new_token())

    def fill(f: Any) -> None:
        f.write(b"\0" * (12 << 20))  # two parts of 5 MiB go up, the rest waits in the buffer
        raise RuntimeError("the writer fails")

    with knobs.override(upload_part_bytes=5 << 20), pytest.raises(RuntimeError, match="the writer fails"):
        staging.write("data.safetensors", fill)
    methods = [(r.method, r.query) for r in proxy.requests]
    assert any(m == "DELETE" and "uploadId=" in q for m, q in methods), methods  # AbortMultipartUpload
    assert not any(m == "POST" and "uploadId=" in q for m, q in methods), methods  # no CompleteMultipartUpload
    staging.abort()
    assert storage.sizes("step_00000001") == {}


class FailingOps(LocalOps):
    """Every call of one kind fails with an errno."""

    def __init__(self, kind: str, code: int) -> None:
        self.kind, self.code = kind, code

    def _maybe_fail(self, kind: str, path: str) -> None:
        if kind == self.kind:
            raise OSError(self.code, os.strerror(self.code), path)

    def mkdir(self, path: str) -> None:
        self._maybe_fail("mkdir", path)
        super().mkdir(path)

    def create(self, path: str) -> Any:
        self._maybe_fail("create", path)
        return super().create(path)

    def fsync(self, f: Any) -> None:
        self._maybe_fail("fsync", f.name)
        super().fsync(f)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename", src)
        if os.path.basename(dst).startswith(TRASH_PREFIX):  # a deletion (a step renamed away), after a commit
            self._maybe_fail("delete", src)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._maybe_fail("unlink", path)
        super().unlink(path)


@pytest.mark.parametrize("kind", ["mkdir", "create", "fsync", "rename"])
def test_filesystem_failures_are_storage_errors_with_their_errno(tmp_path: Path, kind: str) -> None:
    good = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=1)
    good.save(1, {"w": np.arange(3)})
    store = ckptstore.CheckpointStore(LocalStorage(tmp_path / "run", FailingOps(kind, errno.EIO)), max_to_keep=1)
    with pytest.raises(StorageError) as info:
        store.save(2, {"w": np.arange(4)})
    err = info.value
    assert err.errno == errno.EIO and str(tmp_path / "run") in str(err), err
    steps = good.steps()  # a failed deletion comes after the commit: step 2 is there, step 1 too
    assert steps in ([1], [1, 2]), steps
    assert ("step 2 is committed" in str(err)) == (2 in steps), err
    np.testing.assert_array_equal(good.restore()["w"], np.arange(4 if 2 in steps else 3))


@pytest.mark.background_retention
def test_a_failed_retention_never_fails_the_save_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention runs after the commit, in the background: its failure is logged as a warning, reported on
    the next save's result, and retried by that save."""
    good = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=1)
    good.save(1, {"w": np.arange(3)})
    store = ckptstore.CheckpointStore(LocalStorage(tmp_path / "run", FailingOps("delete", errno.EIO)), max_to_keep=1)
    assert store.save(2, {"w": np.arange(4)}).retention_failure is None
    store.wait_until_finished()
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("after step 2 failed" in m and "committed" in m and os.strerror(errno.EIO) in m for m in logged), logged
    info = store.save(3, {"w": np.arange(5)})
    assert info.retention_failure is not None and os.strerror(errno.EIO) in info.retention_failure
    assert good.steps() == [1, 2, 3]  # nothing deleted, nothing lost
    assert good.save(4, {"w": np.arange(6)}).retention_failure is None
    good.wait_until_finished()
    assert good.steps() == [4]
    np.testing.assert_array_equal(good.restore()["w"], np.arange(6))


def test_reads_of_a_missing_store_are_named(tmp_path: Path) -> None:
    file_not_dir = tmp_path / "f"
    file_not_dir.write_bytes(b"")
    with pytest.raises(StorageError, match="is a file"):
        ckptstore.CheckpointStore(file_not_dir).steps()
    storage = LocalStorage(tmp_path / "nothing")
    assert storage.committed_steps() == [] and storage.sizes("x") == {} and storage.listdir(".leases") == []
    with pytest.raises(CkptStoreError):
        storage.open_read("step_00000001/a.safetensors")


def test_import_works_without_fcntl() -> None:
    """Windows has no fcntl: importing ckptstore (and using remote stores) must still work there; a local
    store then refuses to write with a named error."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import ckptstore, tempfile, numpy as np\n"
        "from ckptstore.errors import StorageError\n"
        "store = ckptstore.CheckpointStore(tempfile.mkdtemp())\n"
        "try:\n"
        "    store.save(1, {'w': np.arange(3)})\n"
        "except StorageError as e:\n"
        "    assert 'flock' in str(e), e\n"
        "    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stderr


def test_a_manifest_too_large_to_read_back_is_refused_before_it_is_published(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(1, {"w": np.arange(3)})
    big = {f"k{i}": np.full(2, i) for i in range(200)}
    with (
        knobs.override(max_manifest_bytes=4000),
        pytest.raises(ckptstore.errors.UnsupportedTypeError, match="max_manifest"),
    ):
        store.save(2, big)
    assert store.steps() == [1]
    assert [p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".ckptstore")] == ["step_00000001"]
    store.save(2, big)  # under the default limit it is fine
    assert sorted(store.restore(2)) == sorted(big)


def test_a_directory_saved_under_a_step_name_restores(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "step_00000005", {"w": np.arange(3)})
    np.testing.assert_array_equal(ckptstore.restore(tmp_path / "step_00000005")["w"], np.arange(3))
    assert ckptstore.CheckpointStore(tmp_path).info(5).step == 5
