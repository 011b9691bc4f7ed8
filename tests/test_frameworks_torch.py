"""torch.Generator objects as leaves (torch tensors and modules are covered by the round-trip tests)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ckptstore
from ckptstore.errors import StructureMismatchError


def test_generator_continues_where_it_was_saved(tmp_path: Any) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.rand(4, generator=gen)
    ckptstore.save(tmp_path / "c", {"gen": gen, "w": torch.ones(2)})
    expected = torch.rand(3, generator=gen)

    fresh = torch.Generator().manual_seed(0)
    out = ckptstore.restore(tmp_path / "c", like={"gen": fresh, "w": torch.zeros(2)})
    assert out["gen"] is fresh
    assert torch.equal(torch.rand(3, generator=fresh), expected)

    plain = ckptstore.restore(tmp_path / "c")["gen"]  # without like: the device and the state bytes
    assert plain["device"] == "cpu" and plain["state"].dtype.name == "uint8"


def test_state_that_is_no_generator_state_is_a_named_error(tmp_path: Any) -> None:
    ckptstore.save(tmp_path / "c", {"gen": {"device": "cpu", "state": torch.zeros(3, dtype=torch.uint8)}})
    with pytest.raises(StructureMismatchError, match=r"state\['gen'\]"):
        ckptstore.restore(tmp_path / "c", like={"gen": torch.Generator()})
