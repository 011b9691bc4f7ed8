"""Every failure a user can cause or meet is a named ckptstore error naming the key path or file, and a failed
save writes nothing."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StructureMismatchError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from tests.conftest import Location


@pytest.fixture
def store(tmp_path: pathlib.Path) -> ckptstore.CheckpointStore:
    return ckptstore.CheckpointStore(tmp_path / "run")


def entries(root: str | os.PathLike[str]) -> list[str]:
    """What a store root holds besides the store's own hidden files (lock, leases), but with any temp or
    trash directory or writer liveness file (nothing if the root does not exist)."""
    if not os.path.exists(root):
        return []
    return sorted(n for n in os.listdir(root) if not n.startswith(".") or n.startswith((".tmp-", ".trash-")))


# --- unsupported leaves: named key path, nothing written ----------------------------------------------


class Holder:
    """Neither an array, a container nor stateful."""


UNSUPPORTED: list[tuple[str, Any, str]] = [
    ("lambda", {"opt": {"lr": 0.1, "fn": lambda step: 0.9**step}}, "state['opt']['fn']"),
    ("object in list", {"a": [1, 2, Holder()]}, "state['a'][2]"),
    ("set", {"s": {1, 2}}, "state['s']"),
    ("type", {"t": int}, "state['t']"),
    ("string array", {"x": np.array(["a", "b"])}, "state['x']"),
    ("object array", {"x": np.array([object()])}, "state['x']"),
    ("complex128 array", {"x": np.zeros(2, np.complex128)}, "state['x']"),
    ("int4 array", {"x": np.zeros(2, ml_dtypes.int4)}, "state['x']"),
    ("datetime array", {"x": np.zeros(2, "datetime64[s]")}, "state['x']"),
    ("structured array", {"x": np.zeros(2, [("a", "i4")])}, "state['x']"),
    ("datetime scalar", {"x": np.datetime64("2020-01-01")}, "state['x']"),
    ("complex128 scalar", {"x": np.complex128(1)}, "state['x']"),
    ("tuple key", {"d": {(1, 2): 3}}, "state['d']"),
    ("float key", {1.5: 1}, "state"),
    ("bool key", {"d": {True: 1}}, "state['d']"),
    ("torch complex128", {"t": torch.zeros(2, dtype=torch.complex128)}, "state['t']"),
    ("torch complex32", {"t": torch.zeros(2, dtype=torch.complex32)}, "state['t']"),
    ("torch float8 fnuz", {"t": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}, "state['t']"),
    ("torch sparse", {"t": torch.eye(2).to_sparse()}, "state['t']"),
    ("torch quantized", {"t": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)}, "state['t']"),
    ("torch meta", {"t": torch.zeros(2, device="meta")}, "state['t']"),
    ("torch dtype object", {"t": torch.float32}, "state['t']"),
    (
        "deep in a module's neighbours",
        {"m": torch.nn.Linear(1, 1), "x": [{"y": (1, Holder())}]},
        "state['x'][0]['y'][1]",
    ),
]


@pytest.mark.parametrize(("state", "path"), [(s, p) for _, s, p in UNSUPPORTED], ids=[n for n, _, _ in UNSUPPORTED])
def test_unsupported_leaf_names_its_path_and_writes_nothing(
    store: ckptstore.CheckpointStore, state: Any, path: str
) -> None:
    with pytest.raises(UnsupportedTypeError) as e:
        store.save(1, state)
    assert str(e.value).startswith(path), str(e.value)
    assert isinstance(e.value, TypeError)  # callers may catch the builtin too
    assert entries(store.url) == []  # no step directory, no temp directory, no liveness file
    assert store.steps() == []


def test_unsupported_leaf_on_memory_writes_nothing(memory_url: Location) -> None:
    import fsspec

    store = memory_url.store()
    with pytest.raises(UnsupportedTypeError, match=r"state\['opt'\]\['fn'\]"):
        store.save(1, {"w": np.ones(3), "opt": {"fn": lambda: 0}})
    assert list(fsspec.filesystem("memory").store) == []


def test_unsupported_leaf_keeps_earlier_checkpoints(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"a": np.ones(2)})
    with pytest.raises(UnsupportedTypeError):
        store.save(2, {"a": np.ones(2), "bad": Holder()})
    with pytest.raises(UnsupportedTypeError):
        store.save(1, {"bad": Holder()}, overwrite=True)
    assert store.steps() == [1]
    assert store.restore(1)["a"].tolist() == [1.0, 1.0]
    assert entries(store.url) == ["step_00000001"]


def test_single_directory_save_of_unsupported_writes_nothing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UnsupportedTypeError, match=r"state\['f'\]"):
        ckptstore.save(tmp_path / "ck", {"f": print})
    assert entries(tmp_path) == []


def test_self_containing_state(store: ckptstore.CheckpointStore) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(UnsupportedTypeError, match="nests too deeply"):
        store.save(1, loop)
    assert entries(store.url) == []


def test_stateful_whose_state_holds_an_unsupported_leaf(store: ckptstore.CheckpointStore) -> None:
    class Thing:
        def state_dict(self) -> dict[str, Any]:
            return {"ok": 1, "bad": Holder()}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    with pytest.raises(UnsupportedTypeError, match=r"state\['thing'\]\['bad'\]"):
        store.save(1, {"thing": Thing()})


# --- bad steps ----------------------------------------------------------------------------------------

BAD_STEPS = [-1, True, False, 1.0, 2.5, "3", None, b"1", 1 << 63, 1 << 70, np.float64(3)]


@pytest.mark.parametrize("step", BAD_STEPS, ids=repr)
def test_bad_step_values(store: ckptstore.CheckpointStore, step: Any) -> None:
    for call in (
        lambda: store.save(step, {"a": 1}),
        lambda: store.restore(step),
        lambda: store.info(step),
        lambda: store.delete(step),
    ):
        with pytest.raises(CkptStoreError, match="step"):
            call()
    assert entries(store.url) == []


def test_largest_step_is_listed(store: ckptstore.CheckpointStore) -> None:
    big = (1 << 63) - 1
    store.save(big, {"a": 1})
    assert store.steps() == [big]
    assert store.restore() == {"a": 1}


# --- metadata -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"a": np.zeros(3)}, r"metadata\['a'\] is an array"),
        ({"a": {"b": torch.zeros(1)}}, r"metadata\['a'\]\['b'\] is an array"),
        ({"a": Holder()}, r"metadata\['a'\]"),
        ({"a": [1, lambda: 0]}, r"metadata\['a'\]\[1\]"),
        ({"a": np.float32([1])}, r"metadata\['a'\] is an array"),
        ({"m": torch.nn.Linear(1, 1)}, "."),
        ([1, 2], "must be a dict"),
        ("epoch=1", "must be a dict"),
    ],
)
def test_bad_metadata(store: ckptstore.CheckpointStore, metadata: Any, match: str) -> None:
    with pytest.raises(UnsupportedTypeError, match=match):
        store.save(1, {"w": np.ones(2)}, metadata=metadata)
    assert entries(store.url) == []


# --- like= that does not fit --------------------------------------------------------------------------


class Pair(NamedTuple):
    a: Any
    b: Any


@pytest.fixture
def saved(store: ckptstore.CheckpointStore) -> ckptstore.CheckpointStore:
    store.save(
        1,
        {
            "model": torch.nn.Linear(3, 2),
            "opt": {"w": np.zeros(3), "hist": [np.ones(2), np.ones(2)]},
            "pair": Pair(np.zeros(1), 2),
        },
    )
    return store


@pytest.mark.parametrize(
    ("like", "match"),
    [
        (
            {"model": torch.nn.Linear(3, 2), "opt": {"w": np.zeros(3), "hist": [np.ones(2)]}},
            r"^state: keys differ.*'pair'",
        ),
        (
            {"model": torch.nn.Linear(4, 2), "opt": {"w": np.zeros(3), "hist": [np.ones(2)] * 2}, "pair": None},
            r"state\['model'\]\['weight'\]",
        ),
        (
            {"model": torch.nn.Linear(3, 2), "opt": {"w": np.zeros(4), "hist": [np.ones(2)] * 2}, "pair": None},
            r"state\['opt'\]\['w'\]",
        ),
        (
            {"model": torch.nn.Linear(3, 2), "opt": {"w": np.zeros(3), "hist": [np.ones(2)] * 3}, "pair": None},
            r"state\['opt'\]\['hist'\]",
        ),
        (
            {"model": torch.nn.Linear(3, 2), "opt": {"w": np.zeros(3), "hist": [np.ones(2)] * 2, "x": 1}, "pair": None},
            r"state\['opt'\]",
        ),
        (
            {"model": torch.zeros(2), "opt": None, "pair": None},
            r"state\['model'\]",
        ),
        (
            {"model": torch.nn.Linear(3, 2, bias=False), "opt": None, "pair": None},
            r"state\['model'\].*load_state_dict",
        ),
        (
            {"model": torch.nn.Sequential(torch.nn.Linear(3, 2)), "opt": None, "pair": None},
            r"state\['model'\]",
        ),
        (
            {"model": torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1), "opt": None, "pair": None},
            r"state\['model'\]",
        ),
        ([torch.nn.Linear(3, 2)], r"^state: "),
        (
            {"model": torch.nn.Linear(3, 2), "opt": {"w": torch.nn.Linear(1, 1), "hist": None}, "pair": None},
            r"state\['opt'\]\['w'\]",
        ),
    ],
)
def test_like_mismatch_names_the_path(saved: ckptstore.CheckpointStore, like: Any, match: str) -> None:
    with pytest.raises(StructureMismatchError, match=match):
        saved.restore(1, like=like)


def test_like_with_plain_placeholders_is_not_a_mismatch(saved: ckptstore.CheckpointStore) -> None:
    model = torch.nn.Linear(3, 2)
    back = saved.restore(1, like={"model": model, "opt": None, "pair": Pair(torch.zeros(1), 0)})
    assert back["model"] is model
    assert back["opt"]["hist"][1].tolist() == [1.0, 1.0]
    assert type(back["pair"]) is Pair and isinstance(back["pair"].a, torch.Tensor) and back["pair"].b == 2


# --- damaged checkpoints ------------------------------------------------------------------------------


def manifest_path(store: ckptstore.CheckpointStore, step: int) -> pathlib.Path:
    return pathlib.Path(store.info(step).path) / "manifest.msgpack"


def rewrite_manifest(path: pathlib.Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)  # extension types stay ExtType
    change(doc)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))


@pytest.fixture
def one(store: ckptstore.CheckpointStore) -> ckptstore.CheckpointStore:
    store.save(5, {"w": np.arange(10, dtype=np.float32), "b": np.ones(3, np.int64), "n": 1}, metadata={"e": 1})
    return store


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(key, value)


def set_tensor(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["tensors"][0].__setitem__(field, value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (set_key("format", "other"), "not a ckptstore manifest"),
        (set_key("step", -1), "step"),
        (set_key("step", "5"), "step"),
        (set_key("created", "yesterday"), "creation time"),
        (set_key("metadata", [1]), "metadata"),
        (set_key("files", {}), "files"),
        (lambda d: d["files"][0].__setitem__("name", "../../etc/passwd"), "file name"),
        (lambda d: d["files"][0].__setitem__("name", "manifest.msgpack"), "file name"),
        (lambda d: d["files"].append(dict(d["files"][0])), "twice"),
        (set_tensor("dtype", "F128"), "dtype"),
        (set_tensor("shape", [11]), "bytes"),
        (set_tensor("shape", [-1]), "shape"),
        (set_tensor("offset", 1 << 40), "lies at bytes"),
        (set_tensor("file", 3), "file #3"),
        (lambda d: d["tensors"][1].__setitem__("offset", d["tensors"][0]["offset"]), "overlap"),
        (lambda d: d.__setitem__("tree", msgpack.ExtType(99, b"")), "extension type 99"),
        (lambda d: d.__setitem__("tree", msgpack.ExtType(2, msgpack.packb(7))), "tensor #7"),
        (lambda d: d.__setitem__("tree", msgpack.ExtType(2, msgpack.packb(-1))), "tensor reference"),
    ],
)
def test_inconsistent_manifest(one: ckptstore.CheckpointStore, change: Any, match: str) -> None:
    path = manifest_path(one, 5)
    rewrite_manifest(path, change)
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        one.restore(5)
    assert "step_00000005" in str(e.value)


def test_newer_format_version(one: ckptstore.CheckpointStore) -> None:
    rewrite_manifest(manifest_path(one, 5), set_key("version", 99))
    with pytest.raises(UnsupportedFormatError, match="version 99"):
        one.restore(5)
    with pytest.raises(CorruptCheckpointError):  # UnsupportedFormatError is a CorruptCheckpointError
        one.info(5)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b[:1],
        lambda b: b"",
        lambda b: b"\xc1" + b[1:],
        lambda b: b"not msgpack at all",
        lambda b: msgpack.packb([1, 2, 3]),
        lambda b: msgpack.packb({"format": "ckptstore"}),
        lambda b: b + b"trailing",
    ],
    ids=["half", "one byte", "empty", "reserved byte", "text", "a list", "no fields", "trailing bytes"],
)
def test_damaged_manifest(one: ckptstore.CheckpointStore, damage: Callable[[bytes], bytes]) -> None:
    path = manifest_path(one, 5)
    path.write_bytes(damage(path.read_bytes()))
    assert one.steps() == [5]  # still listed: its manifest exists
    for call in (lambda: one.restore(5), lambda: one.info(5), lambda: ckptstore.restore(path.parent)):
        with pytest.raises(CorruptCheckpointError, match=r"manifest\.msgpack"):
            call()


def test_truncated_and_missing_tensor_file(one: ckptstore.CheckpointStore) -> None:
    step_dir = pathlib.Path(one.info(5).path)
    (tensor_file,) = step_dir.glob("*.safetensors")
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[:-7])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        one.restore(5)
    tensor_file.write_bytes(data + b"extra")
    with pytest.raises(CorruptCheckpointError, match=re.escape(tensor_file.name)):
        one.restore(5)
    tensor_file.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        one.restore(5)
    assert one.info(5).metadata == {"e": 1}  # the manifest alone still reads


def test_flipped_byte_found_by_verify(one: ckptstore.CheckpointStore) -> None:
    step_dir = pathlib.Path(one.info(5).path)
    (tensor_file,) = step_dir.glob("*.safetensors")
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's bytes
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        one.restore(5, verify=True)


# --- nothing bare escapes -----------------------------------------------------------------------------


def test_no_bare_builtin_errors(tmp_path: pathlib.Path) -> None:
    """A sweep of misuse: each raises a CkptStoreError (which may also be a builtin), never a bare one."""
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(1, {"a": np.ones(2), "m": torch.nn.Linear(2, 2)})
    calls: list[Callable[[], Any]] = [
        lambda: store.save(1, {"a": 1}),
        lambda: store.save(-5, {}),
        lambda: store.save(2, {"x": object()}),
        lambda: store.save(2, {}, metadata={"x": object()}),
        lambda: store.save(2, {}, metadata=[]),
        lambda: store.restore(9),
        lambda: store.restore(1, framework="mxnet"),
        lambda: store.restore(1, like={"a": np.ones(3), "m": None}),
        lambda: store.restore(1, like={"a": None, "m": torch.nn.Linear(3, 3)}),
        lambda: store.restore(1, like={"a": None, "m": torch.nn.Conv1d(2, 2, 1)}),
        lambda: store.restore(1, like=[np.ones(2)]),
        lambda: store.info(9),
        lambda: store.delete(9),
        lambda: ckptstore.CheckpointStore(tmp_path / "x", max_to_keep="2"),
        lambda: ckptstore.CheckpointStore(tmp_path / "x", keep_every_n_hours=-1),
        lambda: ckptstore.restore(tmp_path / "nothing"),
        lambda: ckptstore.restore(tmp_path / "run"),
        lambda: ckptstore.save(tmp_path / "run" / "step_00000001", {"a": 2}),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(CkptStoreError):
            call()
        assert store.steps() == [1], i
    assert store.restore(1)["a"].tolist() == [1.0, 1.0]


def test_error_hierarchy() -> None:
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(CheckpointExistsError, FileExistsError)
    assert issubclass(UnsupportedTypeError, TypeError)
    assert issubclass(StructureMismatchError, ValueError)
    assert issubclass(UnsupportedFormatError, CorruptCheckpointError)
    for name in ckptstore.errors.__all__:
        cls = getattr(ckptstore.errors, name)
        assert issubclass(cls, Warning) or issubclass(cls, CkptStoreError), name
