"""The manifest-last commit on real S3 servers (moto, SeaweedFS): two writers of one step, the lost-response
retry trap, and leftovers of the loser."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from ckptstore import distributed, pipeline
from ckptstore.errors import CheckpointExistsError
from ckptstore.storage import FsspecStorage
from tests.conftest import Location
from tests.s3proxy import FaultProxy

#: Real S3 servers: moto, then SeaweedFS.
S3_LIKE = pytest.mark.parametrize("location", ["s3", "seaweedfs"], indirect=True)


def objects(storage: FsspecStorage) -> list[str]:
    return sorted(storage._find())


@S3_LIKE
def test_second_writer_of_a_step_gets_exists_error_and_leaves_nothing(
    location: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = location.store(), location.store()
    a.save(5, {"w": np.full(64, 1.0)})
    assert isinstance(b.storage, FsspecStorage)
    before = objects(b.storage)
    # Writer B gets past the early "already committed?" check (it looked before A committed) and uploads
    # its data; only the conditional PUT of its manifest stops it.
    monkeypatch.setattr(pipeline, "ensure_free", lambda *args: None)
    with pytest.raises(CheckpointExistsError, match="step_00000005"):
        pipeline.save(
            b.storage,
            "step_00000005",
            5,
            lambda: pipeline.prepare({"w": np.full(64, 2.0)}, None),
            overwrite=False,
            coordinator=distributed.SINGLE,
        )
    assert objects(b.storage) == before  # B's data objects are gone, A's untouched
    np.testing.assert_array_equal(b.restore(5)["w"], np.full(64, 1.0))


_RACER = r"""
import json, sys, time
import numpy as np, ckptstore
url, opts, me, t0 = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
store = ckptstore.CheckpointStore(url, storage_options=opts)
while time.time() < t0:
    time.sleep(0.001)
try:
    store.save(9, {"who": np.full(1000, me, dtype=np.int32), "me": me})
    print("committed")
except ckptstore.errors.CheckpointExistsError:
    print("exists")
"""


@S3_LIKE
def test_concurrent_writers_of_one_step_exactly_one_commits(location: Location) -> None:
    url, opts = location
    start_at = time.time() + 4  # all processes are up and importing is done by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, url, json.dumps(opts), str(me), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    answers = [o.strip() for o, _ in outs]
    assert sorted(answers) == ["committed", "exists", "exists", "exists"], answers
    winner = answers.index("committed")
    store = location.store()
    got = store.restore(9)
    assert got["me"] == winner
    np.testing.assert_array_equal(got["who"], np.full(1000, winner, dtype=np.int32))
    assert isinstance(store.storage, FsspecStorage)
    tokens = {f.split("tensors-")[1].split("-")[0] for f in objects(store.storage) if "tensors-" in f}
    assert len(tokens) == 1  # the losers removed their data objects


def test_lost_response_of_the_manifest_put_is_not_a_conflict(s3_proxy: tuple[Location, FaultProxy]) -> None:
    loc, proxy = s3_proxy
    store = loc.store()
    store.save(1, {"w": np.arange(10)})

    def manifest_put(r: object) -> bool:
        return getattr(r, "method", "") == "PUT" and getattr(r, "path", "").endswith("/manifest.msgpack")

    rule = proxy.fail(manifest_put, "lost")
    info = store.save(2, {"w": np.arange(10) * 2})  # no CheckpointExistsError for our own manifest
    assert rule.hits == 1
    puts = [r for r in proxy.requests if manifest_put(r) and "step_00000002" in r.path]
    assert [r.fault for r in puts][:1] == ["lost"] and len(puts) >= 2
    assert puts[-1].status == 412  # the retry of the PUT that had succeeded, refused by If-None-Match
    assert info.step == 2 and store.steps() == [1, 2]
    np.testing.assert_array_equal(loc.store().restore(2)["w"], np.arange(10) * 2)
