"""Distributed saves with real processes: torch.distributed on gloo (CPU), one OS process per rank
(tests/dist_worker.py), on local disk and on S3 (moto over HTTP).

Every job is forked, one process per rank, from one warm process that has imported torch once (not
torchrun or mp.spawn, whose supervisors kill every rank when one dies: the kill tests must see what the
surviving ranks do by themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from tests import dist_worker
from tests.conftest import Location
from tests.s3server import free_port

pytestmark = pytest.mark.slow

WORKER = str(Path(dist_worker.__file__).resolve())
JOB_TIMEOUT = 120.0  # a whole job, startup included, on a busy 2-core machine


@pytest.fixture(scope="module")
def zygote() -> Iterator[subprocess.Popen[bytes]]:
    """The process that forks every job (tests/dist_worker.py); it ends when its stdin closes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, env=env, start_new_session=True)
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(
    zygote: subprocess.Popen[bytes],
    tmp_path: Path,
    location: Location,
    world: int,
    phases: list[dict[str, Any]],
    *,
    max_to_keep: int | None = None,
    kill_on: tuple[int, Path] | None = None,
) -> tuple[list[int], list[Any]]:
    """Run a job of ``world`` ranks; return each rank's exit code and what it reported (None if nothing).

    ``kill_on=(rank, marker)``: SIGKILL that rank as soon as it creates ``marker``. A job still running
    at the deadline is killed (its process group) and the test fails, with the ranks' logs.
    """
    out = tmp_path / f"job-{time.monotonic_ns()}"
    out.mkdir()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    cfg = {
        "url": location.url,
        "storage_options": location.storage_options,
        "max_to_keep": max_to_keep,
        "phases": phases,
        "out": str(out),
        "pg_timeout": 30,
        "env": env,
    }
    assert zygote.stdin is not None and zygote.poll() is None
    zygote.stdin.write(json.dumps(cfg).encode() + b"\n")
    zygote.stdin.flush()
    deadline = time.monotonic() + JOB_TIMEOUT
    killed = False
    try:
        while not (out / "codes.json").exists():
            if kill_on is not None and not killed and kill_on[1].exists():
                pids = json.loads((out / "pids.json").read_text())
                os.kill(pids[kill_on[0]], signal.SIGKILL)
                killed = True
            if time.monotonic() > deadline:
                pytest.fail(f"job did not finish in {JOB_TIMEOUT} s:\n{logs(out, world)}")
            time.sleep(0.05)
    finally:
        if not (out / "codes.json").exists() and (out / "leader.json").exists():
            with contextlib.suppress(ProcessLookupError):  # the job's own process group: its leader and ranks
                os.killpg(json.loads((out / "leader.json").read_text()), signal.SIGKILL)
    time.sleep(0.05)  # codes.json is written in one go, but let the leader finish writing it
    codes = json.loads((out / "codes.json").read_text())
    reports = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    if kill_on is None and any(codes):
        pytest.fail(f"ranks exited with {codes}:\n{logs(out, world)}")
    return codes, reports


def logs(out: Path, world: int) -> str:
    parts = [out / "spawn.txt"] + [out / f"log{r}.txt" for r in range(world)]
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in parts if p.exists())


def check_full(state: dict[str, Any], step: int) -> None:
    """A restore without `like` in one process: the global arrays, assembled, exact."""
    want = {n: dist_worker.full(n, step) for n in dist_worker.SHAPES}
    for name, got in [
        ("w", state["model"]["w"]),
        ("emb", state["model"]["emb"]),
        ("m", state["opt"]["m"]),
        ("grid", state["grid"]),
        ("dt", state["dt"]),
        ("bias", state["bias"]),
    ]:
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert state["flags"].tolist() == list(range(step, step + 5))
    assert state["opt"]["count"] == step


def no_leftovers(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-")))


# --- local disk -------------------------------------------------------------------------------------


def test_save_on_2_restore_on_1_3_4_with_other_partitions(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    # Two ranks save three steps (max_to_keep=2), then fail two saves on purpose and save step 9.
    _, reports = launch(
        zygote,
        tmp_path,
        local_url,
        2,
        [{"mode": "save", "steps": [1, 2, 3]}, {"mode": "fail"}, {"mode": "unshared"}],
        max_to_keep=2,
    )
    for rank, (saved, failed, unshared) in enumerate(reports):
        assert unshared["error"][0] == "DistributedError" and "share this filesystem" in unshared["error"][1]
        assert unshared["steps"] == []
        assert [i[0] for i in saved["infos"]] == [1, 2, 3]
        assert all(i[2] == {"step": i[0], "rank": 0} for i in saved["infos"])  # rank 0's metadata, everywhere
        (cls1, msg1), (cls2, msg2), (cls3, msg3), (cls4, msg4) = failed["errors"]
        assert cls1 == "UnsupportedTypeError" and "oops" in msg1, (rank, msg1)  # raised by rank 1, on every rank
        assert cls2 == "ShardingError" and "['model']['w']" in msg2 and "overlap" in msg2, (rank, msg2)
        assert cls3 == "StorageError" and "No space left" in msg3 and "rank 1" in msg3, (rank, msg3)
        assert cls4 == "DistributedError" and "different steps" in msg4, (rank, msg4)
    store = local_url.store()
    assert store.steps() == [3, 9]  # 7 and 8 never committed; retention by rank 0 alone
    assert no_leftovers(local_url.url) == []

    # Each rank wrote its own files; replicated arrays are stored once.
    m = ckptstore.load.read_manifest(store.storage, "step_00000009")
    assert sorted({f.name.split("-r")[1][:5] for f in m.files}) == ["00000", "00001"]
    names = [t.name for t in m.tensors]
    assert names.count("bias") == 1 and names.count("flags") == 1
    assert sorted(n for n in names if n.startswith("model/w@")) == ["model/w@0,0", "model/w@7,0"]

    # One process, no `like`: the global arrays.
    check_full(store.restore(), 9)
    check_full(store.restore(3), 3)

    # Three and four ranks, another partition on every array (DTensor Shard(0) -> Shard(1) included).
    for world in (3, 4):
        _, reports = launch(zygote, tmp_path, local_url, world, [{"mode": "restore", "expect_step": 9}])
        assert [r[0]["bad"] for r in reports] == [[]] * world


def test_per_rank_state_comes_back_on_the_same_ranks_and_is_resharded_only_when_asked(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    # Two ranks, each with its own StatefulDataLoader at its own position and a value whose structure
    # differs by rank, save them per rank (and a replicated array).
    _, saved = launch(zygote, tmp_path, local_url, 2, [{"mode": "per_rank_save", "step": 1}])
    store = local_url.store()
    m = ckptstore.load.read_manifest(store.storage, "step_00000001")
    assert m.version == 2
    own_files = {m.files[t.file].name.split("-r")[1][:5] for t in m.tensors if t.name.startswith("loader/")}
    assert own_files == {"00000", "00001"}  # each rank wrote its own loader's generator state

    # The same two ranks: each gets its own loader state back, in the loader itself, and its own value.
    _, same = launch(zygote, tmp_path, local_url, 2, [{"mode": "per_rank_restore"}])
    for rank in range(2):
        got = same[rank][0]
        assert got["error"] is None and got["same_loader"]
        assert got["next"] == saved[rank][0]["next"]  # the loader continues exactly where this rank was
        assert got["seen"] == [rank, [10 * i for i in range(rank + 1)], {f"r{rank}": rank}]
    assert saved[0][0]["next"] != saved[1][0]["next"]

    # Three ranks and no reshard function: a named error on every rank, the loaders untouched.
    _, other = launch(zygote, tmp_path, local_url, 3, [{"mode": "per_rank_restore"}])
    for rank in range(3):
        got = other[rank][0]
        assert got["error"][0] == "WorldSizeError" and got["untouched"], got
        assert "['loader']" in got["error"][1] and "by 2 ranks" in got["error"][1] and "has 3" in got["error"][1]

    # Three ranks with reshard functions: each is given every saved rank's value, in rank order.
    _, resharded = launch(zygote, tmp_path, local_url, 3, [{"mode": "per_rank_reshard"}])
    for rank in range(3):
        got = resharded[rank][0]
        assert got["seen"]["me"] == [rank, 3]
        assert got["seen"]["saved"] == [[0, "Tensor", [0], {"r0": 0}], [1, "Tensor", [0, 10], {"r1": 1}]]
        assert got["same_loader"] and got["num_yielded"] == 2  # saved rank 0's position (2 batches drawn)

    # One process: without `like`, a named error; asked for every rank's value, it gets them.
    with pytest.raises(ckptstore.errors.WorldSizeError, match=r"by 2 ranks; this job has 1"):
        store.restore()
    every = store.restore(keys="seen", like={"seen": ckptstore.PerRank(None, reshard=lambda saved, r, n: saved)})
    assert [v["rank"] for v in every["seen"]] == [0, 1]


def test_restore_into_a_modules_dtensors_on_other_ranks_reads_in_place(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    # Two ranks save a module of row-sharded DTensors (step 5), and the same with one parameter as a plain
    # array (step 6, as a checkpoint from one process holds it). Two and three ranks restore both into
    # modules of column-sharded DTensors: each block is read straight into the parameters' local memory (no
    # new DTensor, no second copy of the share), with and without verify, exactly.
    launch(zygote, tmp_path, local_url, 2, [{"mode": "in_place_save", "step": 5}])
    for world in (2, 3):
        _, reports = launch(zygote, tmp_path, local_url, world, [{"mode": "in_place_restore", "step": 5}])
        for rank, (got,) in enumerate(reports):
            for run in got["runs"]:
                assert run["same_object"] and run["same_memory"] and run["exact"], (world, rank, run)
                assert run["new_dtensors"] == 0 and run["peak_growth"] < 0.25, (world, rank, run)
            assert got["template"]["new_dtensors"] == 17, (world, rank, got)
            assert got["template"]["peak_growth"] > 0.8, (world, rank, got)  # the control: a second copy


def test_retention_2d_blocks_and_docs_example_under_4_ranks(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    docs = {"mode": "docs", "path": str(tmp_path / "docs-example")}
    _, reports = launch(
        zygote, tmp_path, local_url, 4, [{"mode": "save", "steps": [1, 2, 3, 4, 5]}, docs], max_to_keep=2
    )
    assert [r[1]["bad"] for r in reports] == [[]] * 4  # the example of docs/distributed.md, on 4 ranks
    store = local_url.store()
    assert store.steps() == [4, 5]
    assert no_leftovers(local_url.url) == []
    m = ckptstore.load.read_manifest(store.storage, "step_00000005")
    assert len({f.name.split("-r")[1][:5] for f in m.files}) == 4  # every rank wrote a share
    grid = sorted(t.name for t in m.tensors if t.name.startswith("grid@"))
    assert grid == ["grid@0,0", "grid@0,4", "grid@3,0", "grid@3,4"]  # the 2 x 2 block grid
    check_full(store.restore(), 5)


def test_the_coordinators_values_pass_inline_or_in_a_second_message_on_a_group_or_the_world(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    from ckptstore.distributed import INLINE_BYTES

    _, reports = launch(zygote, tmp_path, local_url, 3, [{"mode": "collectives"}])
    long = 3 * INLINE_BYTES
    for label, ranks in (("world", [0, 1, 2]), ("tail", [1, 2])):
        n = len(ranks)
        for r, global_rank in enumerate(ranks):
            got = reports[global_rank][0][label]
            assert got["gloo"] is True
            for case, longs in (("none", []), ("one", [1]), ("all", list(range(n)))):
                size = {k: long if k in longs else 10 for k in range(n)}
                want = [[k, size[k], True] for k in range(n)] if r == 0 else None
                assert got[f"gather {case}"] == want, (label, r, case)
                assert got[f"scatter {case}"] == [r, size[r], True], (label, r, case)
                assert got[f"broadcast {case}"] == [0, size[0], True], (label, r, case)
    assert "tail" not in reports[0][0]


def test_rank_killed_mid_save_commits_nothing(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    marker = tmp_path / "victim-is-writing"
    codes, reports = launch(
        zygote, tmp_path, local_url, 3, [{"mode": "kill", "victim": 1, "marker": str(marker)}], kill_on=(1, marker)
    )
    assert codes[1] == -signal.SIGKILL and reports[1] is None
    for rank in (0, 2):  # the survivors raised (they did not hang), with a named error
        assert codes[rank] == 0, codes
        assert reports[rank][0]["error"][0] == "DistributedError", reports[rank]
    store = local_url.store()
    assert store.steps() == [1]  # step 2 never committed
    check_full(store.restore(), 1)  # the previous checkpoint is intact
    assert no_leftovers(local_url.url) == []  # rank 0 removed the shared staging directory


# --- async saves across ranks ---------------------------------------------------------------------


def test_async_saves_across_ranks_commit_the_snapshot_while_the_training_runs_its_collectives(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    _, reports = launch(
        zygote, tmp_path, local_url, 2, [{"mode": "async", "steps": [1, 2, 3], "allreduces": 30}], max_to_keep=2
    )
    for rank, rep in enumerate(reports):
        assert rep[0]["sums"] == [2.0**30] * 3, rank  # the training's own all-reduces, undisturbed
        assert [step for step, _ in rep[0]["infos"]] == [1, 2, 3]
        assert [meta for _, meta in rep[0]["infos"]] == [{"step": 1}, {"step": 2}, {"step": 3}]
    store = local_url.store()
    assert store.steps() == [2, 3]  # retention after each commit
    check_full(store.restore(), 3)  # the snapshots: not the arrays as the training changed them after
    check_full(store.restore(2), 2)
    assert no_leftovers(local_url.url) == []


def test_an_async_save_failing_on_one_rank_fails_on_every_rank(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    _, reports = launch(zygote, tmp_path, local_url, 2, [{"mode": "async_fail"}])
    for rank, rep in enumerate(reports):
        handle_error, next_save_error = rep[0]["errors"]
        assert handle_error is not None and handle_error[0] == "StorageError", (rank, handle_error)
        assert "No space left" in handle_error[1]
        assert next_save_error[0] == "AsyncSaveError" and "step 8" in next_save_error[1], (rank, next_save_error)
    store = local_url.store()
    assert store.steps() == [9]
    check_full(store.restore(), 9)
    assert no_leftovers(local_url.url) == []


def test_a_signal_during_an_async_save_completes_it_on_every_rank(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    codes, reports = launch(zygote, tmp_path, local_url, 2, [{"mode": "async_preempt"}])
    assert codes == [0, 0]
    stopped = {rep[0]["stopped_at"] for rep in reports}
    assert len(stopped) == 1 and None not in stopped  # the same step on every rank
    last = stopped.pop()
    assert last > 5 and all(rep[0]["steps"] == [5, last] for rep in reports)
    check_full(local_url.store().restore(5), 5)  # the save in flight when the signal came: complete
    check_full(local_url.store().restore(last), last)


# --- S3 (moto over HTTP) ----------------------------------------------------------------------------


def test_s3_save_on_2_restore_on_3(zygote: subprocess.Popen[bytes], tmp_path: Path, s3_url: Location) -> None:
    launch(zygote, tmp_path, s3_url, 2, [{"mode": "save", "steps": [1, 2, 3]}], max_to_keep=2)
    store = s3_url.store()
    assert store.steps() == [2, 3]
    check_full(store.restore(), 3)
    _, reports = launch(zygote, tmp_path, s3_url, 3, [{"mode": "restore", "expect_step": 3}])
    assert [r[0]["bad"] for r in reports] == [[]] * 3


def test_s3_rank_0_killed_mid_save_commits_nothing(
    zygote: subprocess.Popen[bytes], tmp_path: Path, s3_url: Location
) -> None:
    marker = tmp_path / "victim-is-writing"
    codes, reports = launch(
        zygote, tmp_path, s3_url, 2, [{"mode": "kill", "victim": 0, "marker": str(marker)}], kill_on=(0, marker)
    )
    assert codes[0] == -signal.SIGKILL
    assert codes[1] == 0 and reports[1][0]["error"][0] == "DistributedError", reports[1]
    store = s3_url.store()
    assert store.steps() == [1]
    check_full(store.restore(), 1)
    # What the dead save left under step_00000002 is no checkpoint, and a later writer's cleaning removes it.
    with ckptstore.knobs.override(stale_after_s=0):
        store.save(5, {"x": np.zeros(2)})
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert not [p for p in store.storage._find() if p.startswith("step_00000002/")]


# --- a save on rank 0 alone -------------------------------------------------------------------------


def test_a_save_on_rank_0_alone_is_named_not_hung(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    """`if rank == 0: store.save(...)` on a store that saves with every rank: rank 0 warns within
    join_warn_s which ranks have not joined and what the one line is, fails at join_timeout_s saying the
    same, and the other rank goes on untouched (before: a bare timeout after the process group's, and the
    other rank crashed). With coordinator=SINGLE the same process then saves alone."""
    phase = {"mode": "rank0_only", "step": 3, "warn": 0.5, "timeout": 3.0, "then_single": True}
    codes, reports = launch(zygote, tmp_path, local_url, 2, [phase])
    assert codes == [0, 0]
    r0, r1 = reports[0][0], reports[1][0]
    assert r0["error"][0] == "DistributedError", r0
    assert (
        "ranks [1] of 2 have not joined" in r0["error"][1]
        and "coordinator=ckptstore.distributed.SINGLE" in r0["error"][1]
    )
    assert 2.5 < r0["seconds"] < 20, r0["seconds"]
    assert any("ranks [1] of 2 have not joined" in m and "SINGLE" in m for m in r0["warned"]), r0["warned"]
    assert r1["error"] is None and r1["warned"] == []
    assert r0["steps"] == [4]  # nothing of step 3; step 4 saved by rank 0 alone


def test_a_slower_rank_is_waited_for_not_refused(
    zygote: subprocess.Popen[bytes], tmp_path: Path, local_url: Location
) -> None:
    phase = {"mode": "rank0_only", "step": 3, "warn": 0.5, "timeout": 30.0, "late": 2.0}
    codes, reports = launch(zygote, tmp_path, local_url, 2, [phase])
    assert codes == [0, 0]
    r0, r1 = reports[0][0], reports[1][0]
    assert r0["error"] is None and r1["error"] is None, (r0, r1)
    assert any("have not joined" in m for m in r0["warned"])  # a heads-up, not a failure
    assert r0["steps"] == [3]
    check_full(local_url.store().restore(), 3)
