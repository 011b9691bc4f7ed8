"""Random inputs: property-based round trips of random state trees (hypothesis), and thousands of random
mutations of a real checkpoint's bytes, where every read must return or raise a CkptStoreError: never
another exception, a crash or a hang."""

from __future__ import annotations

import math
import random
import struct
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CkptStoreError, UnsupportedTypeError

# --- round trips -------------------------------------------------------------------------------------

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
DTYPES += [np.float16, np.float32, np.float64, np.complex64]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
# Types NumPy lacks (bfloat16, float8), as raw bits of every pattern: NaNs and infinities included.
ml_arrays = st.sampled_from(["bfloat16", "float8_e4m3fn", "float8_e5m2"]).flatmap(
    lambda name: hnp.arrays(
        np.uint16 if name == "bfloat16" else np.uint8,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ).map(lambda a: a.view(getattr(ml_dtypes, name)))
)
scalars = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.from_dtype(np.dtype(dt)).map(lambda v: np.dtype(dt).type(v)))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: big ints included
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    arrays,
    ml_arrays,
    scalars,
)
keys = st.one_of(st.text(max_size=8), st.integers(min_value=-(2**70), max_value=2**70))
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(keys, kids, max_size=4),
    ),
    max_leaves=20,
)


def same(a: Any, b: Any, path: str = "state") -> None:
    """Exact equality: types, float bits (nan, -0.0), array dtype, shape and bytes."""
    assert type(a) is type(b) or (isinstance(a, np.generic) and a.dtype == b.dtype), (path, type(a), type(b))
    if isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b), (path, list(a), list(b))
        assert all(type(k) is type(kb) for k, kb in zip(a, b)), path
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=trees)
def test_random_trees_round_trip(state: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        try:
            ckptstore.save(Path(d) / "c", {"s": state})
        except UnsupportedTypeError as e:
            assume("nest deeper" not in str(e))  # beyond the documented nesting limits
            raise
        same({"s": state}, ckptstore.restore(Path(d) / "c"))


# --- byte mutations ----------------------------------------------------------------------------------


def _real_checkpoint(root: Path) -> ckptstore.CheckpointStore:
    store = ckptstore.CheckpointStore(root)
    state = {
        "model": {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.zeros(3, np.float16)},
        "opt": {"state": {0: {"step": np.int64(5), "m": np.ones(6, np.float64)}}, "groups": [{"lr": 0.1}]},
        "t": (1, (2.5, "x"), b"raw", None, 2**80),
        "scalar": np.float32(1.5),
        "empty": np.zeros((0, 3), np.int8),
    }
    with knobs.override(max_file_bytes=64):  # several tensor files
        store.save(1, state, metadata={"epoch": 3, "tags": ["a", "b"]})
    return store


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    how = rng.randrange(6)
    if how == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == 1 and b:  # set bytes to interesting values
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, 0xC9, 0xD4])
    elif how == 2:  # truncate
        del b[rng.randrange(len(b) + 1) :]
    elif how == 3:  # insert junk
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif how == 4 and b:  # delete a range
        pos = rng.randrange(len(b))
        del b[pos : pos + rng.randint(1, 16)]
    else:  # duplicate a range
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = b[pos : pos + rng.randint(1, 32)]
    return bytes(b)


def _random_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            -1,
            0,
            2**63,
            2**64 - 1,
            -(2**63),
            1.5,
            float("nan"),
            "",
            "../x",
            "x" * 300,
            b"\x00",
            [],
            {},
            [1, 2],
            {"a": 1},
            msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randint(0, 8))),
            msgpack.ExtType(rng.choice([1, 2, 3, 4, 5, 6, 7]), msgpack.packb(rng.choice([0, 99, [], ["a", 1]]))),
        ]
    )


def _mutate_structure(data: bytes, rng: random.Random) -> bytes:
    """Replace one value somewhere in the decoded manifest (types, ranges, extension payloads)."""
    doc = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    nodes: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        x = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            nodes.append((x, k))
            stack.append(v)
    parent, key = rng.choice(nodes)
    parent[key] = _random_value(rng)
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


def test_mutated_checkpoints_raise_only_named_errors(tmp_path: Path, record_property) -> None:
    store = _real_checkpoint(tmp_path / "run")
    d = tmp_path / "run" / "step_00000001"
    originals = {p: p.read_bytes() for p in d.iterdir()}
    manifest = d / "manifest.msgpack"
    tensor_files = sorted(p for p in originals if p != manifest)
    rng = random.Random(20240229)
    outcomes = {"named error": 0, "read": 0}
    n = 2000
    for i in range(n):
        target = manifest if rng.random() < 0.65 else rng.choice(tensor_files)
        original = originals[target]
        if target == manifest and rng.random() < 0.5:
            mutated = _mutate_structure(original, rng)
        else:
            mutated = _mutate_bytes(original, rng)
        target.write_bytes(mutated)
        for read in (store.restore, lambda: store.restore(1, verify=False), lambda: store.verify(1)):
            try:
                read()
                outcomes["read"] += 1
            except CkptStoreError:
                outcomes["named error"] += 1
            except Exception as e:
                pytest.fail(f"mutation {i} of {target.name}: {type(e).__name__}: {e}\nbytes: {mutated[:200]!r}")
        target.write_bytes(original)
    record_property("fuzz_mutations", n)
    record_property("fuzz_outcomes", outcomes)
    assert outcomes["named error"] > n  # most mutations are caught (the rest hit padding or metadata)
