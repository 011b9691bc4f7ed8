"""Best-N retention (issue #14, part 1): ``keep_best`` / ``best_metric`` / ``best_mode``, ``best_step()``, and
``ckptstore ls --best-metric``. Tables (the issue's example on local disk and S3), random histories against a
plain reference implementation, a new process, readers' pins, a damaged manifest, the command line."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import random
from typing import Any

import pytest

import ckptstore
from ckptstore.cli import main
from ckptstore.errors import CkptStoreError
from ckptstore.retention import RetentionPolicy, StepInfo, metric_value, rank_best
from ckptstore.storage import step_name
from tests.conftest import Location

#: The issue's example: val_loss by step.
EXAMPLE = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.95, 8: 0.85}

ABSENT = object()  # a checkpoint saved without the metric in its metadata


def save(store: ckptstore.CheckpointStore, step: int, value: Any, key: str = "val_loss") -> None:
    """Save ``step`` with ``metadata[key] = value`` (no such key for ABSENT), and wait for its retention pass
    (which may run in the background)."""
    metadata = {"note": "x"} if value is ABSENT else {key: value}
    store.save(step, {"step": step}, metadata=metadata)
    store.wait_until_finished()


def reports(caplog: pytest.LogCaptureFixture, *words: str) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [m for m in messages if all(w in m for w in words)]


# --- the issue's example, end to end --------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "s3"], indirect=True)
def test_issue_example(location: Location) -> None:
    store = location.store(max_to_keep=2, keep_best=2, best_metric="val_loss", best_mode="min")
    after_each = {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 4, 5], 6: [2, 4, 5, 6], 7: [2, 4, 6, 7]}
    for step, value in EXAMPLE.items():
        save(store, step, value)
        if step in after_each:
            assert store.steps() == after_each[step], step
    assert store.steps() == [2, 4, 7, 8]
    assert store.best_step() == 4
    save(store, 9, 0.1)
    assert store.steps() == [4, 8, 9]
    assert store.best_step() == 9
    for step in (4, 8, 9):
        assert store.restore(step)["step"] == step
        assert store.info(step).metadata == {"val_loss": 0.1 if step == 9 else EXAMPLE[step]}


def test_max_mode(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_best=2, best_metric="acc", best_mode="max")
    for step, acc in {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.7, 5: 0.2}.items():
        save(store, step, acc, key="acc")
    assert store.steps() == [2, 4, 5]  # the two highest, and the newest
    assert store.best_step() == 2
    save(store, 6, 0.95, key="acc")
    assert store.steps() == [2, 6]
    assert store.best_step() == 6


def test_int_metrics_rank_like_floats(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_best=1, best_metric="errors")
    for step, errors in {1: 7, 2: 3, 3: 3.5, 4: 9}.items():
        save(store, step, errors, key="errors")
    assert store.steps() == [2, 4]
    assert store.best_step() == 2


def test_ties_go_to_the_newer_step(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_best=1, best_metric="val_loss")
    save(store, 1, 0.5)
    save(store, 2, 0.5)
    save(store, 3, 0.9)
    assert store.steps() == [2, 3]  # 1 and 2 tie: the newer one is the best
    assert store.best_step() == 2
    save(store, 4, 0.5)
    assert store.steps() == [4]  # the newest, and (tied with 2) the best
    assert store.best_step() == 4
    save(store, 5, 0.5)  # an int and a float that are equal tie too
    save(store, 6, 1)
    save(store, 7, 1.0)
    assert store.steps() == [5, 7]
    assert store.best_step() == 5


def test_nan_non_numbers_and_missing_never_count_as_best(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_best=1, best_metric="acc", best_mode="max")
    history: dict[int, Any] = {
        1: 0.5,
        2: math.nan,  # in "max", a NaN compared as a number could sort anywhere
        3: "0.99",  # a str is no number
        4: True,  # a bool is no number (it would be 1 > 0.5)
        5: None,
        6: [0.99],
        7: {"value": 0.99},
        8: ABSENT,
        9: 0.4,
    }
    for step, value in history.items():
        save(store, step, value, key="acc")
        assert store.steps() == sorted({1, step}), step  # 1 the best, the newest; the others dropped
    assert store.best_step() == 1


def test_only_checkpoints_without_the_metric(local_url: Location) -> None:
    store = local_url.store(max_to_keep=2, keep_best=1, best_metric="val_loss")
    for step in range(1, 5):
        save(store, step, ABSENT)
    assert store.steps() == [3, 4]  # kept by max_to_keep alone
    assert store.best_step() is None


def test_keep_best_without_max_to_keep_keeps_the_best_and_the_newest(local_url: Location) -> None:
    store = local_url.store(keep_best=2, best_metric="val_loss")
    assert not store.policy.keeps_all
    expected = {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 4], 5: [2, 4, 5], 6: [2, 4, 6], 7: [2, 4, 7], 8: [2, 4, 8]}
    for step, value in {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.95, 8: ABSENT}.items():
        save(store, step, value)
        assert store.steps() == expected[step], step
    save(store, 9, 0.3)
    assert store.steps() == [4, 9]  # 9 the newest and second best: 2 goes


def test_union_with_keep_every_n_steps(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_every_n_steps=3, keep_best=1, best_metric="val_loss")
    for step, value in {1: 0.1, 2: 0.5, 3: 0.9, 4: 0.6, 5: 0.7, 6: 0.8, 7: 0.05}.items():
        save(store, step, value)
    # 3 and 6 every 3 steps, 1 the best until 7 came (then 7 is both the newest and the best)
    assert store.steps() == [3, 6, 7]


def test_a_step_saved_again_with_overwrite_is_ranked_by_its_new_metric(local_url: Location) -> None:
    store = local_url.store(max_to_keep=1, keep_best=1, best_metric="val_loss")
    save(store, 1, 0.2)
    save(store, 2, 0.5)
    assert store.steps() == [1, 2] and store.best_step() == 1
    store.save(2, {"step": 2}, metadata={"val_loss": 0.1}, overwrite=True)
    store.wait_until_finished()
    assert store.best_step() == 2  # not the metric remembered from the first save of step 2
    save(store, 3, 0.6)
    assert store.steps() == [2, 3]


# --- the pure policy and the ranking ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "pairs", "ranked"),
    [
        ("min", [(1, 0.3), (2, 0.1), (3, 0.2)], [2, 3, 1]),
        ("max", [(1, 0.3), (2, 0.1), (3, 0.2)], [1, 3, 2]),
        ("min", [(1, 0.5), (2, 0.5), (3, 0.5)], [3, 2, 1]),  # ties: the newer first
        ("max", [(1, 0.5), (2, 0.5), (3, 0.1)], [2, 1, 3]),
        ("min", [(1, math.inf), (2, 5.0), (3, -math.inf)], [3, 2, 1]),  # inf is the worst loss
        ("max", [(1, math.inf), (2, 5.0), (3, -math.inf)], [1, 2, 3]),
        ("min", [(1, math.nan), (2, None), (3, 4.0)], [3]),  # NaN and None are never ranked
        ("max", [(1, math.nan), (2, math.nan)], []),
        ("min", [(5, 2), (6, 2.0), (7, 1)], [7, 6, 5]),  # ints, exactly
        ("max", [(1, 2**70), (2, 2**70 + 1), (3, 1e21)], [2, 1, 3]),  # past float precision: never rounded
        ("min", [], []),
    ],
)
def test_rank_best(mode: str, pairs: list[tuple[int, Any]], ranked: list[int]) -> None:
    assert rank_best(pairs, mode) == ranked
    infos = [StepInfo(s, 0.0, v) for s, v in pairs]
    assert RetentionPolicy(best_metric="m", best_mode=mode).ranked(infos) == ranked


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (3, 3),
        (-math.inf, -math.inf),
        (math.nan, None),
        (True, None),
        (False, None),
        ("0.5", None),
        (None, None),
        ([1.0], None),
        (b"1", None),
    ],
)
def test_metric_value(value: Any, expected: Any) -> None:
    assert metric_value({"m": value}, "m") == expected
    assert metric_value({"other": 1.0}, "m") is None
    assert metric_value(None, "m") is None


def test_policy_table() -> None:
    values = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.95, 8: 0.85}
    infos = [StepInfo(s, 0.0, v) for s, v in values.items()]
    policy = RetentionPolicy(max_to_keep=2, keep_best=2, best_metric="val_loss")
    assert policy.to_keep(infos) == {2, 4, 7, 8}  # all eight at once: the same as one at a time here
    assert policy.to_delete(infos, pinned=[6]) == [1, 3, 5]
    alone = RetentionPolicy(keep_best=1, best_metric="val_loss")
    assert alone.to_keep(infos) == {4, 8}
    assert alone.to_keep([]) == set()
    assert alone.to_keep([StepInfo(3, 0.0, None)]) == {3}  # the newest, always


# --- random histories against a plain reference -----------------------------------------------------------


def reference_kept(
    alive: dict[int, Any], max_to_keep: int | None, keep_every: int | None, keep_best: int, mode: str
) -> set[int]:
    """Which of ``alive`` (step -> metadata value) the issue's rules keep, written plainly: sort the steps
    with a usable metric newest first, then (stably) by value."""
    steps = sorted(alive)
    keep = set(steps[-(max_to_keep or 1) :])  # with max_to_keep None, the newest
    if keep_every is not None:
        keep |= {s for s in steps if s % keep_every == 0}
    usable = []
    for s in steps:
        v = alive[s]
        if type(v) in (int, float) and not math.isnan(v):
            usable.append((s, v))
    usable.sort(key=lambda sv: sv[0], reverse=True)  # newest first: wins ties below (the sort is stable)
    usable.sort(key=lambda sv: sv[1], reverse=(mode == "max"))
    keep |= {s for s, _ in usable[:keep_best]}
    return keep


def reference_best(alive: dict[int, Any], mode: str) -> int | None:
    usable = [(s, v) for s, v in alive.items() if type(v) in (int, float) and not math.isnan(v)]
    if not usable:
        return None
    target = min(v for _, v in usable) if mode == "min" else max(v for _, v in usable)
    return max(s for s, v in usable if v == target)


def test_random_histories_against_the_reference(tmp_path: pathlib.Path) -> None:
    rng = random.Random(14)
    pool: list[Any] = [0.1, 0.2, 0.2, 0.3, 0.5, 1, 2, 0.0, -1.5, math.inf, math.nan, ABSENT, "0.05", True, None]
    saves = 0
    for history in range(30):
        max_to_keep = rng.choice([None, 1, 2, 3])
        keep_every = rng.choice([None, None, 3, 4])
        keep_best = rng.choice([1, 2, 3])
        mode = rng.choice(["min", "max"])
        kwargs = {
            "max_to_keep": max_to_keep,
            "keep_every_n_steps": keep_every,
            "keep_best": keep_best,
            "best_metric": "m",
            "best_mode": mode,
        }
        root = tmp_path / f"h{history}"
        store = ckptstore.CheckpointStore(root, **kwargs)
        alive: dict[int, Any] = {}
        step = rng.randrange(3)
        for _ in range(rng.randint(5, 25)):
            step += rng.randint(1, 3)
            value = rng.choice(pool)
            if rng.random() < 0.1:  # now and then a new process takes over: nothing remembered
                store = ckptstore.CheckpointStore(root, **kwargs)
            save(store, step, value, key="m")
            saves += 1
            alive[step] = value
            kept = reference_kept(alive, max_to_keep, keep_every, keep_best, mode)
            alive = {s: v for s, v in alive.items() if s in kept}
            where = f"history {history} ({kwargs}), after step {step}"
            assert store.steps() == sorted(alive), where
            assert store.best_step() == reference_best(alive, mode), where
    assert saves > 300  # the histories were not trivially short


# --- every process agrees ------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "s3"], indirect=True)
def test_a_new_process_agrees(location: Location) -> None:
    policy = {"max_to_keep": 2, "keep_best": 2, "best_metric": "val_loss", "best_mode": "min"}
    first = location.store(**policy)
    for step in range(1, 7):
        save(first, step, EXAMPLE[step])
    assert first.steps() == [2, 4, 5, 6] and first.best_step() == 4
    # A fresh store object (as a new process or another host has): nothing remembered, manifests read.
    second = location.store(**policy)
    assert second.best_step() == 4
    save(second, 7, EXAMPLE[7])
    save(second, 8, EXAMPLE[8])
    assert second.steps() == [2, 4, 7, 8]
    # The first object sees the same, and prunes the same way after its own next save.
    assert first.best_step() == 4
    save(first, 9, 0.1)
    assert first.steps() == [4, 8, 9]
    # A reader without keep_best still finds the best step (best_metric alone keeps nothing extra).
    reader = location.store(best_metric="val_loss")
    assert reader.best_step() == 9
    assert location.store(best_metric="val_loss", best_mode="max").best_step() == 8


# --- readers' pins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["local", "s3"], indirect=True)
@pytest.mark.parametrize("holder", ["same-store", "another-store"])
def test_a_pinned_checkpoint_survives_best_n_pruning(location: Location, holder: str) -> None:
    trainer = location.store(max_to_keep=1, keep_best=1, best_metric="val_loss")
    reader = trainer if holder == "same-store" else location.store()
    save(trainer, 1, 0.9)
    with reader.pin(1):
        save(trainer, 2, 0.5)
        save(trainer, 3, 0.7)
        assert trainer.steps() == [1, 2, 3]  # 1 is neither best nor newest: kept for its reader
        assert reader.restore(1)["step"] == 1
        assert trainer.best_step() == 2
    save(trainer, 4, 0.8)  # released: deleted by the next save, as the policy no longer keeps it
    assert trainer.steps() == [2, 4]
    with reader.pin(4):
        save(trainer, 5, 0.6)
        save(trainer, 6, 0.4)
        assert trainer.steps() == [4, 6]  # 4 pinned; 6 both best and newest; 2 and 5 dropped
    save(trainer, 7, 0.45)
    assert trainer.steps() == [6, 7]


# --- a damaged manifest --------------------------------------------------------------------------------


def test_a_damaged_manifest_is_skipped(local_url: Location, caplog: pytest.LogCaptureFixture) -> None:
    policy = {"max_to_keep": 1, "keep_best": 1, "best_metric": "val_loss"}
    store = local_url.store(**policy)
    save(store, 1, 0.9)
    save(store, 2, 0.1)
    save(store, 3, 0.5)
    assert store.steps() == [2, 3]
    manifest = os.path.join(local_url.url, step_name(2), "manifest.msgpack")
    os.unlink(manifest)  # (a file of the store may be read-only)
    with open(manifest, "wb") as f:
        f.write(b"\x00junk\xff" * 20)
    again = local_url.store(**policy)  # a new process: step 2's metric must be read, and cannot be
    assert again.best_step() == 3  # 2 left out
    save(again, 4, 0.6)
    assert again.steps() == [2, 3, 4]  # 2 left alone (neither counted nor deleted); 3 best, 4 newest
    save(again, 5, 0.05)
    save(again, 6, 0.07)
    assert again.steps() == [2, 5, 6]  # retention went on around it
    assert again.best_step() == 5
    assert len(reports(caplog, "step 2", "left alone")) == 1  # reported once, not at every save
    again.delete(2)  # what the report suggests
    save(again, 7, 0.08)
    assert again.steps() == [5, 7]


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"keep_best": 0, "best_metric": "m"}, "keep_best"),
        ({"keep_best": -1, "best_metric": "m"}, "keep_best"),
        ({"keep_best": 1.5, "best_metric": "m"}, "keep_best"),
        ({"keep_best": True, "best_metric": "m"}, "keep_best"),
        ({"keep_best": "2", "best_metric": "m"}, "keep_best"),
        ({"keep_best": 2}, "needs best_metric"),
        ({"keep_best": 2, "best_metric": ""}, "best_metric"),
        ({"best_metric": 3}, "best_metric"),
        ({"best_metric": "m", "best_mode": "avg"}, "best_mode"),
        ({"best_metric": "m", "best_mode": None}, "best_mode"),
        ({"best_mode": "MIN"}, "best_mode"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], word: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(CkptStoreError, match=word):
        RetentionPolicy(**kwargs)
    with pytest.raises(CkptStoreError, match=word):
        ckptstore.CheckpointStore(tmp_path / "run", **kwargs)


def test_best_step_needs_best_metric(tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=2)
    store.save(1, {"x": 1}, metadata={"val_loss": 0.5})
    with pytest.raises(CkptStoreError, match="best_metric"):
        store.best_step()
    assert ckptstore.CheckpointStore(tmp_path / "run", best_metric="val_loss").best_step() == 1
    assert ckptstore.CheckpointStore(tmp_path / "empty", best_metric="val_loss").best_step() is None
    # best_metric alone keeps nothing extra, and max_to_keep=None still keeps all
    assert RetentionPolicy(best_metric="val_loss").keeps_all
    assert not RetentionPolicy(keep_best=1, best_metric="val_loss").keeps_all


# --- ckptstore ls --best-metric ------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def example_store(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root)  # keeps all
    for step, value in EXAMPLE.items():
        save(store, step, value)
    save(store, 9, math.nan)
    save(store, 10, "0.01")
    save(store, 11, ABSENT)
    save(store, 12, 0.2)  # ties with 4: the newer is the best
    return root


def best_rows(out: str) -> tuple[list[str], list[str]]:
    """(the header's cells, the steps of the rows marked best) of ls's table."""
    lines = out.splitlines()
    marked = [line.split()[0] for line in lines[1:] if line.split()[1] == "*"]
    return lines[0].split(), marked


def test_ls_marks_the_best(capsys: pytest.CaptureFixture[str], example_store: pathlib.Path) -> None:
    code, out, err = run(capsys, "ls", str(example_store), "--best-metric", "val_loss", "--best-mode", "min")
    assert code == 0 and err == ""
    header, marked = best_rows(out)
    assert header == ["STEP", "BEST", "CREATED", "SIZE", "METADATA"]
    assert marked == ["12"]
    assert len(out.splitlines()) == 1 + 12
    store = ckptstore.CheckpointStore(example_store, best_metric="val_loss")
    assert store.best_step() == 12  # the same ranking as the store's
    code, out, _ = run(capsys, "ls", str(example_store), "--best-metric", "val_loss", "--best-mode", "max")
    assert code == 0 and best_rows(out)[1] == ["7"]
    code, out, _ = run(capsys, "ls", str(example_store), "--best-metric", "val_loss")  # min by default
    assert best_rows(out)[1] == ["12"]


def test_ls_json_marks_the_best(capsys: pytest.CaptureFixture[str], example_store: pathlib.Path) -> None:
    code, out, err = run(capsys, "ls", str(example_store), "--json", "--best-metric", "val_loss", "--best-mode", "min")
    assert code == 0 and err == ""
    records = json.loads(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["step"] for r in records if r["best"] is True] == [12]
    assert all(r["best"] is False for r in records if r["step"] != 12)
    code, out, _ = run(capsys, "ls", str(example_store), "--json", "--best-metric", "val_loss", "--best-mode", "max")
    assert [r["step"] for r in json.loads(out) if r["best"]] == [7]
    code, out, _ = run(capsys, "ls", str(example_store), "--json")  # without the option: no "best" key
    assert code == 0 and all("best" not in r for r in json.loads(out))


def test_ls_best_without_a_usable_metric_and_bad_options(
    capsys: pytest.CaptureFixture[str], example_store: pathlib.Path
) -> None:
    code, out, err = run(capsys, "ls", str(example_store), "--best-metric", "accuracy")
    assert code == 0 and best_rows(out)[1] == [] and "no checkpoint has a number" in err
    code, out, _ = run(capsys, "ls", str(example_store), "--json", "--best-metric", "accuracy")
    assert not any(r["best"] for r in json.loads(out))
    code, out, err = run(capsys, "ls", str(example_store), "--best-mode", "max")
    assert code == 2 and out == "" and "--best-metric" in err
    with pytest.raises(SystemExit) as exc:
        main(["ls", str(example_store), "--best-metric", "val_loss", "--best-mode", "median"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["ls", str(example_store), "--best-metric", ""])
    assert exc.value.code == 2


def test_ls_never_marks_a_damaged_checkpoint(capsys: pytest.CaptureFixture[str], example_store: pathlib.Path) -> None:
    manifest = example_store / step_name(12) / "manifest.msgpack"
    manifest.unlink()
    manifest.write_bytes(b"\x00junk\xff")
    code, out, _ = run(capsys, "ls", str(example_store), "--best-metric", "val_loss")
    assert code == 1  # a damaged checkpoint is listed, and fails the listing
    assert best_rows(out)[1] == ["4"]  # 12 cannot be read: 4 is the best of the others
    assert "DAMAGED" in next(line for line in out.splitlines() if line.split()[0] == "12")
