"""The storage contract (tests/storage_contract.py) on every backend: local disk (rename commit), the
manifest-last protocol on a local directory, memory://, S3 on moto and S3 on SeaweedFS (servers over HTTP,
so with shorter loops)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from ckptstore.storage import LocalStorage
from tests.conftest import Location
from tests.faults import FaultyOps
from tests.storage_contract import MakeStorage, StorageContract, fsspec_storages


class TestLocal(StorageContract):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> MakeStorage:
        return lambda plan=None: LocalStorage(tmp_path / "root", ops=FaultyOps(plan) if plan else None)


class TestFsspecLocal(StorageContract):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> MakeStorage:
        return fsspec_storages(str(tmp_path / "root"), fs=fsspec.filesystem("file"))


class TestMemory(StorageContract):
    @pytest.fixture
    def make_storage(self, memory_url: Location) -> MakeStorage:
        return fsspec_storages(*memory_url)


class TestS3(StorageContract):
    race_rounds, commits_listed, writer_races = 6, 8, 3

    @pytest.fixture
    def make_storage(self, s3_url: Location) -> MakeStorage:
        return fsspec_storages(*s3_url)


class TestSeaweedFS(StorageContract):
    race_rounds, commits_listed, writer_races = 6, 8, 3

    @pytest.fixture
    def make_storage(self, weed_url: Location) -> MakeStorage:
        return fsspec_storages(*weed_url)
