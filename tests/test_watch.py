"""checkpoints_iterator / wait_for_new_checkpoint / CheckpointStore.iter_new / `ckptstore watch`: TensorFlow's
semantics (with real clocks, short intervals), committed checkpoints only, on local disk, memory:// and S3.

Time bounds here are semantic (a timeout is waited in full: elapsed >= timeout); upper bounds are loose and
only tell "returned at the timeout" from "waited a whole poll interval or forever"."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CkptStoreError
from tests.conftest import Location

POLL = 0.05


@pytest.fixture(autouse=True)
def _fast_polling() -> Iterator[None]:
    with knobs.override(poll_interval_s=POLL):
        yield


def state(step: int) -> dict[str, object]:
    return {"w": np.full(4, step, np.float32), "step": step}


def later(delay: float, fn: Callable[[], object]) -> threading.Thread:
    """Run ``fn`` in a thread after ``delay`` seconds (a trainer saving while the iterator waits)."""

    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("_", 1)[-1])


# --- on every backend -------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_first_yield_is_latest_then_new_ones(location: Location) -> None:
    trainer = location.store()
    for s in (1, 2, 3):
        trainer.save(s, state(s))
    url, opts = location
    it = ckptstore.checkpoints_iterator(url, timeout=30, storage_options=opts or None)
    first = next(it)
    assert step_of(first) == 3
    assert ckptstore.restore(first, storage_options=opts or None)["step"] == 3
    later(0.1, lambda: trainer.save(7, state(7)))  # another store object: its own filesystem instance
    second = next(it)
    assert step_of(second) == 7
    np.testing.assert_array_equal(ckptstore.restore(second, storage_options=opts or None)["w"], np.full(4, 7))
    it.close()


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_every_checkpoint_in_step_order(location: Location) -> None:
    trainer = location.store()
    for s in (5, 2, 9):
        trainer.save(s, state(s))
    url, opts = location
    seen = []
    for path in ckptstore.checkpoints_iterator(url, timeout=0.3, storage_options=opts or None, every_checkpoint=True):
        seen.append(step_of(path))
        if seen == [2, 5, 9]:
            trainer.save(10, state(10))
            trainer.save(11, state(11))
    assert seen == [2, 5, 9, 10, 11]


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_partial_checkpoints_are_never_yielded(location: Location) -> None:
    trainer = location.store()
    trainer.save(1, state(1))
    url, opts = location
    # What a writer leaves mid-save (or a crash): data without a manifest, on each kind of backend.
    if "://" in url:
        fs = trainer.storage.fs  # type: ignore[attr-defined]
        root = trainer.storage.root  # type: ignore[attr-defined]
        fs.pipe_file(f"{root}/step_00000005/tensors-0.safetensors", b"x" * 100)
    else:
        os.makedirs(os.path.join(url, ".tmp-step_00000004-abc"))
        with open(os.path.join(url, ".tmp-step_00000004-abc", "manifest.msgpack"), "wb") as f:
            f.write(b"not yet renamed")
        os.makedirs(os.path.join(url, "step_00000005"))
    got = list(ckptstore.checkpoints_iterator(url, timeout=0.3, storage_options=opts or None, every_checkpoint=True))
    assert [step_of(p) for p in got] == [1]
    assert ckptstore.wait_for_new_checkpoint(url, got[0], timeout=0.2, storage_options=opts or None) is None


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_store_iter_new_yields_infos(location: Location) -> None:
    trainer = location.store()
    trainer.save(3, state(3), metadata={"loss": 0.5})
    reader = location.store()
    later(0.1, lambda: trainer.save(4, state(4), metadata={"loss": 0.25}))
    infos: list[ckptstore.CheckpointInfo] = []
    for info in reader.iter_new(timeout=30, timeout_fn=lambda: infos[-1].step == 4, every_checkpoint=True):
        infos.append(info)
    assert [(i.step, i.metadata["loss"]) for i in infos] == [(3, 0.5), (4, 0.25)]
    assert reader.restore(infos[-1].step)["step"] == 4


# --- TensorFlow's timing semantics (local disk) -------------------------------------------------------


def test_timeout_is_waited_in_full_on_an_empty_store(tmp_path: Path) -> None:
    d = os.path.join(tmp_path, "run")
    t0 = time.monotonic()
    assert list(ckptstore.checkpoints_iterator(d, timeout=0.4)) == []
    assert time.monotonic() - t0 >= 0.4
    assert not os.path.exists(d)  # a reader never creates the store


def test_poll_interval_is_shortened_to_fit_the_timeout(tmp_path: Path) -> None:
    """TensorFlow returns None as soon as now + interval > deadline: a checkpoint committed in the last
    interval before the deadline is missed. Here the last look happens at the deadline."""
    store = ckptstore.CheckpointStore(tmp_path)
    later(0.3, lambda: store.save(1, state(1)))
    t0 = time.monotonic()
    with knobs.override(poll_interval_s=30.0):
        got = list(ckptstore.checkpoints_iterator(tmp_path, timeout=1.5))
    elapsed = time.monotonic() - t0
    assert [step_of(p) for p in got] == [1]
    assert elapsed < 10  # not a whole 30 s poll interval
    t0 = time.monotonic()
    assert ckptstore.wait_for_new_checkpoint(tmp_path, got[0], seconds_to_sleep=30, timeout=0.5) is None
    assert 0.5 <= time.monotonic() - t0 < 10


def test_timeout_fn_false_waits_again_then_true_stops(tmp_path: Path) -> None:
    calls = []

    def timeout_fn() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 3

    t0 = time.monotonic()
    assert list(ckptstore.checkpoints_iterator(tmp_path, timeout=0.2, timeout_fn=timeout_fn)) == []
    assert len(calls) == 3
    assert calls[0] - t0 >= 0.2 and calls[1] - calls[0] >= 0.2 and calls[2] - calls[1] >= 0.2


def test_timeout_fn_is_consulted_after_each_yield(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    calls = []

    def done() -> bool:
        calls.append(1)
        return True

    # timeout=None would wait forever: the loop ends only because timeout_fn is asked after the yield.
    got = list(ckptstore.checkpoints_iterator(tmp_path, timeout=None, timeout_fn=done))
    assert [step_of(p) for p in got] == [1]
    assert calls == [1]


def test_timeout_fn_false_after_a_yield_keeps_waiting(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    got: list[int] = []
    calls = []

    def done() -> bool:  # the trainer is done once the evaluator has seen step 2
        calls.append(list(got))
        return got[-1:] == [2]

    later(1.0, lambda: store.save(2, state(2)))
    for path in ckptstore.checkpoints_iterator(tmp_path, timeout=0.2, timeout_fn=done):
        got.append(step_of(path))
    assert got == [1, 2]
    assert calls[0] == [1] and calls[-1] == [1, 2]
    assert len(calls) >= 3  # after step 1, after at least one timeout, after step 2


def test_checkpoints_committed_before_done_are_still_yielded(tmp_path: Path) -> None:
    """The trainer commits its final checkpoint while the evaluator works on an earlier one, then says it is
    done: the final checkpoint is yielded (without a wait) before the loop ends."""
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    got = []
    t0 = time.monotonic()
    for path in ckptstore.checkpoints_iterator(tmp_path, timeout=30, timeout_fn=lambda: store.latest_step() == 3):
        got.append(step_of(path))
        if got == [1]:
            store.save(2, state(2))
            store.save(3, state(3))
    assert got == [1, 3]  # the newest only: every_checkpoint is False
    assert time.monotonic() - t0 < 10  # the 30 s timeout was never waited


def test_min_interval_between_yields_counts_the_callers_time(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    times = []
    for path in ckptstore.checkpoints_iterator(tmp_path, min_interval_secs=0.5, timeout=0.3):
        times.append(time.monotonic())
        if step_of(path) == 1:
            store.save(2, state(2))  # present at once: only min_interval_secs holds it back
            time.sleep(0.2)  # the caller's work counts towards the interval
    assert len(times) == 2
    assert times[1] - times[0] >= 0.5


def test_every_checkpoint_respects_min_interval(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    for s in (1, 2, 3):
        store.save(s, state(s))
    times = [time.monotonic() for _ in ckptstore.checkpoints_iterator(tmp_path, 0.2, 0.1, every_checkpoint=True)]
    assert len(times) == 3
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times))


def test_skips_checkpoints_written_while_the_caller_works(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, state(1))
    got = []
    for path in ckptstore.checkpoints_iterator(tmp_path, timeout=0.3):
        got.append(step_of(path))
        if len(got) == 1:
            for s in (2, 3, 4):
                store.save(s, state(s))
    assert got == [1, 4]


def test_wait_for_new_checkpoint(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    t0 = time.monotonic()
    assert ckptstore.wait_for_new_checkpoint(tmp_path, seconds_to_sleep=0.05, timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.3
    store.save(1, state(1))
    first = ckptstore.wait_for_new_checkpoint(tmp_path, timeout=0)
    assert first == store.info(1).path
    # The same path written differently (relative, trailing separator) is still "the last one".
    rel = os.path.relpath(first) + os.sep
    assert ckptstore.wait_for_new_checkpoint(tmp_path, rel, seconds_to_sleep=0.05, timeout=0.2) is None
    later(0.2, lambda: store.save(2, state(2)))
    second = ckptstore.wait_for_new_checkpoint(tmp_path, first, seconds_to_sleep=0.05, timeout=5)
    assert second == store.info(2).path
    with ckptstore.pin(second):
        assert ckptstore.restore(second)["step"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": -1}, {"timeout": "5"}, {"min_interval_secs": float("nan")}, {"timeout_fn": True}],
)
def test_bad_arguments_are_named_errors_at_once(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(CkptStoreError, match=next(iter(kwargs))):
        ckptstore.checkpoints_iterator(tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CkptStoreError, match="seconds_to_sleep"):
        ckptstore.wait_for_new_checkpoint(tmp_path, seconds_to_sleep=-1)


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)
def test_cli_watch_prints_each_new_checkpoint(location: Location, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore.cli import main

    trainer = location.store()
    for s in (1, 2):
        trainer.save(s, state(s))
    url, opts = location
    options = [f"-o{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in opts.items()]
    assert main(["watch", url, "--timeout", "0.3", "--every", *options]) == 0
    assert [step_of(line) for line in capsys.readouterr().out.split()] == [1, 2]
    assert main(["watch", url, "--timeout", "0.3", *options]) == 0
    assert [step_of(line) for line in capsys.readouterr().out.split()] == [2]


def test_cli_watch_follows_a_trainer_in_another_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptstore.cli", "watch", str(tmp_path), "--timeout", "2", "--every"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CKPTSTORE_POLL_INTERVAL_S": "0.05"},
    )
    assert proc.stdout is not None
    store = ckptstore.CheckpointStore(tmp_path)
    lines = []
    for s in (10, 20, 30):
        store.save(s, state(s))
        lines.append(proc.stdout.readline().strip())  # printed (and flushed) as each one is committed
    assert [step_of(line) for line in lines] == [10, 20, 30]
    assert proc.wait(30) == 0


# --- docs/evaluator.md --------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluator.md"


@pytest.mark.parametrize("index", range(2))
def test_the_docs_examples_run(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[index], f"{DOC}:python block {index}", "exec"), {"__name__": "__doc_example__"})
