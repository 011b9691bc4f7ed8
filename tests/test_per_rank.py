"""Per-rank state (``ckptstore.PerRank``) in one process, the manifest's per-rank node, the planning of
each rank's own arrays, and the restore's choice of a rank's value. Saves and restores by several real
ranks (torch.distributed, a StatefulDataLoader per rank, another world size with and without a reshard
function) are in tests/test_distributed.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import PerRank, manifest, pipeline, tree
from ckptstore.errors import (
    CorruptCheckpointError,
    ShardingError,
    StructureMismatchError,
    UnsupportedTypeError,
    WorldSizeError,
)
from ckptstore.skeleton import PerRankValues, TensorRef


class Counter:
    """A stateful object (``state_dict`` / ``load_state_dict``), as a data loader is."""

    def __init__(self, n: int = 0) -> None:
        self.n = n
        self.gen = torch.zeros(3, dtype=torch.uint8)

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n, "gen": self.gen}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        self.n = sd["n"]  # type: ignore[assignment]
        self.gen = torch.as_tensor(sd["gen"])


def test_a_world_of_one_saves_and_restores_per_rank_values(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    counter = Counter(7)
    counter.gen = torch.tensor([1, 2, 3], dtype=torch.uint8)
    store.save(1, {"w": np.arange(4.0), "loader": PerRank(counter), "pos": PerRank({"i": 3, "buf": np.ones(2)})})
    m = ckptstore.load.read_manifest(store.storage, "step_00000001")
    assert m.version == 2 and type(m.tree["loader"]) is PerRankValues and len(m.tree["loader"].values) == 1

    fresh = Counter()
    got = store.restore(like={"w": np.zeros(4), "loader": PerRank(fresh), "pos": PerRank({"i": 0, "buf": np.zeros(2)})})
    assert got["loader"] is fresh and fresh.n == 7 and fresh.gen.tolist() == [1, 2, 3]
    assert got["pos"]["i"] == 3 and got["pos"]["buf"].tolist() == [1.0, 1.0]
    # Without the wrapper in `like`, or without `like`: this rank's value all the same.
    plain = store.restore(like={"w": np.zeros(4), "loader": Counter(), "pos": {"i": 0, "buf": np.zeros(2)}})
    assert plain["loader"].n == 7
    assert store.restore()["pos"]["i"] == 3


def test_a_state_without_per_rank_values_keeps_format_version_1(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"w": np.arange(3)})
    assert ckptstore.load.read_manifest(store.storage, "step_00000001").version == 1


def test_a_per_rank_template_restores_a_value_saved_plainly(tmp_path: Path) -> None:
    """A checkpoint from before the value was per-rank: its value, into the template, on every rank."""
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"loader": Counter(5)})
    fresh = Counter()
    got = store.restore(like={"loader": PerRank(fresh)})
    assert got["loader"] is fresh and fresh.n == 5


def test_resume_of_nothing_gives_like_back_without_the_wrappers(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    counter = Counter()
    state, step = store.resume({"loader": PerRank(counter), "pos": PerRank({"i": 0}), "lr": [0.1]})
    assert step is None and state == {"loader": counter, "pos": {"i": 0}, "lr": [0.1]}
    store.save(2, {"loader": PerRank(Counter(4)), "pos": PerRank({"i": 9}), "lr": [0.1]})
    state, step = store.resume({"loader": PerRank(counter), "pos": PerRank({"i": 0}), "lr": [0.0]})
    assert step == 2 and state["loader"] is counter and counter.n == 4 and state["pos"] == {"i": 9}


def test_an_async_save_keeps_per_rank_values(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    buf = np.arange(5.0)
    store.save(1, {"pos": PerRank({"buf": buf})}, blocking=False)
    buf[:] = -1  # after the snapshot: not in the checkpoint
    store.wait_until_finished()
    assert store.restore()["pos"]["buf"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("state", "error", "words"),
    [
        ({"x": PerRank({"y": PerRank(1)})}, UnsupportedTypeError, "a PerRank inside a PerRank"),
        ({"x": PerRank(ckptstore.Shard(np.zeros(2), (4,), (0,)))}, ShardingError, "inside a PerRank"),
    ],
)
def test_what_a_per_rank_value_cannot_hold_is_named(
    tmp_path: Path, state: dict[str, object], error: type[Exception], words: str
) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"w": np.ones(2)})
    with pytest.raises(error, match=words):
        store.save(2, state)
    assert store.steps() == [1]


def test_metadata_holds_no_per_rank_values(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    with pytest.raises(UnsupportedTypeError, match="metadata"):
        store.save(1, {"w": np.ones(2)}, metadata={"pos": PerRank(3)})
    assert store.steps() == []


# --- the restore's choice ---------------------------------------------------------------------------


def two_ranks() -> dict[str, object]:
    """A skeleton as two ranks save it: a replicated tensor, and per-rank values of different structure."""
    return {"w": TensorRef(0), "pos": PerRankValues(({"i": 1, "g": TensorRef(1)}, {"i": 2, "g": TensorRef(2), "x": 0}))}


def test_each_rank_gets_its_own_value_on_the_same_world_size() -> None:
    for rank in (0, 1):
        skeleton, like = tree.select_rank(two_ranks(), {"w": None, "pos": PerRank({"i": 0})}, rank, 2)
        assert skeleton["pos"] == two_ranks()["pos"].values[rank]  # type: ignore[attr-defined]
        assert like == {"w": None, "pos": {"i": 0}}


def test_another_world_size_is_a_named_error_unless_like_reshards() -> None:
    with pytest.raises(WorldSizeError, match=r"state\['pos'\] was saved per rank by 2 ranks; this job has 3"):
        tree.select_rank(two_ranks(), tree.MISSING, 0, 3)
    with pytest.raises(WorldSizeError):  # a template without reshard does not say what to do either
        tree.select_rank(two_ranks(), {"w": None, "pos": PerRank({"i": 0})}, 0, 3)

    calls = []

    def reshard(saved: list[object], rank: int, world: int) -> object:
        calls.append((saved, rank, world))
        return {"mine": rank}

    skeleton, like = tree.select_rank(two_ranks(), {"w": None, "pos": PerRank(None, reshard=reshard)}, 2, 3)
    assert skeleton["pos"] == list(two_ranks()["pos"].values)  # type: ignore[attr-defined]
    arrays = {0: np.zeros(2), 1: np.array([7]), 2: np.array([8])}
    state = tree.rebuild(skeleton, arrays.__getitem__, like=like)
    assert state["pos"] == {"mine": 2}
    ((saved, rank, world),) = calls
    assert (rank, world) == (2, 3) and [s["i"] for s in saved] == [1, 2] and saved[1]["g"].tolist() == [8]


def test_a_resharded_value_is_loaded_into_a_stateful_template() -> None:
    target = Counter()
    skeleton = {"loader": PerRankValues(({"n": 4, "gen": TensorRef(0)},))}
    sk, like = tree.select_rank(skeleton, {"loader": PerRank(target, reshard=lambda s, r, w: s[0])}, 1, 2)
    state = tree.rebuild(sk, {0: np.array([9, 9, 9], dtype=np.uint8)}.__getitem__, like=like)
    assert state["loader"] is target and target.n == 4 and target.gen.tolist() == [9, 9, 9]


def test_a_template_that_does_not_fit_the_chosen_value_is_a_mismatch(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"pos": PerRank({"i": 1, "buf": np.ones(2)})})
    with pytest.raises(StructureMismatchError, match="shape"):
        store.restore(like={"pos": PerRank({"i": 0, "buf": np.zeros(3)})})


# --- planning and the manifest ----------------------------------------------------------------------


def test_each_rank_writes_its_own_arrays_and_the_ranks_must_agree_where_they_are() -> None:
    common = [("w", "F32", (4,), None, None)]
    own = [
        [[("pos",)], [("U8", (3,))], [{"g": TensorRef(0)}]],
        [[("pos",)], [("U8", (5,)), ("I64", (2,))], [{"g": TensorRef(0), "h": TensorRef(1)}]],
    ]
    layout, tasks = pipeline.assign([common, common], own)
    assert layout.own_slots is not None
    writers = [layout.slots[s][4] for r in range(2) for s in layout.own_slots[r]]
    assert writers == [0, 1, 1]
    assert [layout.slots[s][2] for s in layout.own_slots[1]] == [(5,), (2,)]
    # rank 1's own arrays follow its one common array in its prepared arrays
    assert sorted(i for slot, i in tasks[1] if slot in layout.own_slots[1]) == [1, 2]  # type: ignore[union-attr]

    moved = [own[0], [[("elsewhere",)], *own[1][1:]]]
    with pytest.raises(ShardingError, match=r"per-rank values \(PerRank\) at different places"):
        pipeline.assign([common, common], moved)
    with pytest.raises(ShardingError, match="different places"):
        pipeline.assign([common, common], [own[0], None])


def test_the_manifest_round_trips_per_rank_nodes_and_refuses_empty_ones() -> None:
    m = manifest.Manifest(
        step=1,
        created=1.0,
        writer="t",
        metadata={},
        tree={"pos": PerRankValues(({"i": 1}, {"i": 2, "j": (3,)}))},
        files=(),
        tensors=(),
        version=2,
    )
    back = manifest.decode(manifest.encode(m))
    assert back.version == 2 and back.tree == m.tree
    empty = manifest.Manifest(1, 1.0, "t", {}, {"pos": PerRankValues(())}, (), (), 2)
    with pytest.raises(CorruptCheckpointError, match="no rank"):
        manifest.decode(manifest.encode(empty))


def test_the_cli_shows_per_rank_values(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path)
    store.save(1, {"pos": PerRank({"i": 3})})
    out = subprocess.run(
        [sys.executable, "-m", "ckptstore", "show", str(tmp_path / "step_00000001")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "state['pos']  <per rank: 1 rank>" in out and "state['pos'][0]['i']  3" in out
