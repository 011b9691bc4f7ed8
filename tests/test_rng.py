"""RNGState: Python's random, NumPy's global generator and torch's generator, saved and restored."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.errors import StructureMismatchError
from tests.fw_helpers import run_python

DRAW = """
import json, random, numpy as np, torch
def draw():
    return json.dumps({
        "python": [random.random().hex() for _ in range(3)] + [random.getrandbits(70)],
        "gauss": random.gauss(0, 1).hex(),
        "numpy": np.random.rand(3).tobytes().hex() + np.random.normal(size=1).tobytes().hex(),
        "torch": torch.rand(3).numpy().tobytes().hex() + torch.randint(0, 1 << 30, (2,)).numpy().tobytes().hex(),
    })
"""


def draw() -> dict[str, Any]:
    return {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(3).tolist(),
    }


@pytest.fixture(autouse=True)
def _keep_global_rngs() -> Iterator[None]:
    """These tests reseed the process's generators; give the rest of the session its own back."""
    saved = ckptstore.RNGState().state_dict()
    yield
    ckptstore.RNGState().load_state_dict(saved)


def test_restore_in_a_fresh_process_continues_every_generator(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    expected = run_python(
        DRAW
        + """
import sys, ckptstore
random.seed(1); np.random.seed(2); torch.manual_seed(3)
draw(); random.gauss(0, 1); np.random.normal()  # leave cached gaussians in both
ckptstore.save(sys.argv[1], {"rng": ckptstore.RNGState(), "step": 5})
print(draw())
""",
        path,
    )
    got = run_python(
        DRAW
        + """
import sys, ckptstore
random.seed(10); np.random.seed(20); torch.manual_seed(30)
out = ckptstore.restore(sys.argv[1], like={"rng": ckptstore.RNGState(), "step": 0})
assert out["step"] == 5
print(draw())
""",
        path,
    )
    assert json.loads(got) == json.loads(expected)
    assert set(json.loads(got)) == {"python", "gauss", "numpy", "torch"}


def test_state_dict_holds_what_the_issue_names() -> None:
    state = ckptstore.RNGState().state_dict()
    assert set(state) >= {"python", "numpy", "torch"}
    version, internal, _gauss = state["python"]
    assert version == 3 and len(internal) == 625 and all(type(i) is int for i in internal)
    assert state["numpy"]["bit_generator"] == "MT19937"
    assert isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
    assert ("cuda" in state) == torch.cuda.is_available()


def test_roundtrip_with_like_and_without(tmp_path: Any) -> None:
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    ckptstore.save(tmp_path / "c", {"rng": ckptstore.RNGState()})
    expected = draw()

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = ckptstore.RNGState()
    assert ckptstore.restore(tmp_path / "c", like={"rng": rng})["rng"] is rng
    assert draw() == expected

    plain = ckptstore.restore(tmp_path / "c")["rng"]  # NumPy arrays, a tuple for Python's state
    assert isinstance(plain["torch"], np.ndarray) and plain["torch"].dtype == np.uint8
    torch.manual_seed(0)
    ckptstore.RNGState().load_state_dict(plain)
    assert draw() == expected


def test_bad_state_is_a_named_error() -> None:
    with pytest.raises(StructureMismatchError, match="RNGState"):
        ckptstore.RNGState().load_state_dict({"python": (3, (1, 2), None), "numpy": {}})
    with pytest.raises(StructureMismatchError, match="RNGState"):
        ckptstore.RNGState().load_state_dict({"weights": 1})
    good = ckptstore.RNGState().state_dict()
    with pytest.raises(StructureMismatchError, match="torch"):
        ckptstore.RNGState().load_state_dict({**good, "torch": np.zeros(3, np.uint8)})
