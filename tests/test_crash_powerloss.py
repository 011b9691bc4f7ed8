"""Power loss, not only process death: after a cut at any filesystem call of a save or a retention pass,
every visible checkpoint is complete, every save that returned survives, and the next writer cleans up.

The disk is modelled by tests.faults.PowerLossOps: data survives if fsynced, directory entries if their
directory was fsynced; anything newer may vanish, or survive, or (file data) survive torn. The test has
teeth: with any one fsync of the commit or delete path removed, it finds a broken checkpoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

import ckptstore
from ckptstore.storage import TMP_PREFIX, TRASH_PREFIX, LocalStorage, parse_step
from tests.faults import FaultyOps, PowerLossOps, check_state, check_store, leftovers, state_of

SEEDS = (1, 2)  # random images per crash point, besides the strict one


def run_and_check(
    tmp_path: Path, drop: Callable[[str, str, str], bool] | None = None, stop_early: bool = False
) -> tuple[int, list[str]]:
    """Save steps 3..6 with max_to_keep=3 into a store holding 1 and 2 (step 3's save deletes nothing, the
    others one step each), taking power-cut images before every filesystem call; check each image. Returns
    (images checked, violations found)."""
    root = str(tmp_path / "run")
    first = ckptstore.CheckpointStore(root, max_to_keep=2)
    for s in (1, 2):
        first.save(s, state_of(s))
    first.close()  # its retention pass done before the model adopts the directory
    ops = PowerLossOps(root, drop=drop)
    store = ckptstore.CheckpointStore(LocalStorage(root, ops=ops), max_to_keep=3)
    committed = [set(store.steps())]  # the committed steps after each save returned
    images: list[tuple[str, int]] = []  # (image directory, saves returned when it was taken)

    def take(kind: str = "end", path: str = "") -> None:
        k = len(images)
        for mode, seed in [("strict", 0), ("adversarial", 0)] + [("random", s) for s in SEEDS]:
            dst = str(tmp_path / f"img-{k:04d}-{mode}{seed}")
            ops.image(dst, mode, random.Random(seed * 100003 + k))
            images.append((dst, len(committed) - 1))

    ops.plan.hook = take
    for s in range(3, 7):
        store.save(s, state_of(s))
        # The retention pass after the commit runs on its own thread: images are taken before each of its
        # calls too, while this thread waits (the model is of one sequence of calls).
        store.wait_until_finished()
        committed.append(set(store.steps()))
    take()

    violations = []
    for dst, returned in images:
        # Survivors: committed when the last save returned, and not deleted by the save in progress.
        must = committed[returned] & committed[min(returned + 1, len(committed) - 1)]
        try:
            check_image(dst, must)
        except (AssertionError, ckptstore.errors.CkptStoreError) as e:
            violations.append(f"{os.path.basename(dst)}: {type(e).__name__}: {e}")
            if stop_early:
                break
    return len(images), violations


def check_image(root: str, must_have: set[int]) -> None:
    # The writer after the cut need not sync (this image is thrown away); it must see and clean everything.
    store = ckptstore.CheckpointStore(LocalStorage(root, ops=FaultyOps(sync=False)), max_to_keep=2)
    before = check_store(store, must_have)
    assert all(parse_step(n) is not None or n.startswith(".") for n in os.listdir(root))
    # The next writer: saves, applies retention, removes every leftover of the cut.
    store.save(99, state_of(99))
    store.wait_until_finished()
    assert not leftovers(root), leftovers(root)
    after = check_store(store)
    assert after == [*[s for s in before if s in after], 99][-2:]
    check_state(99, store.restore())


def test_power_loss_at_every_call_keeps_every_checkpoint(tmp_path: Path, record_property) -> None:
    n, violations = run_and_check(tmp_path)
    record_property("power_cut_images", n)
    assert not violations, "\n".join(violations[:10])
    assert n > 200  # every call of 4 saves and their retention passes, 4 images each


DROPS: dict[str, Callable[[str, str, str], bool]] = {
    "fsync of each tensor file": lambda kind, p, _: kind == "fsync" and p.endswith(".safetensors"),
    "fsync of the manifest": lambda kind, p, _: kind == "fsync" and p.endswith("manifest.msgpack"),
    "fsync of the temp directory before the rename": lambda kind, p, _: (
        kind == "fsync_dir" and os.path.basename(p).startswith(TMP_PREFIX)
    ),
    "fsync of the root after a commit's rename": lambda kind, p, renamed: (
        kind == "fsync_dir" and os.path.basename(p) == "run" and parse_step(renamed) is not None
    ),
    "fsync of the root after a step is renamed away to be deleted": lambda kind, p, renamed: (
        kind == "fsync_dir" and os.path.basename(p) == "run" and renamed.startswith(TRASH_PREFIX)
    ),
}


@pytest.mark.parametrize("dropped", list(DROPS))
def test_power_loss_test_fails_without_any_one_fsync(tmp_path: Path, dropped: str, record_property) -> None:
    _, violations = run_and_check(tmp_path, drop=DROPS[dropped], stop_early=True)
    record_property("fsyncs_removed_and_caught", 1 if violations else 0)
    assert violations, f"removing the {dropped} went unnoticed"
