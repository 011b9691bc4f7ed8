"""Preemption with real processes (tests/preemption_worker.py): a training run sent SIGTERM saves at its next
step, exits 0, and a resumed run ends bit-identical to one never stopped; a SIGTERM while an async save is
in flight commits that save; on two torch.distributed ranks (gloo, CPU) a SIGTERM to rank 1 alone makes
both ranks save the same step and exit 0."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import ckptstore
from tests.s3server import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOTAL = 100
TIMEOUT = 120.0  # one worker process, torch's import included, on a busy 2-core machine


def start(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.preemption_worker", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the worker did not finish in time")


def wait_for(path: pathlib.Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}) before creating {path.name}")
        if time.monotonic() > deadline:
            finish(proc)
        time.sleep(0.01)


def train(store: pathlib.Path, out: pathlib.Path, *extra: str) -> dict[str, torch.Tensor]:
    """A run to the end (``--resume``: from the store's latest checkpoint); its final tensors."""
    assert finish(start("train", store, out, "--total", TOTAL, *extra)) == 0
    return load_file(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return train(tmp / "store", tmp / "out.safetensors")


def check_bit_identical(resumed: dict[str, torch.Tensor], want: dict[str, torch.Tensor], stop: int) -> None:
    assert resumed.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(resumed[name], tensor), name
    assert len(resumed["losses"]) == TOTAL and stop + 1 < TOTAL  # the resumed run did train on


def test_sigterm_saves_the_next_step_exits_0_and_the_resumed_run_is_bit_identical(
    tmp_path: pathlib.Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    store, out, ready = tmp_path / "store", tmp_path / "first.safetensors", tmp_path / "ready"
    proc = start("train", store, out, "--total", TOTAL, "--ready", ready)
    wait_for(ready, proc)  # from step 10 on, 30 ms a step
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0
    report = json.loads(pathlib.Path(f"{out}.json").read_text())
    stop = report["preempted"]
    # The worker's own SIGTERM handler, installed before the store, was chained: it noted the step under way.
    [signalled] = report["signalled"]
    assert stop in (signalled, signalled + 1), report  # the next should_save saved
    assert report["saved"] == [*range(0, stop, 20), stop]  # the interval's saves, then the preemption's
    assert ckptstore.CheckpointStore(store).latest_step() == stop

    resumed = train(store, tmp_path / "resumed.safetensors", "--resume")
    check_bit_identical(resumed, uninterrupted, stop)


def test_sigterm_during_an_async_save_commits_it(
    tmp_path: pathlib.Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """The default action of SIGTERM would kill the process with the save half-written; with
    save_on_preemption the handler records, the loop saves once more, waits for both and exits."""
    store, out, hold, go = tmp_path / "store", tmp_path / "first.safetensors", tmp_path / "hold", tmp_path / "go"
    proc = start("train", store, out, "--total", TOTAL, "--async", "--hold", hold, "--go", go)
    wait_for(hold, proc)  # the background save of step 20 is writing its first file, and waits
    held = int(hold.read_text())
    proc.send_signal(signal.SIGTERM)
    go.touch()
    assert finish(proc) == 0
    report = json.loads(pathlib.Path(f"{out}.json").read_text())
    stop = report["preempted"]
    # Usually a step after the held one saves for the preemption; if the signal came before the loop asked
    # reached_preemption(20), the held save itself holds the state of that step, and the loop exits there.
    assert held == 20 and stop is not None and stop >= held, report
    s = ckptstore.CheckpointStore(store)
    assert s.steps() == sorted({0, held, stop}) and s.verify() == s.steps(), report

    resumed = train(store, tmp_path / "resumed.safetensors", "--resume")
    check_bit_identical(resumed, uninterrupted, stop)


def test_sigterm_to_one_rank_makes_both_ranks_save_the_same_step(tmp_path: pathlib.Path) -> None:
    store, out = tmp_path / "store", tmp_path / "job"
    out.mkdir()
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    proc = start("dist", store, out, env=env)
    try:
        wait_for(out / "ready1", proc)
        pids = json.loads((out / "pids.json").read_text())
        os.kill(pids[1], signal.SIGTERM)  # rank 1 only
        assert finish(proc) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # ranks left over by a failure
    logs = "\n".join((out / f"log{r}.txt").read_text(errors="replace")[-2000:] for r in (0, 1))
    assert json.loads((out / "codes.json").read_text()) == [0, 0], logs
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    stop = r0["preempted"]
    assert stop is not None and r1["preempted"] == stop, (r0, r1)
    assert r0["saved"] == r1["saved"] == [0, stop]  # step 0 by the interval, then the preemption's
    s = ckptstore.CheckpointStore(store)
    assert s.steps() == [0, stop]
    assert s.restore(stop)["step"] == stop
