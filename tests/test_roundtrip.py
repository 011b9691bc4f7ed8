"""Round trips of every supported dtype and every kind of plain value, bit-exact, on local disk and memory://.

Arrays are filled with random bytes (NaN payloads, subnormals and -0.0 included) and compared byte for byte.
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import knobs
from tests.conftest import Location

# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def store(location: Location) -> ckptstore.CheckpointStore:
    """A fresh store on local disk, then on memory:// (the location fixture's default; S3 runs the shared
    backend suite)."""
    return location.store()


def random_bits(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """An array of ``dtype`` whose bytes are random (bool: random 0/1): every bit pattern, NaNs included."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def np_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def torch_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def assert_np_identical(got: Any, want: np.ndarray) -> None:
    assert type(got) is np.ndarray, type(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert np_bytes(got) == np_bytes(want)


def assert_torch_identical(got: Any, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor), type(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.device == want.device
    assert torch_bytes(got) == torch_bytes(want)


NUMPY_DTYPES = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
]

TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]

SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5)]


def torch_random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A torch tensor of ``dtype`` with random bytes (bool: random 0/1), built from numpy bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.from_numpy(random_bits(np.dtype(np.bool_), shape, seed).copy())
    raw = torch.from_numpy(random_bits(np.dtype(np.uint8), (math.prod(shape) * itemsize,), seed).copy())
    return raw.view(dtype).reshape(shape)


# --- numpy arrays -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_dtype_round_trip_bit_exact(store: ckptstore.CheckpointStore, dtype: Any) -> None:
    state = {f"a{i}": random_bits(np.dtype(dtype), shape, seed=i) for i, shape in enumerate(SHAPES)}
    store.save(1, state)
    back = store.restore(1)
    assert back.keys() == state.keys()
    for k, want in state.items():
        assert_np_identical(back[k], want)


def test_float_nan_payloads_and_signed_zero_survive(store: ckptstore.CheckpointStore) -> None:
    bits = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000001, 0x7F800000], dtype=np.uint32)
    state = {"f32": bits.view(np.float32), "f64": bits.astype(np.uint64).view(np.float64)}
    store.save(0, state)
    back = store.restore(0)
    assert back["f32"].view(np.uint32).tolist() == bits.tolist()
    assert back["f64"].view(np.uint64).tolist() == bits.astype(np.uint64).tolist()


def test_zero_dim_and_empty_arrays_keep_their_shapes(store: ckptstore.CheckpointStore) -> None:
    state = {
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0,), dtype=np.int64),
        "empty2d": np.zeros((4, 0), dtype=np.float16),
        "t_scalar": torch.tensor(7, dtype=torch.int32),
        "t_empty": torch.zeros((0, 5), dtype=torch.bfloat16),
    }
    store.save(0, state)
    back = store.restore(0)
    assert back["scalar"].shape == () and back["scalar"].item() == 3.5
    assert back["empty"].shape == (0,)
    assert back["empty2d"].shape == (4, 0)
    assert back["t_scalar"].shape == () and back["t_scalar"].item() == 7
    assert back["t_empty"].shape == (0, 5) and back["t_empty"].dtype == ml_dtypes.bfloat16
    as_torch = store.restore(0, framework="torch")
    assert as_torch["scalar"].shape == torch.Size([])
    assert as_torch["t_empty"].shape == (0, 5) and as_torch["t_empty"].dtype == torch.bfloat16


def non_contiguous_numpy() -> dict[str, np.ndarray]:
    base = random_bits(np.dtype(np.float32), (6, 8), seed=3)
    return {
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "reversed": base[::-1],
        "fortran": np.asfortranarray(base),
        "broadcast": np.broadcast_to(base[0], (5, 8)),
        "column": base[:, 2],
        "bf16_T": random_bits(np.dtype(ml_dtypes.bfloat16), (3, 4), seed=4).T,
    }


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 8, 3])
def test_non_contiguous_numpy_saved_correctly(store: ckptstore.CheckpointStore, chunk_bytes: int) -> None:
    state = non_contiguous_numpy()
    assert not any(a.flags.c_contiguous for k, a in state.items() if k != "fortran")
    with knobs.override(chunk_bytes=chunk_bytes):  # small chunks: the slab-by-slab copy path
        store.save(0, state)
    back = store.restore(0)
    for k, want in state.items():
        assert back[k].shape == want.shape, k
        assert np_bytes(back[k]) == np_bytes(want), k
        assert back[k].flags.c_contiguous


def test_non_contiguous_torch_saved_correctly(store: ckptstore.CheckpointStore) -> None:
    base = torch_random(torch.float32, (6, 8), seed=5)
    cplx = torch_random(torch.complex64, (4,), seed=6)
    state = {
        "t": base.t(),
        "strided": base[::2, 1::3],
        "permuted": base.reshape(2, 3, 8).permute(2, 0, 1),
        "expanded": base[0].expand(4, 8),
        "column": base[:, 2],
        "conj_view": cplx.conj(),  # a lazily conjugated view
        "neg_view": torch._neg_view(base[:2]),
        "bf16_T": torch_random(torch.bfloat16, (3, 4), seed=7).t(),
    }
    store.save(0, state)
    back = store.restore(0, framework="torch")
    for k, want in state.items():
        got = back[k]
        assert got.shape == want.shape, k
        assert torch_bytes(got) == torch_bytes(want.resolve_conj().resolve_neg()), k
    assert torch.equal(back["conj_view"], cplx.conj())


# --- torch tensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_dtype_round_trip_bit_exact(store: ckptstore.CheckpointStore, dtype: torch.dtype) -> None:
    state = {f"t{i}": torch_random(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    store.save(1, state)
    back = store.restore(1, framework="torch")
    for k, want in state.items():
        assert_torch_identical(back[k], want)
    # like= gives each leaf its counterpart's type, dtype and device
    like = {k: torch.zeros_like(v) for k, v in state.items()}
    back = store.restore(1, like=like)
    for k, want in state.items():
        assert_torch_identical(back[k], want)
    # without framework=, numpy arrays with the same bits
    back = store.restore(1)
    for k, want in state.items():
        assert type(back[k]) is np.ndarray
        assert back[k].shape == tuple(want.shape)
        assert back[k].tobytes() == torch_bytes(want)


def test_requires_grad_tensors(store: ckptstore.CheckpointStore) -> None:
    w = torch.randn(3, 4, requires_grad=True)
    y = (w * 2).sum()  # a non-leaf in the graph, too
    store.save(0, {"w": w, "y": y})
    plain = store.restore(0, framework="torch")
    assert torch.equal(plain["w"], w.detach()) and not plain["w"].requires_grad
    like = store.restore(0, like={"w": torch.zeros(3, 4, requires_grad=True), "y": torch.zeros(())})
    assert torch.equal(like["w"], w.detach())
    assert like["w"].requires_grad and like["w"].is_leaf
    assert not like["y"].requires_grad and like["y"].item() == pytest.approx(y.item())


def test_like_converts_between_frameworks_and_dtypes(store: ckptstore.CheckpointStore) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = torch.arange(4, dtype=torch.int64)
    store.save(0, {"a": a, "t": t, "other": np.ones(2)})
    back = store.restore(
        0,
        like={"a": torch.zeros(2, 3, dtype=torch.float64), "t": np.zeros(4, np.int32), "other": None},
    )
    assert isinstance(back["a"], torch.Tensor) and back["a"].dtype == torch.float64
    assert torch.equal(back["a"], torch.from_numpy(a).double())
    assert type(back["t"]) is np.ndarray and back["t"].dtype == np.int32
    assert back["t"].tolist() == [0, 1, 2, 3]
    assert type(back["other"]) is np.ndarray  # None in `like`: the default framework


def test_framework_torch_returns_torch_everywhere(store: ckptstore.CheckpointStore) -> None:
    store.save(0, {"a": np.ones(3, np.float16), "n": {"b": [np.zeros((2, 2), ml_dtypes.bfloat16)]}, "k": 3})
    back = store.restore(0, framework="torch")
    assert isinstance(back["a"], torch.Tensor) and back["a"].dtype == torch.float16
    inner = back["n"]["b"][0]
    assert isinstance(inner, torch.Tensor) and inner.dtype == torch.bfloat16 and inner.shape == (2, 2)
    assert back["k"] == 3


def test_restored_arrays_are_writable_and_independent(store: ckptstore.CheckpointStore) -> None:
    store.save(0, {"a": np.arange(4.0), "b": np.arange(4.0)})
    back = store.restore(0)
    back["a"][0] = 99.0  # must not raise (read-only buffer) nor change anything else
    assert back["b"][0] == 0.0
    assert store.restore(0)["a"][0] == 0.0


def test_numpy_and_torch_bf16_share_the_format(store: ckptstore.CheckpointStore) -> None:
    t = torch_random(torch.bfloat16, (16,), seed=9)
    store.save(0, {"t": t})
    as_np = store.restore(0)["t"]
    assert as_np.dtype == ml_dtypes.bfloat16
    store.save(1, {"t": as_np})
    assert_torch_identical(store.restore(1, framework="torch")["t"], t)


# --- plain values -------------------------------------------------------------------------------------


class Point(NamedTuple):
    x: int
    y: Any


class Color(enum.IntEnum):
    RED = 1
    BLUE = 7


class Mode(str, enum.Enum):
    TRAIN = "train"


def plain_values() -> dict[Any, Any]:
    return {
        "int": 42,
        "neg": -17,
        "big": 1 << 100,
        "bigneg": -(1 << 90),
        "u64max": (1 << 64) - 1,
        "i64min": -(1 << 63),
        "float": 0.1,
        "inf": float("inf"),
        "ninf": float("-inf"),
        "negzero": -0.0,
        "true": True,
        "false": False,
        "str": "héllo wörld ✓ 日本 🚀",
        "empty_str": "",
        "bytes": bytes(range(256)),
        "none": None,
        "complex": complex(1.5, -2.25),
        "tuple": (1, "a", (2.0, None)),
        "empty_tuple": (),
        "list": [1, [2, [3, []]]],
        "nested": {"a": {"b": {"c": [(1, {"d": b"x"})]}}},
        7: "int key",
        -3: "negative int key",
        "intkeys": {0: "a", 10: "b", 1 << 40: "c"},
    }


def test_plain_values_round_trip(store: ckptstore.CheckpointStore) -> None:
    state = plain_values()
    store.save(0, state)
    back = store.restore(0)
    assert back == state
    for k, v in state.items():
        assert type(back[k]) is type(v), k
    assert math.copysign(1.0, back["negzero"]) == -1.0
    assert type(back["tuple"]) is tuple and type(back["tuple"][2]) is tuple
    assert type(back["list"][1]) is list
    assert list(back["intkeys"]) == [0, 10, 1 << 40]
    assert all(type(k) is int for k in back["intkeys"])
    assert type(back["nested"]["a"]["b"]["c"][0]) is tuple


def test_nan_float_value(store: ckptstore.CheckpointStore) -> None:
    store.save(0, {"nan": float("nan")})
    assert math.isnan(store.restore(0)["nan"])


def test_numpy_scalars_keep_their_type(store: ckptstore.CheckpointStore) -> None:
    state = {
        "f32": np.float32(1.25),
        "f64": np.float64(-2.5),
        "i64": np.int64(-(1 << 62)),
        "u8": np.uint8(255),
        "b": np.bool_(True),
        "f16": np.float16(np.nan),
        "bf16": ml_dtypes.bfloat16(3.0),
    }
    store.save(0, state)
    back = store.restore(0)
    for k, v in state.items():
        assert type(back[k]) is type(v), k
        assert back[k].tobytes() == v.tobytes(), k


def test_namedtuple_with_and_without_like(store: ckptstore.CheckpointStore) -> None:
    state = {"p": Point(3, np.arange(2)), "ps": [Point(1, "a")]}
    store.save(0, state)
    plain = store.restore(0)
    assert type(plain["p"]) is dict and plain["p"]["x"] == 3
    assert plain["p"]["y"].tolist() == [0, 1]
    assert plain["ps"] == [{"x": 1, "y": "a"}]
    typed = store.restore(0, like={"p": Point(0, np.zeros(2, np.int64)), "ps": [Point(0, "")]})
    assert type(typed["p"]) is Point and typed["p"].x == 3
    assert typed["p"].y.tolist() == [0, 1]
    assert typed["ps"] == [Point(1, "a")] and type(typed["ps"][0]) is Point


def test_enums_saved_as_their_value(store: ckptstore.CheckpointStore) -> None:
    store.save(0, {"color": Color.BLUE, "mode": Mode.TRAIN, Color.RED: "enum key"})
    back = store.restore(0)
    assert back["color"] == 7 and type(back["color"]) is int
    assert back["mode"] == "train" and type(back["mode"]) is str
    assert back[1] == "enum key"


def test_mapping_and_sequence_subclasses_saved_as_builtins(store: ckptstore.CheckpointStore) -> None:
    from collections import OrderedDict, defaultdict

    class MyList(list):  # type: ignore[type-arg]
        pass

    dd: defaultdict[str, int] = defaultdict(int, {"a": 1})
    store.save(0, {"od": OrderedDict(b=2, a=1), "dd": dd, "ml": MyList([1, 2])})
    back = store.restore(0)
    assert back == {"od": {"b": 2, "a": 1}, "dd": {"a": 1}, "ml": [1, 2]}
    assert list(back["od"]) == ["b", "a"]
    assert type(back["ml"]) is list


def test_state_may_be_a_bare_array_or_value(store: ckptstore.CheckpointStore) -> None:
    store.save(0, np.arange(3))
    assert store.restore(0).tolist() == [0, 1, 2]
    store.save(1, [1, (2, 3)])
    assert store.restore(1) == [1, (2, 3)]
    store.save(2, None)
    assert store.restore(2) is None


def test_many_arrays_split_over_several_files(store: ckptstore.CheckpointStore) -> None:
    state = {f"w{i}": random_bits(np.dtype(np.float32), (100,), seed=i) for i in range(10)}
    with knobs.override(max_file_bytes=1000):  # 400 bytes each: several files
        store.save(0, state)
    info = store.info(0)
    assert info.nbytes >= 4000
    back = store.restore(0)
    for k, want in state.items():
        assert_np_identical(back[k], want)


def test_single_directory_api_round_trip(store: ckptstore.CheckpointStore) -> None:
    path = store.storage.url_of("single")
    state = {"a": random_bits(np.dtype(np.float64), (3, 3)), "meta": {"k": (1, 2)}}
    ckptstore.save(path, state)
    back = ckptstore.restore(path)
    assert_np_identical(back["a"], state["a"])
    assert back["meta"] == {"k": (1, 2)}
    t = ckptstore.restore(path, framework="torch")
    assert isinstance(t["a"], torch.Tensor) and t["a"].dtype == torch.float64


def test_keys_whose_tensor_names_collide(store: ckptstore.CheckpointStore) -> None:
    """Tensor names in the safetensors file join key paths with '/': different paths may give one name."""
    state = {"a/b": np.ones(1), "a": {"b": np.zeros(1)}, "1": np.full(1, 5), 1: np.full(1, 6), "": np.full(2, 7)}
    store.save(0, state)
    back = store.restore(0)
    assert list(back) == ["a/b", "a", "1", 1, ""]
    assert back["a/b"].tolist() == [1.0] and back["a"]["b"].tolist() == [0.0]
    assert back["1"].tolist() == [5] and back[1].tolist() == [6] and back[""].tolist() == [7, 7]


def test_big_and_mixed_dict_keys(store: ckptstore.CheckpointStore) -> None:
    state = {1 << 70: "big", -(1 << 70): "neg", "1": "str", 1: "int", "é\n\"'": "odd", "x" * 500: "long"}
    store.save(0, state)
    back = store.restore(0)
    assert back == state and list(back) == list(state)
    assert [type(k) for k in back] == [type(k) for k in state]


def test_parameter_like_gives_a_parameter(store: ckptstore.CheckpointStore) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    store.save(0, {"p": p, "f": frozen})
    back = store.restore(0, like={"p": torch.nn.Parameter(torch.zeros(3)), "f": torch.nn.Parameter(torch.zeros(2))})
    assert type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert torch.equal(back["p"].detach(), p.detach())
    assert type(back["f"]) is torch.nn.Parameter
    torch.optim.SGD([back["p"]], lr=0.1)  # usable as a parameter
