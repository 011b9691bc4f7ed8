"""Transient and permanent failures on S3, injected for real by an HTTP proxy in front of moto: retried
with backoff when transient; when not, a StorageError, no committed checkpoint, the previous ones intact."""

from __future__ import annotations

import numpy as np
import pytest

from ckptstore import knobs
from ckptstore.errors import StorageError
from ckptstore.storage import FsspecStorage
from tests.conftest import Location
from tests.s3proxy import FaultProxy, Request

Proxied = tuple[Location, FaultProxy]


def is_tensor_put(r: Request) -> bool:
    return r.method == "PUT" and ".safetensors" in r.path


def is_manifest_put(r: Request) -> bool:
    return r.method == "PUT" and r.path.endswith("/manifest.msgpack")


def is_ranged_get(r: Request) -> bool:
    return r.method == "GET" and ".safetensors" in r.path


def is_listing(r: Request) -> bool:
    return r.method == "GET" and "list-type=2" in r.query


def state(k: int) -> dict[str, np.ndarray]:
    return {"a": np.arange(100, dtype=np.float32) + k, "b": np.full((4, 4), k, dtype=np.int64)}


def objects(loc: Location) -> list[str]:
    storage = loc.store().storage
    assert isinstance(storage, FsspecStorage)
    return sorted(storage._find())


@pytest.mark.parametrize(
    ("where", "action"),
    [
        (is_tensor_put, "503"),
        (is_tensor_put, "reset"),
        (is_manifest_put, "500"),
        (is_manifest_put, "reset"),
        (is_ranged_get, "500"),
        (is_ranged_get, "reset"),
        (is_listing, "503"),
    ],
    ids=lambda x: x if isinstance(x, str) else x.__name__[3:],
)
def test_transient_failures_are_retried(s3_proxy: Proxied, action: str, where: object) -> None:
    loc, proxy = s3_proxy
    store = loc.store()
    store.save(1, state(1))
    # More failures in a row than botocore's 3 attempts: ckptstore's own retry has to step in too.
    rule = proxy.fail(where, action, times=4)  # type: ignore[arg-type]
    with knobs.override(retry_base_s=0.01):
        store.save(2, state(2))
        got = loc.store().restore(2)
    assert rule.hits == 4, "the fault was never injected"
    np.testing.assert_array_equal(got["a"], state(2)["a"])
    np.testing.assert_array_equal(got["b"], state(2)["b"])
    assert loc.store().steps() == [1, 2]


@pytest.mark.parametrize("where", [is_tensor_put, is_manifest_put], ids=["tensor-put", "manifest-put"])
def test_a_save_that_fails_for_good_commits_nothing(s3_proxy: Proxied, where: object) -> None:
    loc, proxy = s3_proxy
    store = loc.store(max_to_keep=1)
    store.save(1, state(1))
    before = objects(loc)
    rule = proxy.fail(where, "500", times=10**6)  # type: ignore[arg-type]
    with knobs.override(retries=1, retry_base_s=0.01), pytest.raises(StorageError, match="step_00000002"):
        store.save(2, state(2))
    assert rule.hits >= 2
    proxy.clear()
    assert store.steps() == [1] and loc.store().steps() == [1]
    np.testing.assert_array_equal(store.restore()["a"], state(1)["a"])
    assert objects(loc) == before  # the failed save's data objects were removed, nothing else touched
    store.save(2, state(2))  # and the step can be saved once the store answers again
    assert store.steps() == [2]


def test_multipart_upload_in_parallel_parts_survives_a_failed_part(s3_proxy: Proxied) -> None:
    loc, proxy = s3_proxy
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: three parts of 5 MiB or less
    rule = proxy.fail(lambda r: r.method == "PUT" and "partNumber=2" in r.query, "503", times=4)
    with knobs.override(upload_part_bytes=5 << 20, io_threads=3, retry_base_s=0.01):
        loc.store().save(1, {"big": big})
    assert rule.hits == 4
    parts = {r.query for r in proxy.requests if r.method == "PUT" and "partNumber=" in r.query and r.status == 200}
    assert len(parts) == 3
    with knobs.override(read_part_bytes=4 << 20):
        proxy.clear()
        got = loc.store().restore(1, verify=True)
    np.testing.assert_array_equal(got["big"], big)
    gets = [r for r in proxy.requests if is_ranged_get(r)]
    assert len(gets) == 3 and all(r.range for r in gets)  # 12 MiB + header in 4 MiB ranged GETs
