"""NumPy random generators as leaves: Generator, RandomState and bare BitGenerators round-trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.errors import StructureMismatchError


@pytest.mark.parametrize("bits", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_generator_continues_where_it_was_saved(tmp_path: Any, bits: str) -> None:
    bit_gen = getattr(np.random, bits)
    gen = np.random.Generator(bit_gen(1234))
    gen.random(17)
    gen.integers(0, 10, size=3)  # leaves a buffered 32-bit half in some bit generators
    ckptstore.save(tmp_path / "c", {"gen": gen})
    expected = gen.random(5)

    fresh = np.random.Generator(bit_gen(0))
    out = ckptstore.restore(tmp_path / "c", like={"gen": fresh})
    assert out["gen"] is fresh
    np.testing.assert_array_equal(fresh.random(5), expected)


def test_random_state_and_bare_bit_generator(tmp_path: Any) -> None:
    rs = np.random.RandomState(9)
    rs.normal(size=3)  # leaves a cached gaussian
    pcg = np.random.PCG64(3)
    pcg.random_raw(4)
    ckptstore.save(tmp_path / "c", {"rs": rs, "pcg": pcg})
    expected = (rs.normal(size=4), pcg.random_raw(2))

    like = {"rs": np.random.RandomState(0), "pcg": np.random.PCG64(0)}
    out = ckptstore.restore(tmp_path / "c", like=like)
    np.testing.assert_array_equal(out["rs"].normal(size=4), expected[0])
    np.testing.assert_array_equal(out["pcg"].random_raw(2), expected[1])

    plain = ckptstore.restore(tmp_path / "c")  # without like: the plain state dicts
    assert plain["rs"]["bit_generator"] == "MT19937" and plain["rs"]["state"]["key"].dtype == np.uint32
    assert plain["pcg"]["bit_generator"] == "PCG64" and plain["pcg"]["state"]["state"] > 2**64  # 128-bit int


def test_other_bit_generator_in_like_is_a_named_error(tmp_path: Any) -> None:
    ckptstore.save(tmp_path / "c", {"g": np.random.default_rng(1)})
    with pytest.raises(StructureMismatchError, match=r"state\['g'\].*PCG64.*MT19937"):
        ckptstore.restore(tmp_path / "c", like={"g": np.random.Generator(np.random.MT19937(0))})
