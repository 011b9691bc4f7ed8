"""Checkpoints written by an earlier ckptstore still restore.

``tests/data/v1/`` holds two stores written by ckptstore at commit 23d0972 (before the save pipelines were
merged, which changed the tensor files' names): ``plain`` (one process, every kind of leaf) and ``sharded``
(one process saving :class:`ckptstore.Shard` blocks). :func:`expected` is the state both were written
from; ``python -m tests.test_old_format DIR`` wrote them.
"""

from __future__ import annotations

import collections
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import ckptstore

DATA = Path(__file__).parent / "data" / "v1"
STEP = 7

Point = collections.namedtuple("Point", ["x", "y"])


def expected() -> dict[str, Any]:
    """The state of the ``plain`` store (the ``sharded`` store holds ``w`` and ``b`` as blocks)."""
    rng = np.random.default_rng(1234)
    return {
        "model": {
            "w": rng.standard_normal((6, 5)).astype(np.float32),
            "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
            "mask": rng.random((3, 3)) > 0.5,
            "ids": np.arange(-4, 4, dtype=np.int64),
            "empty": np.zeros((0, 3), dtype=np.float16),
            "scalar0d": np.array(2.5, dtype=np.float64),
        },
        "step": STEP,
        "lr": 0.125,
        "name": "run-1",
        "blob": b"\x00\x01",
        "big": 1 << 70,
        "z": complex(1.5, -2.0),
        "np_scalar": np.float32(0.75),
        "pair": (1, "two", None),
        "point": Point(3, [4, 5]),
        "groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.01, "params": [2]}],
    }


class ThreadWorld:
    """A coordinator for ``world`` threads of one process (each thread one rank), for writing test data."""

    def __init__(self, world: int) -> None:
        self.world_size = world
        self._barrier = threading.Barrier(world)
        self._box: list[Any] = [None] * world
        self._local = threading.local()

    def rank_of(self, rank: int) -> _Rank:
        return _Rank(self, rank)


class _Rank:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.w, self.rank, self.world_size = world, rank, world.world_size

    def _exchange(self, obj: Any) -> list[Any]:
        self.w._barrier.wait()
        self.w._box[self.rank] = obj
        self.w._barrier.wait()
        out = list(self.w._box)
        self.w._barrier.wait()
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        out = self._exchange(obj)
        return out if self.rank == 0 else None

    def scatter(self, objs: list[Any] | None) -> Any:
        return self._exchange(objs)[0][self.rank]

    def broadcast(self, obj: Any) -> Any:
        return self._exchange(obj)[0]


def sharded_state(rank: int) -> dict[str, Any]:
    """Rank ``rank``'s (of 2) view of the ``sharded`` store's state: blocks of ``w`` and ``b``."""
    model = expected()["model"]
    w, b = model["w"], model["b"]
    rows = slice(0, 2) if rank == 0 else slice(2, 6)
    cols = slice(0, 3) if rank == 0 else slice(3, 5)
    return {
        "w": ckptstore.Shard(w[rows], (6, 5), (rows.start, 0)),
        "b": ckptstore.Shard(b[cols], (5,), (cols.start,)),
        "ids": model["ids"],
        "step": STEP,
    }


def write(root: Path) -> None:
    """Write both stores under ``root`` (how tests/data/v1 was made)."""
    shutil.rmtree(root, ignore_errors=True)
    ckptstore.CheckpointStore(root / "plain").save(STEP, expected(), metadata={"loss": 0.5})
    world = ThreadWorld(2)
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            store = ckptstore.CheckpointStore(root / "sharded", coordinator=world.rank_of(r))
            store.save(STEP, sharded_state(r), metadata={"ranks": 2})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_plain_checkpoint_of_format_1_restores() -> None:
    store = ckptstore.CheckpointStore(DATA / "plain")
    assert store.steps() == [STEP]
    assert store.info(STEP).metadata == {"loss": 0.5}
    assert_same(store.restore(STEP), _as_restored(expected()))
    assert store.verify() == [STEP]


def test_sharded_checkpoint_of_format_1_restores_whole_and_in_blocks() -> None:
    store = ckptstore.CheckpointStore(DATA / "sharded")
    whole = store.restore(STEP)
    model = expected()["model"]
    assert_same(whole, {"w": model["w"], "b": model["b"], "ids": model["ids"], "step": STEP})
    like = {
        "w": ckptstore.Shard(np.zeros((3, 5), np.float32), (6, 5), (3, 0)),
        "b": ckptstore.Shard(np.zeros((1,), ml_dtypes.bfloat16), (5,), (2,)),
        "ids": np.zeros(8, np.int64),
        "step": 0,
    }
    part = store.restore(STEP, like=like)
    assert_same(part["w"].local, model["w"][3:6])
    assert_same(part["b"].local, model["b"][2:3])
    assert store.verify() == [STEP]


def _as_restored(state: dict[str, Any]) -> dict[str, Any]:
    """What a restore without ``like`` gives back for :func:`expected` (NamedTuples come back as dicts)."""
    out = dict(state)
    out["point"] = {"x": 3, "y": [4, 5]}
    return out


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(b, list | tuple) and not isinstance(b, np.ndarray):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(b, np.ndarray | np.generic):
        assert np.asarray(a).dtype == np.asarray(b).dtype, path
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
