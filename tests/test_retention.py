"""Retention: the pure RetentionPolicy (tables), then end to end through CheckpointStore.save."""

from __future__ import annotations

import os
from typing import Any

import pytest

import ckptstore
from ckptstore.errors import CkptStoreError
from ckptstore.retention import RetentionPolicy, StepInfo
from tests.conftest import Location

HOUR = 3600.0


def infos(steps: list[int], created: list[float] | None = None) -> list[StepInfo]:
    times = created if created is not None else [float(s) for s in steps]
    return [StepInfo(s, t) for s, t in zip(steps, times, strict=True)]


# --- pure policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "steps", "kept"),
    [
        # the issue's example
        (RetentionPolicy(max_to_keep=3, keep_every_n_steps=4), range(1, 11), {4, 8, 9, 10}),
        (RetentionPolicy(), range(1, 11), set(range(1, 11))),
        (RetentionPolicy(max_to_keep=1), range(1, 6), {5}),
        (RetentionPolicy(max_to_keep=3), [1, 2], {1, 2}),
        (RetentionPolicy(max_to_keep=3), [], set()),
        (RetentionPolicy(max_to_keep=2), [10, 3, 7, 1], {7, 10}),  # newest by step, not by list order
        (RetentionPolicy(max_to_keep=1, keep_every_n_steps=5), [0, 3, 5, 9, 10, 11], {0, 5, 10, 11}),
        (RetentionPolicy(max_to_keep=2, keep_every_n_steps=1), [1, 2, 3], {1, 2, 3}),
        (RetentionPolicy(max_to_keep=2, keep_every_n_steps=100), [100, 150, 199, 200, 250], {100, 200, 250}),
        # keep_every_n_steps alone: max_to_keep None keeps everything anyway
        (RetentionPolicy(keep_every_n_steps=4), range(1, 11), set(range(1, 11))),
    ],
)
def test_to_keep_table(policy: RetentionPolicy, steps: Any, kept: set[int]) -> None:
    given = infos(list(steps))
    assert policy.to_keep(given) == kept
    assert policy.to_delete(given) == sorted(set(steps) - kept)


@pytest.mark.parametrize(
    ("hours", "created_h", "kept_steps"),
    [
        # one per 2 hours, walking from the oldest: 0 kept, 1.5 not, 2.0 kept (>= 2h after 0), 3.9 not, 4.1 kept
        (2, [0, 1.5, 2.0, 3.9, 4.1, 4.2], {0, 2, 4}),
        (1, [0, 0.5, 0.99, 1.0, 2.5], {0, 3, 4}),
        (0.5, [0, 0.1, 0.2, 0.3, 0.4], {0}),
        (24, [0, 5, 10], {0}),
    ],
)
def test_keep_every_n_hours(hours: float, created_h: list[float], kept_steps: set[int]) -> None:
    steps = list(range(len(created_h)))
    given = infos(steps, [1_700_000_000 + h * HOUR for h in created_h])
    policy = RetentionPolicy(max_to_keep=1, keep_every_n_hours=hours)
    newest = steps[-1]
    kept = policy.to_keep(given)
    assert kept == kept_steps | {newest}
    # stable: applied again to the survivors it keeps all of them
    survivors = [i for i in given if i.step in kept]
    assert policy.to_keep(survivors) == kept
    assert policy.to_delete(survivors) == []


def test_keep_every_n_hours_stable_over_a_long_run() -> None:
    """Saves every 10 minutes, retention after each save, as a store does: every 3 hours one survives."""
    policy = RetentionPolicy(max_to_keep=2, keep_every_n_hours=3)
    alive: list[StepInfo] = []
    for step in range(0, 24 * 6):  # one day
        alive.append(StepInfo(step, 1_000_000.0 + step * 600.0))
        doomed = set(policy.to_delete(alive))
        alive = [i for i in alive if i.step not in doomed]
    hourly = sorted(i.step for i in alive)[:-2]
    assert hourly == list(range(0, 24 * 6 - 2, 18))  # 18 saves = 3 hours
    assert sorted(i.step for i in alive)[-2:] == [142, 143]


def test_pinned_steps_are_never_deleted() -> None:
    policy = RetentionPolicy(max_to_keep=1)
    assert policy.to_delete(infos([1, 2, 3]), pinned=[1]) == [2]


def test_keeps_all_flag() -> None:
    assert RetentionPolicy().keeps_all
    assert not RetentionPolicy(max_to_keep=5).keeps_all


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_to_keep": 0},
        {"max_to_keep": -1},
        {"max_to_keep": 1.5},
        {"max_to_keep": "3"},
        {"max_to_keep": True},
        {"keep_every_n_steps": 0},
        {"keep_every_n_steps": 2.5},
        {"keep_every_n_steps": False},
        {"keep_every_n_hours": 0},
        {"keep_every_n_hours": -2.0},
        {"keep_every_n_hours": float("nan")},
        {"keep_every_n_hours": float("inf")},
        {"keep_every_n_hours": "1"},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], tmp_path: Any) -> None:
    with pytest.raises(CkptStoreError, match=next(iter(kwargs))):
        RetentionPolicy(**kwargs)
    with pytest.raises(CkptStoreError, match=next(iter(kwargs))):
        ckptstore.CheckpointStore(tmp_path / "run", **kwargs)


def test_valid_arguments() -> None:
    RetentionPolicy(max_to_keep=1, keep_every_n_steps=1, keep_every_n_hours=0.01)
    RetentionPolicy(keep_every_n_hours=2)


# --- end to end (`location`, tests/conftest.py: local disk, then memory://) ---------------------------


def test_issue_example_end_to_end(location: Location) -> None:
    store = location.store(max_to_keep=3, keep_every_n_steps=4)
    for step in range(1, 11):
        store.save(step, {"step": step, "w": [step] * 3})
        # never more than max_to_keep plus the multiples of 4 so far
        assert len(store.steps()) <= 3 + step // 4
    assert store.steps() == [4, 8, 9, 10]
    for step in (4, 8, 9, 10):
        assert store.restore(step)["step"] == step


def test_max_to_keep_end_to_end_leaves_no_data(local_url: Location) -> None:
    import numpy as np

    store = local_url.store(max_to_keep=2)
    for step in range(5):
        store.save(step, {"w": np.full(1000, step)})
    assert store.steps() == [3, 4]
    # the store's own hidden files (lock, leases) aside, but temp and trash directories counted
    names = sorted(n for n in os.listdir(local_url.url) if not n.startswith(".") or n.startswith((".tmp-", ".trash-")))
    assert names == ["step_00000003", "step_00000004"]  # deleted steps leave nothing, no temp left


def test_retention_counts_steps_saved_by_another_store_object(location: Location) -> None:
    location.store().save(1, {"a": 1})
    location.store().save(2, {"a": 2})
    store = location.store(max_to_keep=2)
    store.save(3, {"a": 3})
    assert store.steps() == [2, 3]


def test_retention_keeps_newest_by_step_even_if_saved_out_of_order(location: Location) -> None:
    store = location.store(max_to_keep=2)
    store.save(10, {"a": 10})
    store.save(20, {"a": 20})
    store.save(5, {"a": 5})  # older than what is kept: removed again at once
    assert store.steps() == [10, 20]


def test_keep_every_n_hours_end_to_end_with_synthetic_times(location: Location, monkeypatch: Any) -> None:
    """The clock is faked: each save happens one hour after the previous one."""
    now = [1_700_000_000.0]
    monkeypatch.setattr("time.time", lambda: now[0])  # restored by monkeypatch after the test
    store = location.store(max_to_keep=1, keep_every_n_hours=2)
    for step in range(6):
        info = store.save(step, {"step": step})
        assert info.created == now[0]
        now[0] += HOUR
    assert store.steps() == [0, 2, 4, 5]
    # a new store object (times read back from the manifests) decides the same
    again = location.store(max_to_keep=1, keep_every_n_hours=2)
    now[0] += 0.25 * HOUR  # step 6 lands 2.25 h after step 4: an hourly keep itself; 5 is neither
    again.save(6, {"step": 6})
    assert again.steps() == [0, 2, 4, 6]


def test_overwrite_does_not_trigger_extra_deletion(location: Location) -> None:
    store = location.store(max_to_keep=2)
    for step in (1, 2):
        store.save(step, {"s": step})
    store.save(2, {"s": 22}, overwrite=True)
    assert store.steps() == [1, 2]
    assert store.restore(2) == {"s": 22}


@pytest.mark.parametrize("seed", range(20))
def test_incremental_retention_equals_one_pass(seed: int) -> None:
    """Applying the policy after every save (as a store does) keeps exactly what one pass over the whole
    history keeps, and applying it again to the survivors deletes nothing (random histories)."""
    import random

    rnd = random.Random(seed)
    policy = RetentionPolicy(
        max_to_keep=rnd.randint(1, 4),
        keep_every_n_steps=rnd.choice([None, 2, 5, 7]),
        keep_every_n_hours=rnd.choice([None, 0.5, 1, 3]),
    )
    history, t = [], 0.0
    for step in sorted(rnd.sample(range(200), 40)):
        t += rnd.uniform(0, 1.5) * HOUR
        history.append(StepInfo(step, t))
    alive: list[StepInfo] = []
    for info in history:
        alive.append(info)
        doomed = set(policy.to_delete(alive))
        alive = [i for i in alive if i.step not in doomed]
    assert {i.step for i in alive} == policy.to_keep(history)
    assert policy.to_delete(alive) == []
