"""Sharded arrays in one process: Shard checks, partition geometry, the rank assignment, the sharded
manifest's strict validation, block reads that touch only the bytes they need, DTensor leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import Shard, distributed, manifest, pipeline, tree
from ckptstore.blocks import check_partition
from ckptstore.errors import CorruptCheckpointError, ShardingError, StructureMismatchError
from tests.conftest import Location
from tests.s3server import free_port

# --- Shard ------------------------------------------------------------------------------------------


def test_shard_fields_and_slices() -> None:
    s = Shard(np.zeros((2, 3)), [4, 6], (2, 3))
    assert s.global_shape == (4, 6) and s.offsets == (2, 3) and s.local_shape == (2, 3)
    assert s.slices == (slice(2, 4), slice(3, 6))


@pytest.mark.parametrize(
    ("local", "global_shape", "offsets", "words"),
    [
        (np.zeros((2, 3)), (4, 6), (3, 0), "outside"),
        (np.zeros((2, 3)), (4, 6, 1), (0, 0, 0), "dimensions"),
        (np.zeros((2, 3)), (4, 6), (0,), "dimensions"),
        (np.zeros((2, 3)), (4, 6), (-1, 0), "non-negative"),
        (np.zeros((2, 3)), (4, 6), (0.5, 0), "non-negative"),
        (np.zeros((2, 3)), 7, (0, 0), "sequence"),
        ([1, 2], (2,), (0,), "must be an array"),
    ],
)
def test_shard_rejects_what_does_not_fit(local: Any, global_shape: Any, offsets: Any, words: str) -> None:
    with pytest.raises(ShardingError, match=words):
        Shard(local, global_shape, offsets)


def test_shard_of_a_non_array_is_named_with_its_path(tmp_path: Path) -> None:
    class Fake:
        shape = (2,)

    with pytest.raises(ckptstore.errors.UnsupportedTypeError, match=r"\['w'\] is a Shard of a"):
        ckptstore.save(tmp_path / "c", {"w": Shard(Fake(), (2,), (0,))})
    assert not (tmp_path / "c").exists()


# --- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "global_shape", "problem"),
    [
        ([((0,), (5,)), ((5,), (3,))], (8,), None),
        ([((0, 0), (2, 3)), ((0, 3), (2, 1)), ((2, 0), (1, 4))], (3, 4), None),
        ([((), ())], (), None),  # a 0-d array: one block
        ([((0, 0), (0, 4))], (0, 4), None),  # no elements
        ([((0,), (5,)), ((4,), (4,))], (8,), "overlap"),
        ([((0, 0), (2, 2)), ((1, 1), (2, 2)), ((0, 2), (1, 1))], (3, 3), "overlap"),
        ([((0,), (5,))], (8,), "elements"),  # a gap
        ([((0,), (5,)), ((5,), (4,))], (8,), "outside"),
        ([((0,), (8,))], (8, 1), "dimensions"),
    ],
)
def test_check_partition(blocks: list[Any], global_shape: tuple[int, ...], problem: str | None) -> None:
    got = check_partition(blocks, global_shape)
    assert got is None if problem is None else problem in (got or "")


# --- assignment of blocks and replicated arrays to ranks ------------------------------------------


def report(*leaves: tuple[str, str, list[int], list[int] | None, list[int] | None]) -> list[list[Any]]:
    return [list(leaf) for leaf in leaves]


def test_assign_balances_replicated_arrays_and_writes_shared_blocks_once() -> None:
    # Four replicated arrays of 1000, 600, 500, 400 bytes and a block that both ranks hold (a DTensor
    # replicated over one mesh dimension): each written by exactly one rank, both ranks busy.
    rep = report(
        ("a", "F32", [250], None, None),
        ("b", "F32", [150], None, None),
        ("c", "F32", [125], None, None),
        ("d", "F32", [100], None, None),
        ("s", "F32", [4, 2], [4, 2], [0, 0]),
    )
    layout, tasks = pipeline.assign([rep, rep])
    written = sorted(leaf for rank_tasks in tasks for _, leaf in rank_tasks)
    assert written == [0, 1, 2, 3, 4]  # everything once
    assert all(tasks)  # no rank idle
    assert len(layout.slots) == 5


def test_assign_gives_each_rank_its_own_blocks() -> None:
    reports = [report(("w", "F32", [2, 4], [6, 4], [2 * r, 0])) for r in range(3)]
    layout, tasks = pipeline.assign(reports)
    assert [[leaf for _, leaf in t] for t in tasks] == [[0], [0], [0]]
    assert [layout.slots[t[0][0]][1] for t in tasks] == [(0, 0), (2, 0), (4, 0)]
    assert layout.leaves == [((6, 4), [0, 1, 2])]


@pytest.mark.parametrize(
    ("other", "words"),
    [
        (report(("v", "F32", [3], None, None)), "states differ"),
        (report(("w", "F32", [3], None, None), ("x", "F32", [1], None, None)), "states differ"),
        (report(("w", "F64", [3], None, None)), "disagree"),
        (report(("w", "F32", [4], None, None)), "different shapes"),
        (report(("w", "F32", [3], [3], [0])), "disagree"),
    ],
)
def test_assign_refuses_ranks_that_disagree(other: list[Any], words: str) -> None:
    with pytest.raises(ShardingError, match=words):
        pipeline.assign([report(("w", "F32", [3], None, None)), other])


def test_assign_refuses_blocks_that_leave_a_gap() -> None:
    reports = [report(("w", "F32", [2], [6], [0])), report(("w", "F32", [2], [6], [4]))]
    with pytest.raises(ShardingError, match=r"w: the ranks' shards of global shape \(6,\) do not fit"):
        pipeline.assign(reports)


# --- the sharded manifest -----------------------------------------------------------------------------


def sharded_manifest(blocks: list[tuple[int, tuple[int, ...]]], shapes: list[tuple[int, ...]], **kw: Any) -> bytes:
    tensors, files, pos = [], [manifest.FileEntry("t.safetensors", 10_000)], 8
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape)) * 4
        tensors.append(manifest.TensorEntry(f"w@{i}", 0, kw.get("dtype", "F32"), shape, pos, n, 0))
        pos += n
    ref = tree.ShardedRef(kw.get("global_shape", (4, 4)), "F32", tuple(blocks))
    m = manifest.Manifest(1, 1.0, "tok", {}, {"w": ref}, tuple(files), tuple(tensors))
    return manifest.encode(m)


def test_sharded_manifest_round_trip() -> None:
    data = sharded_manifest([(0, (0, 0)), (1, (2, 0))], [(2, 4), (2, 4)])
    m = manifest.decode(data)
    assert m.tree == {"w": tree.ShardedRef((4, 4), "F32", ((0, (0, 0)), (1, (2, 0))))}


@pytest.mark.parametrize(
    ("blocks", "shapes", "kw", "words"),
    [
        ([(0, (0, 0)), (1, (1, 0))], [(2, 4), (2, 4)], {}, "overlap"),
        ([(0, (0, 0))], [(2, 4)], {}, "elements"),
        ([(0, (0, 0)), (1, (3, 0))], [(2, 4), (2, 4)], {}, "outside"),
        ([(0, (0, 0)), (5, (2, 0))], [(2, 4), (2, 4)], {}, "names tensor #5"),
        ([(0, (0, 0)), (0, (2, 0))], [(2, 4)], {}, "belongs to two"),
        ([(0, (0, 0)), (1, (2, 0))], [(2, 4), (2, 4)], {"dtype": "I32"}, "is I32"),
        ([(0, (0,)), (1, (2,))], [(2, 4), (2, 4)], {}, "dimensions"),
    ],
)
def test_sharded_manifest_validation_is_strict(blocks: Any, shapes: Any, kw: dict[str, Any], words: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=words):
        manifest.decode(sharded_manifest(blocks, shapes, **kw), source="m")


@pytest.mark.parametrize(
    "payload",
    [[[4, 4], "F32"], [[4, -1], "F32", []], [[4], "XX", []], [[4], "F32", [[0]]], [[4], "F32", [[0, 0]]], "x"],
)
def test_malformed_sharded_records_are_corrupt(payload: Any) -> None:
    import msgpack

    doc = manifest.decode(sharded_manifest([(0, (0, 0)), (1, (2, 0))], [(2, 4), (2, 4)]))
    raw = msgpack.unpackb(manifest.encode(doc), raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    raw["tree"] = {"w": msgpack.ExtType(manifest.EXT_SHARDED, msgpack.packb(payload))}
    with pytest.raises(CorruptCheckpointError):
        manifest.decode(msgpack.packb(raw, use_bin_type=True))


# --- one process: save Shards, restore any block ------------------------------------------------------


def test_one_process_sharded_round_trip_any_block(tmp_path: Path) -> None:
    import torch

    full = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, {"w": Shard(full, (7, 5), (0, 0)), "b": np.ones(3)})
    np.testing.assert_array_equal(store.restore()["w"], full)  # no like: the global array
    tmpl = Shard(torch.zeros(3, 2, dtype=torch.float64), (7, 5), (2, 1))
    got = store.restore(like={"w": tmpl, "b": Shard(np.zeros(2), (3,), (1,))})
    assert isinstance(got["w"], Shard) and got["w"].offsets == (2, 1)
    assert got["w"].local.dtype == torch.float64  # the template's framework and dtype
    np.testing.assert_array_equal(got["w"].local.numpy(), full[2:5, 1:3])
    np.testing.assert_array_equal(got["b"].local, [1.0, 1.0])  # a replicated array, cut to a block
    got = store.restore(like={"w": np.zeros((7, 5), np.float32), "b": None})  # a plain template: all of it
    np.testing.assert_array_equal(got["w"], full)
    with pytest.raises(StructureMismatchError, match=r"\['w'\].*global shape is \(8, 5\)"):
        store.restore(like={"w": Shard(np.zeros((1, 5)), (8, 5), (0, 0)), "b": None})


class CountingFile:
    def __init__(self, f: Any, counter: list[int]) -> None:
        self.f, self.counter = f, counter

    def readinto(self, buf: Any) -> Any:
        n = self.f.readinto(buf)
        self.counter[0] += n or 0
        self.counter[1] += 1
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ckptstore.CheckpointStore, list[int]]]:
    """A store whose tensor files count the bytes read from them (and the reads)."""
    store = ckptstore.CheckpointStore(tmp_path / "s")
    counter = [0, 0]
    real = store.storage.open_read
    monkeypatch.setattr(store.storage, "open_read", lambda rel: CountingFile(real(rel), counter))
    yield store, counter


def test_block_reads_touch_only_the_bytes_they_need(counted: tuple[ckptstore.CheckpointStore, list[int]]) -> None:
    store, counter = counted
    full = np.arange(256 * 4096, dtype=np.float32).reshape(256, 4096)  # 4 MiB, one stored block
    wide = np.arange(16 * 262144, dtype=np.float32).reshape(16, 262144)  # 16 MiB: 16 rows of 1 MiB
    store.save(1, {"w": Shard(full, full.shape, (0, 0))})
    store.save(2, {"w": Shard(wide, wide.shape, (0, 0))})

    def block(offsets: tuple[int, int], shape: tuple[int, int], verify: bool, of: np.ndarray = full) -> np.ndarray:
        counter[:] = [0, 0]
        step = 1 if of is full else 2
        got = store.restore(step, like={"w": Shard(np.zeros(shape, np.float32), of.shape, offsets)}, verify=verify)
        region = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
        np.testing.assert_array_equal(got["w"].local, of[region])
        return np.array(counter)

    assert block((10, 0), (20, 4096), verify=False).tolist() == [20 * 4096 * 4, 1]  # whole rows: one run
    # A thin column: 256 short runs cost more as requests than the bytes between them as one span.
    assert block((0, 8), (256, 8), verify=False).tolist() == [(255 * 4096 + 8) * 4, 1]
    nbytes, reads = block((0, 0), (256, 3000), verify=False)  # most of each row: one span, a little waste
    assert nbytes < 4 << 20 and reads == 1
    # 16 KiB of each 1 MiB row: a read per row (16 KiB each) saves almost all of the 16 MiB.
    assert block((0, 1000), (16, 4096), verify=False, of=wide).tolist() == [16 * 4096 * 4, 16]
    nbytes, _ = block((0, 8), (256, 8), verify=True)  # verifying reads the stored block whole
    assert nbytes == full.nbytes


def test_verify_catches_a_damaged_block_before_anything_is_restored(tmp_path: Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "s")
    full = np.arange(64, dtype=np.int64).reshape(8, 8)
    info = store.save(1, {"w": Shard(full, full.shape, (0, 0))})
    path = next(Path(info.path).glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    class Model:
        loaded = False

        def state_dict(self) -> dict[str, Any]:
            return {"w": Shard(np.zeros((2, 8), np.int64), (8, 8), (0, 0))}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.loaded = True

    model = Model()
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.restore(like=model)
    assert not model.loaded
    got = store.restore(like={"w": Shard(np.zeros((2, 8), np.int64), (8, 8), (0, 0))}, verify=False)
    np.testing.assert_array_equal(got["w"].local, full[:2])  # the damage lies outside this block


def test_verified_partial_blocks_of_two_sizes_come_back_exactly(tmp_path: Path) -> None:
    # Each stored block is read whole, checked and cut, one after the other through one scratch buffer,
    # which grows for b's larger block; what comes back shares no memory with it or with each other.
    a = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    b = np.arange(16 * 10, dtype=np.float64).reshape(16, 10) * 0.5
    store = ckptstore.CheckpointStore(tmp_path / "s")
    info = store.save(1, {"a": Shard(a, a.shape, (0, 0)), "b": Shard(b, b.shape, (0, 0))})
    like = {
        "a": Shard(np.zeros((8, 4), np.float32), a.shape, (0, 1)),
        "b": Shard(np.zeros((13, 3)), b.shape, (2, 6)),
    }
    got = store.restore(1, like=like)
    np.testing.assert_array_equal(got["a"].local, a[:, 1:5])
    np.testing.assert_array_equal(got["b"].local, b[2:15, 6:9])
    again = store.restore(1, like=like)
    assert not np.shares_memory(got["a"].local, got["b"].local)
    assert not np.shares_memory(got["b"].local, again["b"].local)
    np.testing.assert_array_equal(got["a"].local, a[:, 1:5])  # not overwritten by the second restore
    path = next(Path(info.path).glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    (end,) = [v["data_offsets"][1] for k, v in header.items() if k.startswith("b")]
    data[8 + n + end - 1] ^= 0xFF  # b[15, 9]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"'b@0,0' fails its checksum"):
        store.restore(1, like=like)
    got = store.restore(1, like={**like, "b": Shard(np.zeros((4, 3)), b.shape, (0, 6))}, verify=False)
    np.testing.assert_array_equal(got["b"].local, b[0:4, 6:9])  # the damage lies outside this block


# --- DTensor in one process, coordinator choice ------------------------------------------------------


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    yield
    dist.destroy_process_group()


def test_dtensor_leaves_one_process(tmp_path: Path, process_group: None) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.distributed.tensor import Shard as TShard

    assert distributed.resolve(None) is distributed.SINGLE  # a world of one: nothing to coordinate
    mesh = init_device_mesh("cpu", (1,))
    full = torch.arange(12.0).reshape(4, 3)
    state = {"s": distribute_tensor(full, mesh, [TShard(0)]), "r": distribute_tensor(full * 2, mesh, [Replicate()])}
    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, state)
    m = ckptstore.load.read_manifest(store.storage, "step_00000001")
    assert type(m.tree["s"]) is tree.ShardedRef and type(m.tree["r"]) is tree.TensorRef
    like = {
        "s": distribute_tensor(torch.zeros(4, 3), mesh, [TShard(1)]),
        "r": distribute_tensor(torch.zeros(4, 3), mesh, [TShard(0)]),
    }
    got = store.restore(like=like)
    assert isinstance(got["s"], DTensor) and got["s"].placements == (TShard(1),)
    assert torch.equal(got["s"].full_tensor(), full) and torch.equal(got["r"].full_tensor(), full * 2)
    partial = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    with pytest.raises(
        ckptstore.errors.UnsupportedTypeError, match=r"\['p'\]: DTensor placement P\(sum\) is not supported"
    ):
        store.save(2, {"p": partial})


class DModel:
    """A module whose parameters are DTensors (as FSDP2 leaves them), with a stepped AdamW whose state is
    DTensors too, on the one-rank mesh of ``process_group``."""

    def __init__(self, seed: int, dtype: Any = None) -> None:
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor
        from torch.distributed.tensor import Shard as TShard

        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(6, 8, dtype=dtype)
        for name, placement in (("weight", TShard(1)), ("bias", Replicate())):
            p = getattr(self.model, name)
            setattr(self.model, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        (self.model.weight.pow(3).sum() + self.model.bias.pow(3).sum()).backward()  # DTensor grads, AdamW state
        self.opt.step()

    def tensors(self) -> dict[str, Any]:
        """Every DTensor of the module's and the optimizer's state, by name."""
        out = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        for i, st in self.opt.state_dict()["state"].items():
            out.update({f"opt/{i}/{k}": v for k, v in st.items() if k != "step"})
        return out

    def values(self) -> dict[str, Any]:
        return {k: v.full_tensor().clone() for k, v in self.tensors().items()}

    def addresses(self) -> dict[str, int]:
        return {k: v.to_local().data_ptr() for k, v in self.tensors().items()}


@pytest.mark.parametrize("location", ["local", "s3"], indirect=True)
def test_a_modules_dtensors_are_read_in_place(
    location: Location, process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved as a sharded array (weight, Shard(1)) and as a plain one (bias, Replicate); read straight into
    # the local tensors of the module's and the optimizer's DTensors (on S3: ranged GETs into them): no new
    # DTensor is made, no copy.
    import torch

    from ckptstore import shard

    saved = DModel(1)
    want = saved.values()
    store = location.store()
    store.save(1, {"model": saved.model, "opt": saved.opt})
    m = ckptstore.load.read_manifest(store.storage, "step_00000001")
    assert type(m.tree["model"].state["weight"]) is tree.ShardedRef
    assert type(m.tree["model"].state["bias"]) is tree.TensorRef
    made: list[Any] = []
    real = shard.dtensor_like
    monkeypatch.setattr(shard, "dtensor_like", lambda *a: made.append(a) or real(*a))
    for verify in (True, False):
        target = DModel(2)
        before = target.addresses()
        got = store.restore(like={"model": target.model, "opt": target.opt}, verify=verify)
        assert got["model"] is target.model and made == []
        assert target.addresses() == before
        values = target.values()
        assert values.keys() == want.keys()
        for k in want:
            assert torch.equal(values[k], want[k]), k
    # DTensors that are no object's state are templates: new DTensors come back, the template is untouched.
    template = DModel(3)
    got = store.restore(like={"model": template.model.state_dict(), "opt": None})
    assert len(made) == 2 and torch.equal(got["model"]["weight"].full_tensor(), want["model/weight"])
    assert not torch.equal(template.model.weight.full_tensor(), want["model/weight"])
    # Another dtype in the module: converted, not read in place, still exact.
    other = DModel(4, dtype=torch.float64)
    store.restore(like={"model": other.model, "opt": None})
    assert torch.equal(other.model.weight.full_tensor(), want["model/weight"].double())


def test_a_modules_dtensors_on_a_device_are_filled_through_the_bounce_buffer(
    tmp_path: Path, process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU a DTensor's local tensor cannot be read into: each block is assembled in the kept bounce
    # buffer (pinned there) and copied to the device. Driven here with the CPU tensors as device targets,
    # as the bounce pipeline's own tests do.
    import torch

    from ckptstore import shard
    from ckptstore.frameworks import torch as torch_fw

    real_view = torch_fw.TorchAdapter.fill_view
    targets: list[Any] = []

    def fill_view(self: Any, x: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        view = real_view(self, x, dtype, shape)
        if view is None or not shard.is_dtensor(x):
            return view
        targets.append(self.device_target(x.to_local()))
        return targets[-1]

    monkeypatch.setattr(torch_fw.TorchAdapter, "fill_view", fill_view)
    monkeypatch.setattr(torch_fw.BounceBuffer, "_kept", None)
    made: list[Any] = []
    real_like = shard.dtensor_like
    monkeypatch.setattr(shard, "dtensor_like", lambda *a: made.append(a) or real_like(*a))
    saved = DModel(1)
    want = saved.values()
    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, {"model": saved.model, "opt": saved.opt})
    target = DModel(2)
    before = target.addresses()
    store.restore(like={"model": target.model, "opt": target.opt})
    assert targets and made == [] and target.addresses() == before
    values = target.values()
    for k in want:
        assert torch.equal(values[k], want[k]), k
    kept = torch_fw.BounceBuffer._kept
    assert kept is not None and kept.host.nbytes == max(t.nbytes for t in targets)  # the largest block


def test_a_damaged_block_read_into_a_dtensor_is_reported_and_fallback_restores_the_older_step(
    tmp_path: Path, process_group: None
) -> None:
    import torch

    store = ckptstore.CheckpointStore(tmp_path / "s")
    store.save(1, {"model": DModel(1).model})
    step2 = DModel(2)
    info = store.save(2, {"model": step2.model})
    path = next(Path(info.path).glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last bytes of the file: the last block read
    path.write_bytes(bytes(data))
    target = DModel(3)
    with pytest.raises(CorruptCheckpointError, match=r"checksum.*the objects in `like` were partly overwritten"):
        store.restore(2, like={"model": target.model}, verify=True)
    before = target.addresses()
    with pytest.warns(ckptstore.errors.CorruptCheckpointWarning, match="restored step 1"):
        store.restore(like={"model": target.model}, verify=True, fallback=True)
    assert target.addresses() == before
    assert torch.equal(target.model.weight.full_tensor(), DModel(1).model.weight.full_tensor())
    resumed = DModel(4)
    before = resumed.addresses()
    with pytest.warns(ckptstore.errors.CorruptCheckpointWarning):
        state, step = store.resume({"model": resumed.model})
    assert step == 1 and state["model"] is resumed.model and resumed.addresses() == before
    assert torch.equal(resumed.model.weight.full_tensor(), DModel(1).model.weight.full_tensor())


def test_explicit_coordinator_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ckptstore.errors.CkptStoreError, match="coordinator must have"):
        ckptstore.CheckpointStore(tmp_path / "s", coordinator=object()).save(1, {})  # type: ignore[arg-type]
    store = ckptstore.CheckpointStore(tmp_path / "s", coordinator=distributed.SINGLE)
    store.save(1, {"x": np.ones(2)})
    assert store.steps() == [1]


def test_importing_ckptstore_imports_no_torch() -> None:
    code = "import sys, ckptstore; ckptstore.distributed.resolve(None); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_example_runs_in_one_process(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    scope: dict[str, Any] = {"path": str(tmp_path / "ckpts")}
    exec(compile(code, "docs/distributed.md", "exec"), scope)
    assert scope["state"]["w"].local.shape == (1024, 256)
    assert ckptstore.CheckpointStore(tmp_path / "ckpts").steps() == [100]
