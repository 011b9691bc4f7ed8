"""Save decisions in one process: ``should_save`` by steps, by seconds (an injected clock), both, neither;
preemption signals recorded by a chained handler that ``close()`` takes back; the agreement across ranks
with a stand-in coordinator (the real one, two gloo ranks, is in tests/test_preemption.py)."""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import distributed, knobs
from ckptstore.decisions import AGREEMENT_SHARE, MAX_PERIOD, Decisions, SavePolicy
from ckptstore.errors import CkptStoreError

SIG = signal.SIGUSR1  # the preemption signal of these tests (SIGTERM is the test runner's)
STATE = {"w": np.arange(4, dtype=np.float32)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    """A factory of stores on one root, every one closed afterwards."""
    made: list[ckptstore.CheckpointStore] = []

    def make(**kwargs: Any) -> ckptstore.CheckpointStore:
        s = ckptstore.CheckpointStore(tmp_path / "run", **kwargs)
        made.append(s)
        return s

    yield make
    for s in reversed(made):
        s.close()


@pytest.fixture(autouse=True)
def _signal_handlers_put_back() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def answers(store: ckptstore.CheckpointStore, steps: range) -> list[int]:
    return [s for s in steps if store.should_save(s)]


def send(sig: int = SIG) -> None:
    """Deliver ``sig`` to this process; its Python handler runs before this returns."""
    os.kill(os.getpid(), sig)


# --- intervals --------------------------------------------------------------------------------------


def test_interval_by_steps(store: Any) -> None:
    s = store(save_interval_steps=5)
    assert answers(s, range(0, 23)) == [0, 5, 10, 15, 20]
    s.save(10, STATE)
    assert not s.should_save(10)  # saved already
    assert not s.should_save(5)  # not past the last save
    assert s.should_save(15)


def test_interval_by_seconds_with_an_injected_clock(store: Any) -> None:
    s = store(save_interval_secs=60)
    clock = FakeClock()
    s._decisions.clock = clock
    assert not s.should_save(1)  # the interval starts at the first call
    clock.now += 59.9
    assert not s.should_save(2)
    clock.now += 0.1
    assert s.should_save(3)
    assert s.should_save(3)  # asking again changes nothing
    s.save(3, STATE)  # the interval restarts when a save starts
    assert not s.should_save(3)
    clock.now += 30
    assert not s.should_save(4)
    clock.now += 30
    assert s.should_save(5)
    assert not s.should_save(2)  # not past the last save, however late


def test_intervals_by_steps_and_seconds_together(store: Any) -> None:
    s = store(save_interval_steps=10, save_interval_secs=100)
    clock = FakeClock()
    s._decisions.clock = clock
    assert s.should_save(0)
    s.save(0, STATE)
    assert answers(s, range(1, 10)) == []
    clock.now += 100
    assert s.should_save(7)  # by time, off the step grid
    s.save(7, STATE)
    assert answers(s, range(8, 21)) == [10, 20]  # by steps, the clock restarted at 7


def test_no_interval_saves_every_new_step(store: Any) -> None:
    s = store()
    assert answers(s, range(0, 4)) == [0, 1, 2, 3]
    s.save(5, STATE)
    assert answers(s, range(0, 8)) == [6, 7]


def test_preemption_alone_saves_only_on_preemption(store: Any) -> None:
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    assert answers(s, range(0, 50)) == []
    assert not s.reached_preemption(49)


def test_the_last_saved_step_is_this_store_objects_own(store: Any) -> None:
    other = store()
    other.save(100, STATE)
    s = store(save_interval_steps=10)
    assert s.should_save(50)  # step 100, committed by another object, does not count
    s.save(50, STATE)
    assert not s.should_save(50) and s.should_save(60)
    assert other.should_save(101) and not other.should_save(60)


def test_the_last_save_started_counts_even_an_older_step(store: Any) -> None:
    s = store(save_interval_steps=10)
    s.save(100, STATE)
    s.save(20, STATE)  # the last save started is of step 20
    assert s.should_save(30)


def test_steps_of_numpy_ints_are_accepted_others_refused(store: Any) -> None:
    s = store(save_interval_steps=5)
    assert s.should_save(np.int64(5)) and not s.should_save(np.int32(6))
    for bad in (1.0, "5", True, None):
        with pytest.raises(CkptStoreError, match="step must be an int"):
            s.should_save(bad)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"save_interval_steps": 0}, "save_interval_steps must be a positive int"),
        ({"save_interval_steps": -5}, "save_interval_steps must be a positive int"),
        ({"save_interval_steps": 2.5}, "save_interval_steps must be a positive int"),
        ({"save_interval_steps": True}, "save_interval_steps must be a positive int"),
        ({"save_interval_secs": 0}, "save_interval_secs must be a positive finite number"),
        ({"save_interval_secs": float("inf")}, "save_interval_secs must be a positive finite number"),
        ({"save_interval_secs": float("nan")}, "save_interval_secs must be a positive finite number"),
        ({"save_interval_secs": "60"}, "save_interval_secs must be a positive finite number"),
        ({"save_on_preemption": 1}, "save_on_preemption must be a bool"),
        ({"preemption_signals": [0]}, "not a signal number"),
        ({"preemption_signals": [10_000]}, "not a signal number"),
        ({"preemption_signals": ["SIGTERM"]}, "not a signal number"),
        ({"preemption_signals": [signal.SIGKILL]}, "SIGKILL cannot be caught"),
        ({"save_on_preemption": True, "preemption_signals": []}, "at least one signal"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(CkptStoreError, match=words):
        ckptstore.CheckpointStore(tmp_path / "run", **kwargs)


def test_options_are_normalised() -> None:
    p = SavePolicy(np.int64(7), 30, True, (int(SIG), SIG, signal.SIGUSR2))
    assert p == SavePolicy(7, 30.0, True, (SIG, signal.SIGUSR2))
    assert type(p.save_interval_steps) is int and type(p.save_interval_secs) is float


# --- preemption -------------------------------------------------------------------------------------


def test_a_signal_makes_the_next_step_save_and_then_reached_preemption(store: Any) -> None:
    s = store(save_interval_steps=100, save_on_preemption=True, preemption_signals=[SIG])
    assert not s.should_save(41) and not s.reached_preemption(41)
    send()
    assert not s.reached_preemption(41)  # the state of step 41 is not being saved
    assert s.should_save(42)
    assert not s.reached_preemption(42)  # not before the save has started
    s.save(42, STATE)
    assert s.reached_preemption(42)
    assert not s.should_save(42)  # saved already
    assert not s.should_save(43)  # the preemption's save is done: only the intervals again
    assert s.reached_preemption(43)  # and it stays reached
    assert ckptstore.CheckpointStore(s.url).latest_step() == 42


def test_async_save_in_flight_is_completed_on_the_preemption_path(store: Any) -> None:
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    handle = s.save(1, STATE, blocking=False)
    send()
    assert s.should_save(2)
    s.save(2, STATE, blocking=False)
    assert s.reached_preemption(2)
    s.wait_until_finished()
    assert handle.done() and s.steps() == [1, 2]


def test_a_signal_during_the_save_of_a_step_reaches_preemption_at_that_step(store: Any) -> None:
    s = store(save_interval_steps=10, save_on_preemption=True, preemption_signals=[SIG])
    assert s.should_save(10)
    s.save(10, STATE)
    send()  # after the save of step 10 started: it holds the state of step 10
    assert s.reached_preemption(10)
    assert not s.should_save(11)


def test_a_save_without_should_save_covers_a_signal(store: Any) -> None:
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    send()
    s.save(7, STATE)
    assert s.reached_preemption(7) and not s.should_save(8)


def test_a_second_signal_asks_for_another_save(store: Any) -> None:
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    send()
    assert s.should_save(1)
    s.save(1, STATE)
    assert not s.should_save(2)
    send()
    assert s.should_save(3)


def test_previous_python_handler_is_chained_after_recording_and_restored_by_close(store: Any) -> None:
    seen: list[tuple[int, int]] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append((signum, s._decisions._signals))  # the store has recorded the signal already

    signal.signal(SIG, previous)
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    assert signal.getsignal(SIG) is not previous
    send()
    assert seen == [(SIG, 1)]
    s.close()
    assert signal.getsignal(SIG) is previous
    send()  # the store records no more
    assert seen == [(SIG, 1), (SIG, 1)]
    assert s.should_save(1)  # usable after close(): the handler is installed again ...
    assert signal.getsignal(SIG) is not previous
    s.close()
    assert signal.getsignal(SIG) is previous  # ... and put back again


@pytest.mark.parametrize("previous", [signal.SIG_DFL, signal.SIG_IGN])
def test_default_and_ignore_handlers_are_not_acted_on_and_are_restored(store: Any, previous: Any) -> None:
    signal.signal(SIG, previous)
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    send()  # SIG_DFL of SIGUSR1 would end this process
    assert s.should_save(1)
    s.close()
    assert signal.getsignal(SIG) == previous


def test_several_signals_each_recorded_and_restored(store: Any) -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    s = store(save_on_preemption=True, preemption_signals=[SIG, signal.SIGUSR2])
    send(signal.SIGUSR2)
    assert s.should_save(1)
    s.close()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN and signal.getsignal(SIG) == signal.SIG_DFL


def test_two_stores_closed_out_of_order(store: Any) -> None:
    seen: list[int] = []
    original = lambda signum, frame: seen.append(signum)  # noqa: E731
    signal.signal(SIG, original)
    a = store(save_on_preemption=True, preemption_signals=[SIG])
    b = store(save_on_preemption=True, preemption_signals=[SIG])
    send()
    assert a._decisions._signals == b._decisions._signals == 1 and seen == [SIG]
    a.close()  # b's handler is installed over a's: a's stays in b's chain, passing the signal on
    send()
    assert (a._decisions._signals, b._decisions._signals, seen) == (1, 2, [SIG, SIG])
    b.close()
    assert signal.getsignal(SIG) is original  # not a's closed handler


def test_a_closed_handler_left_installed_puts_the_previous_back_when_signalled(store: Any) -> None:
    seen: list[int] = []
    original = lambda signum, frame: seen.append(signum)  # noqa: E731
    signal.signal(SIG, original)
    s = store(save_on_preemption=True, preemption_signals=[SIG])
    caught: list[warnings.WarningMessage] = []

    def close() -> None:  # off the main thread: cannot restore, warns
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s.close()
        caught.extend(w)

    t = threading.Thread(target=close)
    t.start()
    t.join()
    assert [str(w.message) for w in caught if "off the main thread" in str(w.message)]
    assert signal.getsignal(SIG) is not original
    send()
    assert seen == [SIG] and s._decisions._signals == 0
    assert signal.getsignal(SIG) is original


def test_off_the_main_thread_a_preemption_store_is_refused(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def make() -> None:
        try:
            ckptstore.CheckpointStore(tmp_path / "run", save_on_preemption=True, preemption_signals=[SIG])
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], CkptStoreError)
    assert "main thread" in str(errors[0])
    assert signal.getsignal(SIG) == signal.SIG_DFL
    # a store without save_on_preemption installs nothing, in any thread
    t = threading.Thread(target=lambda: ckptstore.CheckpointStore(tmp_path / "run", save_interval_secs=5))
    t.start()
    t.join()


# --- across ranks, with a stand-in coordinator ------------------------------------------------------


class TwoRanks:
    """Rank ``rank`` of two; ``peer`` is what the other rank contributes to each agreement."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.peer = [0, 0, 1]
        self.sent: list[list[int]] = []

    def all_max(self, values: list[int]) -> list[int]:
        self.sent.append(list(values))
        return [max(a, b) for a, b in zip(values, self.peer)]

    def gather(self, obj: Any) -> Any:
        raise AssertionError("not used")

    scatter = broadcast = gather


def test_across_ranks_a_peers_signal_counts_at_the_next_agreement_only() -> None:
    coord = TwoRanks(rank=0)
    policy = SavePolicy(save_interval_steps=100, save_on_preemption=True, preemption_signals=(SIG,))
    d = Decisions(policy, lambda: coord)
    try:
        with knobs.override(preemption_sync_every=4):
            assert [d.should_save(s) for s in range(1, 6)] == [False] * 5  # calls 0 .. 4: agreements at 0, 4
            coord.peer = [1, 0, 4]  # the other rank got a signal
            assert [d.should_save(s) for s in (6, 7, 8)] == [False] * 3
            assert d.should_save(9)  # call 8: agreed
            assert not d.reached_preemption(9)
            d.started(9)
            assert d.reached_preemption(9) and d.reached_preemption(10) and not d.reached_preemption(8)
            assert len(coord.sent) == 3 and all(v[2] == 4 for v in coord.sent)
            coord.peer = [0, 0, 4]
            send()  # this rank's own signal: not acted on alone, but shared at the next agreement
            assert [d.should_save(s) for s in (10, 11, 12)] == [False] * 3
            assert d.should_save(13)  # call 12
            assert coord.sent[-1][0] == 1
    finally:
        d.close()


def test_across_ranks_time_is_rank_0s_clock_at_agreements() -> None:
    clock = FakeClock()
    for rank in (0, 1):
        coord = TwoRanks(rank)
        d = Decisions(SavePolicy(save_interval_secs=10), lambda c=coord: c, clock=clock)  # type: ignore[misc]
        with knobs.override(preemption_sync_every=3):
            assert not d.should_save(0)
            clock.now += 10
            due = coord.rank == 0
            assert [d.should_save(s) for s in (1, 2, 3)] == [False, False, due]  # call 3 agrees
            assert coord.sent[-1][1] == int(due)  # only rank 0 says the time is due
            coord.peer = [0, 1, 3]  # rank 0 says so, to rank 1
            assert [d.should_save(s) for s in (4, 5, 6)] == [False, False, True]


def test_without_time_or_preemption_nothing_is_agreed() -> None:
    coord = TwoRanks(0)
    d = Decisions(SavePolicy(save_interval_steps=2), lambda: coord)
    assert [d.should_save(s) for s in range(5)] == [True, False, True, False, True]
    assert coord.sent == []


def test_the_period_adapts_to_the_agreements_cost_and_the_pace() -> None:
    d = Decisions(SavePolicy(save_interval_secs=60), lambda: distributed.SINGLE)
    assert d._period(0.0) == 1  # nothing measured yet
    d._cost, d._agreed_at, d._calls = 0.00203, (100, 50.0), 140  # 2.03 ms an agreement; 40 calls since
    # 10 ms a call: 2.03 ms / (0.5% of 10 ms) = 40.6 calls
    assert d._period(50.0 + 40 * 0.010) == math.ceil(0.00203 / (AGREEMENT_SHARE * 0.010)) == 41
    assert d._period(50.0 + 40 * 0.001) == 80  # 1 ms a call would want 400: at most twice the last period
    assert d._period(50.0 + 40 * 1.0) == 1  # slow steps: every call
    d._agreed_at, d._calls = (0, 50.0), 5000
    assert d._period(50.0 + 5000 * 1e-6) == MAX_PERIOD
    with knobs.override(preemption_sync_every=7):
        assert d._period(0.0) == 7


def test_all_max_of_a_coordinator_without_its_own_gathers_and_broadcasts() -> None:
    class GatherOnly:
        world_size = 2

        def __init__(self, rank: int) -> None:
            self.rank = rank

        def gather(self, obj: Any) -> Any:
            return [obj, [0, 5, 1]] if self.rank == 0 else None

        def broadcast(self, obj: Any) -> Any:
            return obj if self.rank == 0 else [9, 9, 9]

        def scatter(self, objs: Any) -> Any:
            raise AssertionError("not used")

    assert distributed.all_max(GatherOnly(0), [1, 2, 0]) == [1, 5, 1]
    assert distributed.all_max(GatherOnly(1), [1, 2, 0]) == [9, 9, 9]
    assert distributed.all_max(distributed.SINGLE, [1, 2]) == [1, 2]


def test_one_signal_number_is_accepted_as_preemption_signals(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run", save_on_preemption=True, preemption_signals=signal.SIGUSR1)
    try:
        assert store.save_policy.preemption_signals == (signal.SIGUSR1,)
        assert not store.should_save(1)
        signal.raise_signal(signal.SIGUSR1)
        assert store.should_save(1)
    finally:
        store.close()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
