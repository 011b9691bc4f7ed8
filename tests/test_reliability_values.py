"""Reliability round 2, values, misuse and the CLI (issue 13, classes 5, 6 and 7).

* Whatever ``save`` accepts, ``restore`` gives back, for every leaf type the tree takes (one table); every
  value it cannot give back (ints past 4300 digits, lone surrogates, keys that collide once saved, ...) is an
  ``UnsupportedTypeError`` naming the key path, raised before anything is written.
* Misuse of the public API (``keys=5``, ``framework=[...]``, a ``like`` that cannot hold numbers) is a named
  error naming the argument, never a bare builtin exception.
* The CLI never prints a traceback for a damaged or hostile store: it lists every other step and marks the
  damaged one (``ls``, ``show``, ``verify``, ``watch``).
"""

from __future__ import annotations

import collections
import datetime
import enum
import math
import os
import pathlib
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import dtypes, knobs
from ckptstore.cli import main
from ckptstore.errors import CkptStoreError, StructureMismatchError, UnsupportedTypeError
from ckptstore.manifest import EXT_BIGINT, EXT_STATEFUL, EXT_TUPLE

# --- helpers ------------------------------------------------------------------------------------------


def entries(root: str | os.PathLike[str]) -> list[str]:
    """What a store root holds besides its lock and leases: step, temp and trash directories, liveness files."""
    if not os.path.exists(root):
        return []
    return sorted(n for n in os.listdir(root) if not n.startswith(".") or n.startswith((".tmp-", ".trash-")))


def same(got: Any, want: Any) -> bool:
    """Equal, with the same types all the way down, NaN and -0.0 by their bits, arrays by dtype, shape, bytes."""
    if type(got) is not type(want):
        return False
    if isinstance(want, np.ndarray):
        return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    if isinstance(want, np.generic):
        return got.dtype == want.dtype and got.tobytes() == want.tobytes()
    if type(want) is float:
        return struct.pack("<d", got) == struct.pack("<d", want)
    if type(want) is complex:
        return same(got.real, want.real) and same(got.imag, want.imag)
    if isinstance(want, Mapping):
        return len(got) == len(want) and all(
            same(gk, wk) and same(gv, wv) for (gk, gv), (wk, wv) in zip(got.items(), want.items())
        )
    if isinstance(want, list | tuple):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return bool(got == want)


@pytest.fixture
def store(tmp_path: pathlib.Path) -> ckptstore.CheckpointStore:
    return ckptstore.CheckpointStore(tmp_path / "run")


@pytest.fixture
def int_digits() -> Iterator[Callable[[int], None]]:
    """Sets ``sys.set_int_max_str_digits`` for the test, and puts the old value back."""
    old = sys.get_int_max_str_digits()
    yield sys.set_int_max_str_digits
    sys.set_int_max_str_digits(old)


# --- class 5: every leaf type round-trips -------------------------------------------------------------


class Color(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2


class Ratio(float, enum.Enum):
    HALF = 0.5


class Mode(enum.StrEnum):
    TRAIN = "train"


class Pair(NamedTuple):
    a: Any
    b: Any


class Empty(NamedTuple):
    pass


class Outer(NamedTuple):
    inner: Pair
    items: list[Any]


class MyStr(str):
    def __str__(self) -> str:
        return "not the value"


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyBytes(bytes):
    pass


class MyComplex(complex):
    pass


def numpy_scalars() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for code in dtypes.supported_codes():
        dt = dtypes.dtype_of(code)
        out.append((f"np scalar {code}", dt.type(1)))
        if code.startswith(("F", "BF")):
            out.append((f"np scalar {code} fraction", dt.type(0.5 if code == "F8_E8M0" else -1.5)))
    out += [
        ("np float64 nan", np.float64("nan")),
        ("np float32 -0.0", np.float32(-0.0)),
        ("np float16 inf", np.float16("inf")),
        ("np complex64", np.complex64(1.5 - 2j)),
        ("np int64 min", np.int64(-(2**63))),
        ("np uint64 max", np.uint64(2**64 - 1)),
        ("np bool", np.True_),
        ("bfloat16 nan", ml_dtypes.bfloat16("nan")),
    ]
    return out


def numpy_arrays() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for code in dtypes.supported_codes():
        dt = dtypes.dtype_of(code)
        out.append((f"np array {code}", np.arange(6).reshape(2, 3).astype(dt)))
        out.append((f"np 0-d {code}", np.array(1, dt)))
        out.append((f"np empty {code}", np.zeros((0, 3), dt)))
    return out


# (id, value saved under state["v"], what restore() gives back, what restore(like=state) gives back)
SAME = object()
ROUND_TRIPS: list[tuple[str, Any, Any, Any]] = [
    ("None", None, None, SAME),
    ("True", True, True, SAME),
    ("False", False, False, SAME),
    ("int 0", 0, 0, SAME),
    ("int -1", -1, -1, SAME),
    ("int64 max", 2**63 - 1, 2**63 - 1, SAME),
    ("int64 min", -(2**63), -(2**63), SAME),
    ("uint64 max", 2**64 - 1, 2**64 - 1, SAME),
    ("2**64", 2**64, 2**64, SAME),
    ("below int64", -(2**63) - 1, -(2**63) - 1, SAME),
    ("4300 digits", 10**4299, 10**4299, SAME),
    ("4300 nines", 10**4300 - 1, 10**4300 - 1, SAME),
    ("-4300 nines", -(10**4300 - 1), -(10**4300 - 1), SAME),
    ("float 1.5", 1.5, 1.5, SAME),
    ("float -0.0", -0.0, -0.0, SAME),
    ("float inf", math.inf, math.inf, SAME),
    ("float -inf", -math.inf, -math.inf, SAME),
    ("float nan", math.nan, math.nan, SAME),
    ("float tiny", 5e-324, 5e-324, SAME),
    ("float max", 1.7976931348623157e308, 1.7976931348623157e308, SAME),
    ("complex", 1 + 2j, 1 + 2j, SAME),
    ("complex nan -inf", complex(math.nan, -math.inf), complex(math.nan, -math.inf), SAME),
    ("complex -0j", complex(-0.0, -0.0), complex(-0.0, -0.0), SAME),
    ("str empty", "", "", SAME),
    ("str accents", "héllo wörld", "héllo wörld", SAME),
    ("str astral", "🎉 \U0010ffff", "🎉 \U0010ffff", SAME),
    ("str nul and controls", "a\x00b\x1b[31m\n", "a\x00b\x1b[31m\n", SAME),
    ("str 1 MB", "x" * (1 << 20), "x" * (1 << 20), SAME),
    ("bytes empty", b"", b"", SAME),
    ("bytes", bytes(range(256)), bytes(range(256)), SAME),
    ("bytes 1 MB", b"\xff" * (1 << 20), b"\xff" * (1 << 20), SAME),
    # subclasses and enums: saved as their base type's value
    ("str subclass", MyStr("value"), "value", "value"),
    ("int subclass", MyInt(7), 7, 7),
    ("float subclass", MyFloat(2.5), 2.5, 2.5),
    ("bytes subclass", MyBytes(b"ab"), b"ab", b"ab"),
    ("complex subclass", MyComplex(1, 2), 1 + 2j, 1 + 2j),
    ("(str, Enum) value", Color.RED, "red", "red"),
    ("IntEnum value", Level.HIGH, 2, 2),
    ("IntFlag value", Perm.R | Perm.W, 6, 6),
    ("(float, Enum) value", Ratio.HALF, 0.5, 0.5),
    ("StrEnum value", Mode.TRAIN, "train", "train"),
    ("np.str_", np.str_("text"), "text", "text"),
    ("np.bytes_", np.bytes_(b"raw"), b"raw", b"raw"),
    # containers
    ("list", [1, "a", None], [1, "a", None], SAME),
    ("tuple", (1, (2, (3,))), (1, (2, (3,))), SAME),
    ("dict int keys", {0: "a", -5: "b", 2**70: "c", 10**4299: "d"}, {0: "a", -5: "b", 2**70: "c", 10**4299: "d"}, SAME),
    ("dict mixed keys", {1: "int", "1": "str"}, {1: "int", "1": "str"}, SAME),
    ("OrderedDict", collections.OrderedDict(b=1, a=2), {"b": 1, "a": 2}, {"b": 1, "a": 2}),
    ("(str, Enum) keys", {Color.RED: 1, Color.GREEN: 2}, {"red": 1, "green": 2}, {"red": 1, "green": 2}),
    ("IntEnum keys", {Level.LOW: "l", Level.HIGH: "h"}, {1: "l", 2: "h"}, {1: "l", 2: "h"}),
    ("StrEnum keys", {Mode.TRAIN: np.ones(2)}, {"train": np.ones(2)}, {"train": np.ones(2)}),
    ("(str, Enum) key of an array", {Color.RED: np.arange(3)}, {"red": np.arange(3)}, {"red": np.arange(3)}),
    ("str subclass key", {MyStr("k"): 1}, {"k": 1}, {"k": 1}),
    ("NamedTuple", Pair(1, "x"), {"a": 1, "b": "x"}, SAME),
    ("NamedTuple of arrays", Pair(np.ones(2), np.float32(3)), {"a": np.ones(2), "b": np.float32(3)}, SAME),
    (
        "NamedTuple nested",
        Outer(Pair(1, 2), [Pair(3, 4)]),
        {"inner": {"a": 1, "b": 2}, "items": [{"a": 3, "b": 4}]},
        SAME,
    ),
    ("NamedTuple empty", Empty(), {}, SAME),
    ("NamedTuple of enums", Pair(Color.GREEN, Level.LOW), {"a": "green", "b": 1}, Pair("green", 1)),
    # nested empties
    ("empty dict", {}, {}, SAME),
    ("empty list", [], [], SAME),
    ("empty tuple", (), (), SAME),
    ("nested empties", [[], {}, (), [[]], {"a": {}}, ((),), [{}]], [[], {}, (), [[]], {"a": {}}, ((),), [{}]], SAME),
    ("deep", [[[[[[[[[[1]]]]]]]]]], [[[[[[[[[[1]]]]]]]]]], SAME),
    # arrays
    ("big-endian array", np.arange(4, dtype=">f4"), np.arange(4, dtype="<f4"), np.arange(4, dtype=">f4")),
    ("big-endian int array", np.array([1, -2], dtype=">i8"), np.array([1, -2], dtype="<i8"), np.array([1, -2], ">i8")),
    *[(name, v, v, SAME) for name, v in numpy_scalars()],
    *[(name, v, v, SAME) for name, v in numpy_arrays()],
]


@pytest.mark.parametrize(("value", "plain", "liked"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_every_leaf_type_round_trips(store: ckptstore.CheckpointStore, value: Any, plain: Any, liked: Any) -> None:
    state = {"v": value, "n": 1}
    store.save(1, state)
    back = store.restore(1)
    assert same(back["v"], plain), (back["v"], plain)
    back = store.restore(1, like=state)
    assert same(back["v"], value if liked is SAME else liked), back["v"]
    path = store.info(1).path
    assert same(ckptstore.restore(path)["v"], plain)


def plain_only(x: Any) -> bool:
    """No arrays, NumPy scalars or NamedTuples anywhere: what metadata holds."""
    if isinstance(x, np.ndarray | np.generic) or (isinstance(x, tuple) and hasattr(x, "_fields")):
        return False
    if isinstance(x, Mapping):
        return all(plain_only(v) for v in x.values())
    if isinstance(x, list | tuple):
        return all(plain_only(v) for v in x)
    return True


PLAIN_CASES = [c for c in ROUND_TRIPS if plain_only(c[1])]


@pytest.mark.parametrize(("value", "plain"), [c[1:3] for c in PLAIN_CASES], ids=[c[0] for c in PLAIN_CASES])
def test_every_plain_leaf_round_trips_as_metadata(store: ckptstore.CheckpointStore, value: Any, plain: Any) -> None:
    store.save(1, {}, metadata={"m": value, "in a list": [value]})
    meta = store.info(1).metadata
    assert same(meta["m"], plain) and same(meta["in a list"], [plain])


def test_enum_keyed_state_restores_into_itself(store: ckptstore.CheckpointStore) -> None:
    """The issue's example: a (str, Enum) key used to be saved as 'Color.RED', and restore(like=state) failed."""
    model = torch.nn.Linear(2, 1)
    state = {Color.RED: np.arange(3.0), Level.HIGH: {"w": torch.ones(2)}, "model": model}
    store.save(1, state)
    back = store.restore(1, like=state)
    assert back.keys() == state.keys() and back["model"] is model
    assert back[Color.RED].tolist() == [0.0, 1.0, 2.0] and isinstance(back[Level.HIGH]["w"], torch.Tensor)
    assert list(store.restore(1)) == ["red", 2, "model"]
    assert store.restore(1, keys="red")["red"].tolist() == [0.0, 1.0, 2.0]


def test_checkpoint_with_legacy_enum_keys_restores(store: ckptstore.CheckpointStore) -> None:
    """Checkpoints written before: their (str, Enum) keys are 'Color.RED'; like=... with the members still fits."""
    store.save(1, {"Color.RED": np.ones(2), "Color.GREEN": {"x": np.zeros(1)}, "n": 3})
    back = store.restore(1, like={Color.RED: np.zeros(2), Color.GREEN: {"x": torch.ones(1)}, "n": 0})
    assert list(back) == [Color.RED, Color.GREEN, "n"]
    assert back[Color.RED].tolist() == [1.0, 1.0] and isinstance(back[Color.GREEN]["x"], torch.Tensor)
    with pytest.raises(StructureMismatchError, match="keys differ"):
        store.restore(1, like={Color.RED: np.zeros(2), "other": None, "n": 0})


def test_stateful_type_name_with_a_surrogate(store: ckptstore.CheckpointStore) -> None:
    """A class name UTF-8 cannot hold is for people only: it is escaped, the state round-trips."""

    def state_dict(self: Any) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self: Any, state: dict[str, Any]) -> None:
        self.w = state["w"]

    cls = type("Odd", (), {"state_dict": state_dict, "load_state_dict": load_state_dict})
    cls.__module__ = "loaded_from_caf\udce9"  # a module name decoded with surrogateescape
    obj = cls()
    obj.w = np.arange(3)
    store.save(1, {"o": obj})
    fresh = cls()
    fresh.w = None
    assert store.restore(1, like={"o": fresh})["o"] is fresh and fresh.w.tolist() == [0, 1, 2]


def test_ints_of_4300_digits_round_trip_whatever_the_limit(
    store: ckptstore.CheckpointStore, int_digits: Callable[[int], None]
) -> None:
    int_digits(0)  # no limit in this process: the format's own limit still holds
    store.save(1, {"v": 10**4300 - 1, 10**4299: "k"})
    assert store.restore(1) == {"v": 10**4300 - 1, 10**4299: "k"}


# --- class 5: what cannot come back is refused, naming the path, before anything is written -------------


class Tag(str):
    """A str whose instances are distinct keys even when their text is equal."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


class Items(Mapping[Any, Any]):
    """A Mapping over a list of pairs (keys may repeat once converted)."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs

    def __getitem__(self, key: Any) -> Any:
        return dict(self.pairs)[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(k for k, _ in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


class BadFields(tuple):  # type: ignore[type-arg]
    _fields = ("a",)  # two values, one field name


class DupFields(tuple):  # type: ignore[type-arg]
    _fields = ("a", "a")


class IntFields(tuple):  # type: ignore[type-arg]
    _fields = (0, 1)


class SurrogateFields(tuple):  # type: ignore[type-arg]
    _fields = ("ok", "bad\ud800")


class BrokenState:
    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("not initialised")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BigState:
    def state_dict(self) -> dict[str, Any]:
        return {"counter": 10**4300}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BrokenMapping(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise OSError("the backing file is gone")

    def __len__(self) -> int:
        return 1


BIG = 10**4300  # 4301 digits
REFUSED: list[tuple[str, Any, str, str]] = [
    ("int of 4301 digits", {"v": BIG}, "state['v']", "4300"),
    ("negative int of 4301 digits", {"v": [1, -BIG]}, "state['v'][1]", "4300"),
    ("huge int", {"a": {"b": 7**100000}}, "state['a']['b']", "4300"),
    ("int of 4301 digits in a tuple", {"t": (1, (BIG,))}, "state['t'][1][0]", "4300"),
    ("int of 4301 digits in a NamedTuple", {"p": Pair(1, BIG)}, "state['p']['b']", "4300"),
    ("int key of 4301 digits", {"d": {BIG: 1}}, "state['d'] has a key", "4300"),
    ("int of 4301 digits in a state_dict", {"s": BigState()}, "state['s']['counter']", "4300"),
    ("lone high surrogate", {"s": "abc\ud800"}, "state['s']", "surrogate"),
    ("lone low surrogate in a list", {"s": ["ok", "\udcff"]}, "state['s'][1]", "surrogate"),
    (
        "surrogate from surrogateescape",
        {"path": b"caf\xe9".decode("utf-8", "surrogateescape")},
        "state['path']",
        "surrogate",
    ),
    ("surrogate key", {"\ud83d": 1}, "state has a key", "surrogate"),
    ("nested surrogate key", {"a": {"b": {"x\udc80": 1}}}, "state['a']['b'] has a key", "surrogate"),
    ("surrogate in a str subclass", {"s": MyStr("\ud800")}, "state['s']", "surrogate"),
    ("surrogate in np.str_", {"s": np.str_("\ud800")}, "state['s']", "surrogate"),
    (
        "surrogate (str, Enum) key",
        {"d": {enum.Enum("E", {"X": "\ud800"}, type=str).X: 1}},
        "state['d'] has a key",
        "surrogate",
    ),  # type: ignore[attr-defined]
    ("surrogate NamedTuple field", {"n": SurrogateFields((1, 2))}, "state['n']", "surrogate"),
    ("keys that collide once saved", {"d": {Tag("k"): 1, Tag("k"): 2}}, "state['d'] has two keys", "'k'"),
    ("Mapping keys that collide", {"m": Items([("red", 1), (Color.RED, 2)])}, "state['m'] has two keys", "'red'"),
    ("NamedTuple-like, fields and values differ", {"t": BadFields((1, 2))}, "state['t']", "_fields"),
    ("NamedTuple-like, repeated field", {"t": DupFields((1, 2))}, "state['t']", "_fields"),
    ("NamedTuple-like, int fields", {"t": IntFields((1, 2))}, "state['t']", "_fields"),
    ("state_dict() raises", {"m": BrokenState()}, "state['m']", "state_dict() raised RuntimeError"),
    ("items() raises", {"m": BrokenMapping()}, "state['m']", "OSError"),
]


@pytest.mark.parametrize(("state", "path", "match"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_values_that_cannot_come_back_are_refused_before_writing(
    store: ckptstore.CheckpointStore, tmp_path: pathlib.Path, state: Any, path: str, match: str
) -> None:
    with pytest.raises(UnsupportedTypeError) as e:
        store.save(1, state)
    assert str(e.value).startswith(path) and match in str(e.value), str(e.value)
    assert entries(store.url) == [] and store.steps() == []
    with pytest.raises(UnsupportedTypeError):
        store.save(2, state, blocking=False)
    store.wait_until_finished()
    assert entries(store.url) == [] and store.steps() == []
    with pytest.raises(UnsupportedTypeError):
        ckptstore.save(tmp_path / "one", state)
    assert not (tmp_path / "one").exists() and [n for n in os.listdir(tmp_path) if n != "run"] == []


@pytest.mark.parametrize(
    ("metadata", "path"),
    [
        ({"loss": BIG}, "metadata['loss']"),
        ({BIG: 1}, "metadata has a key"),
        ({"note": "caf\udce9"}, "metadata['note']"),
        ({"caf\udce9": 1}, "metadata has a key"),
        ({"tags": ["ok", ("x", "\ud800")]}, "metadata['tags'][1][1]"),
        ({Tag("k"): 1, Tag("k"): 2}, "metadata has two keys"),
    ],
    ids=["big int", "big int key", "surrogate", "surrogate key", "nested surrogate", "colliding keys"],
)
def test_metadata_that_cannot_come_back_is_refused(
    store: ckptstore.CheckpointStore, metadata: dict[Any, Any], path: str
) -> None:
    store.save(1, {"w": np.ones(2)})
    with pytest.raises(UnsupportedTypeError) as e:
        store.save(2, {"w": np.ones(2)}, metadata=metadata)
    assert str(e.value).startswith(path), str(e.value)
    assert entries(store.url) == ["step_00000001"] and store.steps() == [1]


def test_int_limit_of_this_process(store: ckptstore.CheckpointStore, int_digits: Callable[[int], None]) -> None:
    """Past 4300 digits even with the limit lifted; past a lowered limit, which would fail to encode."""
    int_digits(0)
    with pytest.raises(UnsupportedTypeError, match=r"state\['v'\] is an int of more than 4300"):
        store.save(1, {"v": 10**5000})
    int_digits(1000)
    with pytest.raises(UnsupportedTypeError, match=r"state\['v'\] is an int of more than 1000.*set_int_max_str_digits"):
        store.save(1, {"v": 10**2000})
    store.save(1, {"v": 10**999, "w": 2**64})
    assert entries(store.url) == ["step_00000001"]
    assert store.restore(1) == {"v": 10**999, "w": 2**64}


def test_tensorflow_tensors_without_numbers_are_refused(store: ckptstore.CheckpointStore) -> None:
    tf = pytest.importorskip("tensorflow")
    for value, what in [
        (tf.Variable([1.0]).handle, "resource"),
        (tf.data.experimental.to_variant(tf.data.Dataset.range(3)), "variant"),
        (tf.constant(["a", "b"]), "string"),
    ]:
        with pytest.raises(UnsupportedTypeError, match=rf"^state\['x'\]: .*{what}"):
            store.save(1, {"x": value})
    assert entries(store.url) == []


# --- class 6: misuse is a named error naming the argument ---------------------------------------------


@pytest.fixture
def saved(store: ckptstore.CheckpointStore) -> ckptstore.CheckpointStore:
    store.save(1, {"a": np.ones(2, np.float32), "n": 1, "d": {"x": np.zeros(1)}})
    return store


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (5, "keys must be a string.*got a int"),
        (2.5, "keys must be a string"),
        (b"a", "keys must be a string.*bytes"),
        (bytearray(b"a"), "keys must be a string"),
        (object(), "keys must be a string"),
        ([5], "keys must be non-empty strings"),
        ([["a"]], "keys must be non-empty strings"),
        (["a", None], "keys must be non-empty strings"),
        ([""], "keys must be non-empty strings"),
    ],
)
def test_bad_keys_argument(saved: ckptstore.CheckpointStore, keys: Any, match: str) -> None:
    for call in (
        lambda: saved.restore(1, keys=keys),
        lambda: saved.restore(1, keys=keys, fallback=True),
        lambda: ckptstore.restore(saved.info(1).path, keys=keys),
    ):
        with pytest.raises(StructureMismatchError, match=match):
            call()


@pytest.mark.parametrize("framework", [["torch"], {"torch": 1}, ("torch",), b"torch", 5, 1.5])
def test_bad_framework_argument(saved: ckptstore.CheckpointStore, framework: Any) -> None:
    for call in (
        lambda: saved.restore(1, framework=framework),
        lambda: saved.restore(1, framework=framework, fallback=True),
        lambda: ckptstore.restore(saved.info(1).path, framework=framework),
    ):
        with pytest.raises(CkptStoreError, match="framework") as e:
            call()
        assert type(e.value) is CkptStoreError


def test_framework_that_cannot_be_imported(saved: ckptstore.CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore import frameworks

    monkeypatch.setattr(frameworks, "_loaded", {})
    monkeypatch.setitem(sys.modules, "ckptstore.frameworks.jax", None)  # import raises ImportError
    with pytest.raises(CkptStoreError, match="framework 'jax' cannot be used"):
        saved.restore(1, framework="jax")


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)


class _CheckedFields(NamedTuple):
    a: Any
    b: Any


class Checked(_CheckedFields):
    """A NamedTuple whose constructor checks its values."""

    __slots__ = ()

    def __new__(cls, a: Any, b: Any) -> Checked:
        if not isinstance(a, torch.Tensor):
            raise TypeError("a must be a tensor")
        return super().__new__(cls, a, b)


class NoStateYet:
    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("call setup() first")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize(
    ("like", "match"),
    [
        ({"a": _quantized(), "n": 0, "d": None}, r"state\['a'\]: `like` is a torch tensor .*quantized=True"),
        (
            {"a": torch.nested.nested_tensor([torch.zeros(2)]), "n": 0, "d": None},
            r"state\['a'\]: .*[Nn]ested",
        ),
        ({"a": torch.zeros(2, device="meta"), "n": 0, "d": None}, r"state\['a'\]: .*meta device"),
        ({"a": np.array(["xy", "z"]), "n": 0, "d": None}, r"state\['a'\]: `like` is a numpy array of dtype <U2"),
        ({"a": np.zeros(2, [("f", "f4")]), "n": 0, "d": None}, r"state\['a'\]: `like` is a numpy array"),
        ({"a": None, "n": 0, "d": NoStateYet()}, r"state\['d'\]: .*NoStateYet.state_dict\(\) of `like` raised"),
    ],
    ids=["torch quantized", "torch nested", "torch meta", "numpy str", "numpy structured", "state_dict raises"],
)
def test_like_that_cannot_hold_the_arrays(saved: ckptstore.CheckpointStore, like: Any, match: str) -> None:
    with pytest.raises(StructureMismatchError, match=match):
        saved.restore(1, like=like)


@pytest.mark.parametrize(
    "dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.int4, np.float64, np.int32, np.complex128, object]
)
def test_numpy_like_of_another_dtype_still_converts(saved: ckptstore.CheckpointStore, dtype: Any) -> None:
    """Only text and record dtypes are refused: ml_dtypes types (NumPy kind 'V' too) still convert."""
    back = saved.restore(1, like={"a": np.zeros(2, dtype), "n": 0, "d": None})
    assert back["a"].dtype == np.dtype(dtype) and back["a"].tolist() == [1, 1]


def test_namedtuple_like_that_rejects_the_values(store: ckptstore.CheckpointStore) -> None:
    store.save(1, {"p": Checked(torch.zeros(1), 2)})
    assert store.restore(1, like={"p": Checked(torch.zeros(1), 0)})["p"].b == 2  # like's tensor: a tensor back
    unchecked = tuple.__new__(Checked, (None, 0))  # a placeholder: the saved array comes back as NumPy's
    with pytest.raises(StructureMismatchError, match=r"state\['p'\]: .*Checked\(\.\.\.\) rejects .*TypeError"):
        store.restore(1, like={"p": unchecked})


def test_tensorflow_string_tensor_in_like(saved: ckptstore.CheckpointStore) -> None:
    tf = pytest.importorskip("tensorflow")
    for template, what in [
        (tf.constant(["x", "y"]), "tf.string"),
        (tf.Variable(["x", "y"]), "tf.string"),
        (tf.Variable([1.0, 2.0]).handle, None),  # a resource handle: its shape () does not fit either
    ]:
        with pytest.raises(StructureMismatchError, match=r"state\['a'\]" + (f".*{what}" if what else "")):
            saved.restore(1, like={"a": template, "n": 0, "d": None})
    back = saved.restore(1, like={"a": tf.Variable([0, 0], dtype=tf.int32), "n": 0, "d": None})
    assert back["a"].numpy().tolist() == [1, 1]


def test_no_bare_builtin_errors_from_misuse(saved: ckptstore.CheckpointStore) -> None:
    """A sweep: every misuse in this module's reach raises a CkptStoreError (never a bare builtin)."""
    path = saved.info(1).path
    calls: list[Callable[[], Any]] = [
        lambda: saved.restore(keys=5),
        lambda: saved.restore(keys=b"a"),
        lambda: saved.restore(framework=["torch"]),
        lambda: saved.restore(1, like={"a": _quantized(), "n": 0, "d": None}),
        lambda: saved.restore(1, like={"a": np.array(["x", "y"]), "n": 0, "d": None}),
        lambda: saved.save(2, {"x": 10**5000}),
        lambda: saved.save(2, {"x": "\ud800"}),
        lambda: saved.save(2, {"\ud800": 1}),
        lambda: saved.save(2, {}, metadata={"x": "\ud800"}),
        lambda: saved.save(2, {"m": BrokenState()}),
        lambda: ckptstore.restore(path, keys=5),
        lambda: ckptstore.restore(path, framework={"np"}),
        lambda: ckptstore.save(pathlib.Path(path).parent / "x", {"v": 10**5000}),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(CkptStoreError):
            call()
        assert saved.steps() == [1], i
    assert entries(saved.url) == ["step_00000001"]


# --- class 7: the CLI on damaged and hostile stores -----------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def edit_manifest(step_dir: pathlib.Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = step_dir / "manifest.msgpack"
    doc = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    change(doc)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))


def ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def set_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(key, value)


YEAR_0 = (datetime.datetime(1, 1, 1) - datetime.datetime(1970, 1, 1)).total_seconds() - 400 * 86400
DAMAGE: dict[str, Callable[[dict[str, Any]], None]] = {
    "bytes metadata key": set_field("metadata", {b"raw": 1, "ok": 2}),
    "tuple metadata key": set_field("metadata", {ext(EXT_TUPLE, [1, 2]): 3}),
    "float and None metadata keys": set_field("metadata", {1.5: "a", None: "b"}),
    "nested bytes metadata key": set_field("metadata", {"a": [{b"k": 1}]}),
    "created 1e300": set_field("created", 1e300),
    "created -1e300": set_field("created", -1e300),
    "created year 0": set_field("created", YEAR_0),
    "created year 10000": set_field("created", 253402300800.0 + 86400),
    "created and metadata": lambda d: d.update(created=1e300, metadata={b"k": (1, 2)}),
    "size too big for a float": lambda d: d["files"][0].__setitem__("size", msgpack.ExtType(EXT_BIGINT, b"9" * 400)),
    "manifest of another step": set_field("step", 77),
}


@pytest.fixture
def three(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root)
    for step in (1, 2, 3):
        store.save(step, {"w": np.full(3, step, np.float32), "n": step}, metadata={"loss": 1 / step})
    return root


def check_ls(out: str, damaged: int) -> None:
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "CREATED", "SIZE", "METADATA"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["1", "2", "3"], out  # every step listed
    for step, line in rows.items():
        assert ("DAMAGED" in line) == (int(step) == damaged), line


@pytest.mark.parametrize("name", list(DAMAGE))
def test_cli_on_a_damaged_manifest(capsys: pytest.CaptureFixture[str], three: pathlib.Path, name: str) -> None:
    edit_manifest(three / "step_00000002", DAMAGE[name])
    code, out, err = run(capsys, "ls", str(three))
    assert code == 1 and "Traceback" not in out + err
    check_ls(out, damaged=2)
    assert '"loss": 1.0' in out and '"loss": 0.333' in out  # the others' metadata still shown

    code, out, err = run(capsys, "show", str(three), "--step", "2")
    assert "Traceback" not in out + err
    if name == "size too big for a float":  # show does not show sizes
        assert code == 0
    elif name == "manifest of another step":  # marked, or refused outright by a stricter reader
        assert code == 1 and ("# DAMAGED: its manifest is that of step 77" in out or "ckptstore show: " in err)
    else:
        assert code == 1 and "# DAMAGED: " in out, out  # header problems marked, the tree still shown
        assert "state['w']  F32 [3]" in out and "state['n']  2" in out

    code, out, err = run(capsys, "show", str(three))  # the latest, undamaged
    assert code == 0 and "DAMAGED" not in out and "step 3" in out

    code, out, err = run(capsys, "verify", str(three))
    assert "Traceback" not in out + err
    assert [line.split()[0] for line in out.splitlines()] == ["step_00000001", "step_00000002", "step_00000003"]

    code, out, err = run(capsys, "watch", str(three), "--every", "--timeout", "0")
    assert "Traceback" not in out + err
    assert out.splitlines() == [str(three / f"step_{s:08d}") for s in (1, 2, 3)]  # paths only, every step
    if name == "size too big for a float":  # the manifest reads; verify names the file sizes
        assert code == 0 and err == ""
    else:
        assert code == 1 and "step_00000002" in err and "DAMAGED" in err


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.__setitem__("format", "other"),
        lambda d: d.__setitem__("created", "yesterday"),
        lambda d: d.__setitem__("metadata", {ext(EXT_TUPLE, [[1]]): 1}),  # a key that is no hashable value
        lambda d: d.__setitem__("tree", ext(99, b"")),
    ],
    ids=["not ckptstore", "created is text", "unhashable key", "unknown extension"],
)
def test_cli_on_an_unreadable_manifest(capsys: pytest.CaptureFixture[str], three: pathlib.Path, damage: Any) -> None:
    edit_manifest(three / "step_00000002", damage)
    code, out, err = run(capsys, "ls", str(three))
    assert code == 1 and "Traceback" not in out + err
    check_ls(out, damaged=2)
    code, out, err = run(capsys, "verify", str(three))
    assert code == 1 and "Traceback" not in out + err
    assert [line.split()[1] for line in out.splitlines()] == ["ok", "DAMAGED", "ok"]
    code, out, err = run(capsys, "watch", str(three), "--every", "--timeout", "0")
    assert code == 1 and "Traceback" not in out + err and len(out.splitlines()) == 3
    assert "step_00000002  DAMAGED" in err


def test_cli_escapes_control_characters_of_a_hostile_manifest(
    capsys: pytest.CaptureFixture[str], three: pathlib.Path
) -> None:
    def hostile(doc: dict[str, Any]) -> None:
        doc["tree"]["n"] = ext(EXT_STATEFUL, ["evil\x1b]0;pwned\x07\x1b[2J", {"k": "v\x1b[31m"}])
        doc["metadata"] = {"note\x1b[2J": "x\r\x1b[1A"}
        doc["writer"] = "w\x1b"

    edit_manifest(three / "step_00000002", hostile)
    for argv in (["ls", str(three)], ["show", str(three), "--step", "2"], ["verify", str(three)]):
        code, out, err = run(capsys, *argv)
        assert "\x1b" not in out + err and "\r" not in out + err and "Traceback" not in out + err, argv
    code, out, _ = run(capsys, "show", str(three), "--step", "2")
    assert code == 0 and "<evil\\x1b]0;pwned\\x07\\x1b[2J>" in out


def test_cli_never_prints_a_traceback_for_an_unexpected_error(
    capsys: pytest.CaptureFixture[str], three: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a damaged checkpoint makes the library raise, even a bare exception, the CLI marks that step
    and goes on with the others."""
    import ckptstore.verify
    from ckptstore.store import CheckpointStore

    real_info, real_verify = CheckpointStore.info, ckptstore.verify.verify_checkpoint

    def info(self: CheckpointStore, step: int | None = None) -> Any:
        if step == 2:
            raise ValueError("cannot create a NumPy array of shape [0, 2**62, 2**62]")
        return real_info(self, step)

    def verify(storage: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "step_00000002":
            raise OverflowError("size overflows")
        return real_verify(storage, name, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "info", info)
    monkeypatch.setattr(ckptstore.verify, "verify_checkpoint", verify)
    code, out, err = run(capsys, "ls", str(three))
    assert code == 1 and "Traceback" not in out + err
    check_ls(out, damaged=2)
    assert "ValueError: cannot create" in out
    code, out, err = run(capsys, "verify", str(three))
    assert code == 1 and [line.split()[1] for line in out.splitlines()] == ["ok", "DAMAGED", "ok"]
    assert "OverflowError" in out
    code, out, err = run(capsys, "show", str(three), "--step", "2")  # show does not go through info()
    assert code == 0 and "step 2" in out


def test_cli_last_resort(
    capsys: pytest.CaptureFixture[str], three: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptstore.cli

    def broken(args: Any) -> int:
        raise KeyError("surprise")

    monkeypatch.setitem(ckptstore.cli._COMMANDS, "show", broken)
    code, _, err = run(capsys, "show", str(three))
    assert code == 1 and err.startswith("ckptstore show: KeyError") and "Traceback" not in err


def test_cli_watch_marks_a_damaged_checkpoint_that_appears(
    capsys: pytest.CaptureFixture[str], three: pathlib.Path
) -> None:
    (three / "step_00000003" / "manifest.msgpack").write_bytes(b"\xc1garbage")
    with knobs.override(poll_interval_s=0.05):
        code, out, err = run(capsys, "watch", str(three), "--timeout", "0.1")
    assert code == 1 and out.splitlines() == [str(three / "step_00000003")]  # the newest, as before
    assert "DAMAGED" in err and "Traceback" not in err
    empty = three.parent / "empty"
    code, out, err = run(capsys, "watch", str(empty), "--timeout", "0")
    assert code == 0 and out == "" and err == "" and not empty.exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: ckptstore.CheckpointStore(5),
        lambda tmp: ckptstore.CheckpointStore(None),
        lambda tmp: ckptstore.CheckpointStore(b"run"),
        lambda tmp: ckptstore.CheckpointStore("memory://x/run", storage_options=5),
        lambda tmp: ckptstore.restore(None),
        lambda tmp: ckptstore.save(None, {"w": 1}),
        lambda tmp: ckptstore.wait_for_new_checkpoint(str(tmp), timeout=0, last_checkpoint=5),
        lambda tmp: _saved(tmp).pin(1, ttl="x"),
        lambda tmp: _saved(tmp).pin(1, ttl=float("nan")),
        lambda tmp: _saved(tmp).pin(1, ttl=0),
    ],
    ids=[
        "store-int",
        "store-none",
        "store-bytes",
        "options-int",
        "restore-none",
        "save-none",
        "last-int",
        "ttl-str",
        "ttl-nan",
        "ttl-zero",
    ],
)
def test_wrong_argument_types_at_the_edges_are_named(tmp_path: Path, call: Any) -> None:
    with pytest.raises(ckptstore.errors.CkptStoreError):
        call(tmp_path)


def _saved(root: Path) -> ckptstore.CheckpointStore:
    store = ckptstore.CheckpointStore(root / "run")
    store.save(1, {"w": 1})
    return store
