"""JAX multi-process saves and restores with real processes: ``jax.distributed`` on 127.0.0.1, CPU
devices (2 per process), gloo collectives; one OS process per JAX process (tests/jax_mp_worker.py), on
local disk and on S3 (moto over HTTP).

The global arrays are not fully addressable: each process holds only its devices' blocks. Each process
writes only blocks of its own devices, each distinct block once across the job; a restore builds each
device's block from the stored blocks that overlap it, on any number of processes and any mesh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptstore
from ckptstore import block_read, blocks, distributed, load, pipeline
from ckptstore.errors import DistributedError, ShardingError, StructureMismatchError
from tests import jax_mp_worker
from tests.conftest import Location
from tests.s3server import free_port

WORKER = str(Path(jax_mp_worker.__file__).resolve())
JOB_TIMEOUT = 90.0  # a whole job, jax import and distributed start included, on a busy 2-core machine


def launch(
    tmp_path: Path,
    location: Location,
    processes: int,
    phases: list[dict[str, Any]],
    *,
    kill: tuple[int, Path] | None = None,
    **extra: Any,
) -> tuple[list[int | None], list[dict[str, Any] | None], float | None]:
    """Run a job of ``processes`` JAX processes; return each one's exit code, its report (None if it wrote
    none) and, with ``kill=(process, marker)``, the seconds the other processes took to end after that
    process was killed with SIGKILL (as soon as it created ``marker``)."""
    out = tmp_path / f"job-{time.monotonic_ns()}"
    out.mkdir()
    cfg = {
        "coordinator": f"127.0.0.1:{free_port()}",
        "processes": processes,
        "url": location.url,
        "storage_options": location.storage_options,
        "phases": phases,
        "out": str(out),
        **extra,
    }
    (out / "cfg.json").write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "OMP_NUM_THREADS": "1",
    }
    logs = [open(out / f"log{p}.txt", "wb") for p in range(processes)]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(out / "cfg.json"), str(p)], env=env, stdout=logs[p], stderr=subprocess.STDOUT
        )
        for p in range(processes)
    ]
    deadline = time.monotonic() + JOB_TIMEOUT
    ended_after: float | None = None
    try:
        if kill is not None:
            victim, marker = kill
            while not marker.exists():
                assert time.monotonic() < deadline, "the process to kill never started writing"
                assert procs[victim].poll() is None, "the process to kill ended by itself"
                time.sleep(0.02)  # polling a file (the marker), not waiting for an outcome
            procs[victim].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            ended_after = time.monotonic() - killed_at
        codes: list[int | None] = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        text = "\n".join((out / f"log{p}.txt").read_text(errors="replace")[-3000:] for p in range(processes))
        pytest.fail(f"the job did not end within {JOB_TIMEOUT} s:\n{text}")
    finally:
        for f in logs:
            f.close()
    reports: list[dict[str, Any] | None] = []
    for k in range(processes):
        path = out / f"rank{k}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    for k, r in enumerate(reports):
        if r is not None and "error" in r and kill is None:
            pytest.fail(f"process {k}: {r['error']}\n{r['traceback']}\n{(out / f'log{k}.txt').read_text()[-3000:]}")
    return codes, reports, ended_after


def full_state() -> dict[str, Any]:
    return {name: jax_mp_worker.expected(name) for name, *_ in jax_mp_worker.ARRAYS}


def nbytes(name: str) -> int:
    return int(jax_mp_worker.expected(name).nbytes)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "s3":
        loc = request.getfixturevalue("s3_url")
        assert isinstance(loc, Location)
        return loc
    return Location(str(tmp_path / "store"), {})


@pytest.mark.slow
@pytest.mark.multiprocess
def test_save_on_two_restore_on_two_with_another_mesh_and_on_one(tmp_path: Path, where: Location) -> None:
    phases = [
        {"kind": "save", "step": 3},
        # the saved layout, another mesh shape, and replicated <-> sharded (w replicated, r sharded)
        {"kind": "restore", "mesh": "2x2", "verify": False},
        {"kind": "restore", "mesh": "4x1", "specs": {"w": [], "r": ["x"], "b": ["x"]}, "arrays_as_like": True},
    ]
    codes, reports, _ = launch(tmp_path, where, 2, phases)
    assert codes == [0, 0]
    assert [r["coordinator"] for r in reports if r] == ["JaxDistributed", "JaxDistributed"]
    for r in reports:
        assert r is not None and r["saved"] == 3
        for restore in r["restores"]:
            assert restore["problems"] == []
    # verify=False: each process read exactly its devices' blocks of the sharded arrays, no more: half of
    # w (2 of 4 blocks), half of h; b and m are split over "y" only: each process needs all of them.
    for r in reports:
        assert r is not None
        read = r["restores"][0]["read"]
        assert read["w"] == nbytes("w") // 2
        assert read["h"] == nbytes("h") // 2
        assert read["b"] == nbytes("b")

    # The checkpoint as one manifest: every distinct block once, written by the process that holds it,
    # replicated blocks balanced; plain readers see the global arrays.
    store = ckptstore.CheckpointStore(where.url, storage_options=where.storage_options or None)
    m = load.read_manifest(store.storage, "step_00000003")
    names = sorted(t.name for t in m.tensors)
    assert names == sorted(
        [
            *("w@0,0", "w@0,3", "w@4,0", "w@4,3", "b@0", "b@4", "h@0,0", "h@2,0", "r", "m@0,0", "m@0,1"),
            *("z@0,0", "z@2,0", "e@0,0", "e@2,0", "c@0", "c@2", "k@0", "k@2"),
        ]
    )
    assert len({f.name for f in m.files}) == 2  # one file per process
    # Each block was written by a process whose devices hold it (process 0: rows 0-3 of the 2x2 mesh's
    # "x" axis, process 1: rows 4-7); blocks both hold were shared out, each process writing some bytes.
    writer = {t.name: int(m.files[t.file].name.split("-r")[1][:5]) for t in m.tensors}
    assert [writer[n] for n in ("w@0,0", "w@0,3", "w@4,0", "w@4,3", "h@0,0", "h@2,0", "z@0,0", "z@2,0")] == [
        0,
        0,
        1,
        1,
        0,
        1,
        0,
        1,
    ]
    got = store.restore(3)
    for name, want in full_state().items():
        np.testing.assert_array_equal(got[name], want)
    assert got["b"].dtype == ml_dtypes.bfloat16
    assert got["step_count"] == 7

    # On one process (2 devices): the same arrays on its own mesh.
    codes, reports, _ = launch(
        tmp_path, where, 1, [{"kind": "restore", "mesh": "1x2", "step": 3}, {"kind": "restore", "mesh": "2x1"}]
    )
    assert codes == [0]
    assert reports[0] is not None and [x["problems"] for x in reports[0]["restores"]] == [[], []]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_save_on_one_restore_on_two(tmp_path: Path) -> None:
    where = Location(str(tmp_path / "store"), {})
    codes, reports, _ = launch(tmp_path, where, 1, [{"kind": "save", "step": 1, "mesh": "1x2"}])
    assert codes == [0] and reports[0] is not None and reports[0]["saved"] == 1
    assert reports[0]["coordinator"] == "SingleProcess"
    codes, reports, _ = launch(tmp_path, where, 2, [{"kind": "restore", "mesh": "2x2"}])
    assert codes == [0, 0]
    assert all(r is not None and r["restores"][0]["problems"] == [] for r in reports)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_async_save_on_two_processes_commits_while_they_compute(tmp_path: Path) -> None:
    # With a per-rank value (ckptstore.PerRank) of each process's own size: each gets its own back.
    where = Location(str(tmp_path / "store"), {})
    codes, reports, _ = launch(tmp_path, where, 2, [{"kind": "save", "step": 3, "blocking": False, "per_rank": True}])
    assert codes == [0, 0]
    assert all(r is not None and r["saved"] == 3 for r in reports)
    assert reports[0]["sum"] == reports[1]["sum"]  # both processes took part in the computation
    codes, reports, _ = launch(tmp_path, where, 2, [{"kind": "restore", "mesh": "2x2", "per_rank": True}])
    assert codes == [0, 0]
    assert all(r is not None and r["restores"][0]["problems"] == [] for r in reports)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.crash
@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_killed_during_the_save_commits_nothing(tmp_path: Path, victim: int) -> None:
    where = Location(str(tmp_path / "store"), {})
    marker = tmp_path / "writing"
    phases = [{"kind": "save", "step": 5, "kill_rank": victim, "kill_marker": str(marker)}]
    codes, reports, ended_after = launch(
        tmp_path, where, 2, phases, kill=(victim, marker), timeout_s=15, heartbeat_s=5, shutdown=False
    )
    assert codes[victim] == -signal.SIGKILL
    # The survivor ends within a bounded time: by the coordinator's timeout (a DistributedError it
    # reports) or ended by JAX's coordination service when it sees its peer gone.
    assert ended_after is not None and ended_after < 45
    survivor = reports[1 - victim]
    if survivor is not None:
        assert "saved" not in survivor
        assert "DistributedError" in survivor.get("save_error", "") or "error" in survivor
    store = ckptstore.CheckpointStore(where.url)
    assert store.steps() == []
    assert not [p.name for p in Path(where.url).iterdir() if p.name.startswith("step_")]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_failure_on_one_process_fails_the_save_on_both(tmp_path: Path) -> None:
    where = Location(str(tmp_path / "store"), {})
    phases: list[dict[str, Any]] = [
        {"kind": "save", "step": 2, "fail_rank": 1},
        {"kind": "save", "step": 3},
        {"kind": "resolve"},
        {"kind": "keys"},
        {"kind": "alone"},  # last: process 0's lone collective leaves the two processes' sequences apart
    ]
    codes, reports, _ = launch(tmp_path, where, 2, phases, torch_ports=[free_port(), free_port()])
    assert codes == [0, 0]
    r0, r1 = reports
    assert r0 is not None and r1 is not None
    assert r1["save_error"].startswith("StorageError:") and "injected" in r1["save_error"]
    assert r0["save_error"].startswith("StorageError: rank 1:")  # the same error class, naming the process
    assert r0["saved"] == r1["saved"] == 3  # the job goes on: the next save commits
    assert ckptstore.CheckpointStore(where.url).steps() == [3, 22, 30, 31]
    for r in (r0, r1):  # typed keys, replicated everywhere or sharded over the processes, round-trip
        assert r["keys_30"] == [True, True] and r["keys_31"] == [True, True]
        assert r["keys_30_sharding"] is True and r["keys_31_sharding"] is True
    # A save on process 0 alone: warned about after join_warn_s, failed after the coordinator's timeout,
    # both naming the missing process and the way out; with SINGLE, only what the process holds entirely.
    assert any("rank 1 has not joined this save" in w and "SINGLE" in w for w in r0["alone_warned"])
    assert r0["alone_error"].startswith("DistributedError:") and "no word from rank 1 within 4 s" in r0["alone_error"]
    assert "coordinator=ckptstore.distributed.SINGLE" in r0["alone_error"]
    assert r0["single_error"].startswith("ShardingError:") and "needs every process" in r0["single_error"]
    # torch.distributed initialised beside JAX: the same ranks are fine (torch's coordinator serves), other
    # ranks are refused with a clear error.
    for r in (r0, r1):
        assert r["resolve_same"] == "TorchDistributed"
        assert r["resolve_swapped"].startswith("DistributedError:") and "disagree" in r["resolve_swapped"]


# --- in one process ------------------------------------------------------------------------------------


def test_assign_writes_each_distinct_block_once_balancing_bytes() -> None:
    # Two processes of a 2x2 mesh: w sharded on both axes (two blocks each, its own), b split over "y"
    # only (both processes hold both halves), r replicated (a plain array).
    def rep(rows: int) -> list[list[Any]]:
        return [
            ["w", "F32", (4, 3), (8, 6), (rows, 0), [((rows, 3), (4, 3))]],
            ["b", "BF16", (4,), (8,), (0,), [((4,), (4,))]],
            ["r", "I32", (4, 3), None, None],
        ]

    layout, tasks = pipeline.assign([rep(0), rep(4)])
    written = sorted((layout.slots[slot][0], layout.slots[slot][1]) for t in tasks if t for slot, _ in t)
    assert written == [(0, (0, 0)), (0, (0, 3)), (0, (4, 0)), (0, (4, 3)), (1, (0,)), (1, (4,)), (2, None)]
    # each process writes its own w blocks (indices 0, 1 of its arrays); the shared b halves go one each
    by_rank = [{(layout.slots[slot][0], layout.slots[slot][1]): index for slot, index in t} for t in tasks if t]
    assert {k: v for k, v in by_rank[0].items() if k[0] == 0} == {(0, (0, 0)): 0, (0, (0, 3)): 1}
    assert {k: v for k, v in by_rank[1].items() if k[0] == 0} == {(0, (4, 0)): 0, (0, (4, 3)): 1}
    assert sorted(k for r in by_rank for k in r if k[0] == 1) == [(1, (0,)), (1, (4,))]
    # balanced by bytes, largest shared first: r (48 bytes) to process 0, then both halves of b (8 bytes
    # each) to process 1, the less loaded (96 + 8 < 96 + 48)
    sizes = {0: 48, 1: 8, 2: 48}
    assert [sum(sizes[k[0]] for k in r) for r in by_rank] == [96 + 48, 96 + 16]
    assert layout.leaves[0] == ((8, 6), [0, 1, 2, 3])


def test_assign_refuses_blocks_of_processes_that_do_not_cover_the_array() -> None:
    reports: list[list[Any]] = [
        [["w", "F32", (4, 3), (8, 6), (0, 0), [((0, 3), (4, 3))]]],
        [["w", "F32", (4, 3), (8, 6), (4, 0)]],
    ]
    with pytest.raises(ShardingError, match=r"w: the ranks' shards of global shape \(8, 6\) do not fit"):
        pipeline.assign(reports)


@pytest.mark.parametrize(
    ("wanted", "regions"),
    [
        ([((0, 0), (4, 3)), ((0, 3), (4, 3))], [((0, 0), (4, 6))]),  # two neighbours: their box, once
        ([((0, 0), (2, 2)), ((2, 2), (2, 2))], [((0, 0), (2, 2)), ((2, 2), (2, 2))]),  # a diagonal: each
        ([((4,), (4,))], [((4,), (4,))]),
    ],
)
def test_read_regions(wanted: list[Any], regions: list[Any]) -> None:
    assert blocks.read_regions(wanted) == regions


def test_restore_into_shape_dtype_structs_in_one_process(tmp_path: Path) -> None:
    import jax

    store = ckptstore.CheckpointStore(tmp_path / "s")
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    store.save(1, {"w": w, "n": np.arange(3, dtype=np.int32)})
    device = jax.local_devices()[0]
    like = {
        "w": jax.ShapeDtypeStruct((4, 6), ml_dtypes.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device)),
        "n": jax.ShapeDtypeStruct((3,), np.int32),
    }
    out = store.restore(1, like=like)
    assert out["w"].dtype == ml_dtypes.bfloat16 and out["w"].devices() == {device}
    np.testing.assert_array_equal(np.asarray(out["w"]), w.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(np.asarray(out["n"]), [0, 1, 2])
    with pytest.raises(StructureMismatchError, match=r"\['w'\]: the checkpoint's array has shape \(4, 6\)"):
        store.restore(1, like={**like, "w": jax.ShapeDtypeStruct((6, 4), np.float32)})


def test_a_plain_tensor_is_read_by_ranges_where_its_template_wants_a_block(tmp_path: Path) -> None:
    # A checkpoint of one process (a plain tensor) restored into a block template: block_indices names it,
    # and a BlockReader given it as `ranged` reads only the block's bytes (verify=False) or the tensor
    # whole, checked (verify=True), never through `load` (the whole array).
    store = ckptstore.CheckpointStore(tmp_path / "s")
    w = np.arange(48, dtype=np.float32).reshape(8, 6)
    store.save(1, {"w": w})
    m = load.read_manifest(store.storage, "step_00000001")
    like = {"w": ckptstore.Shard(np.zeros((4, 3), np.float32), (8, 6), (4, 3))}
    assert block_read.block_indices(m.tree) == set()
    assert block_read.block_indices(m.tree, like) == {0}

    class Counting(block_read.BlockReader):
        def _read_bytes(self, entry: Any, pos: int, n: int, into: Any = None) -> Any:
            self.bytes_read = getattr(self, "bytes_read", 0) + n
            return super()._read_bytes(entry, pos, n, into)

    def whole(index: int) -> np.ndarray:
        raise AssertionError(f"tensor {index} read whole")

    for verify, most in ((False, 21 * 4), (True, 48 * 4)):  # rows 4-7 of columns 3-5: one span of 21
        with Counting(store.storage, "step_00000001", m, whole, verify=verify, ranged={0}) as reader:
            np.testing.assert_array_equal(reader.read(m.tree["w"], (4, 3), (4, 3)), w[4:, 3:])
            assert reader.bytes_read == most


def test_resolve_without_any_runtime_is_the_single_process() -> None:
    assert distributed.resolve(None) is distributed.SINGLE
    with pytest.raises(DistributedError, match=r"jax\.distributed\.initialize"):
        distributed.JaxDistributed()
