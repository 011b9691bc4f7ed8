"""The process's global random number generators as one stateful leaf: :class:`RNGState`."""

from __future__ import annotations

import importlib
import random
import sys
import warnings
from typing import Any

import numpy as np

from .errors import StructureMismatchError

__all__ = ["RNGState"]


class RNGState:
    """The global random generators of this process, saved and restored like a model.

    ``state_dict()`` captures Python's :mod:`random`, NumPy's global generator (``np.random.rand`` and
    friends) and, when torch is already imported, torch's CPU generator and every CUDA device's generator
    (when CUDA is available). A framework that is not imported is not captured, and never imported to
    find out. ``load_state_dict()`` restores what the state holds (importing torch if it holds torch's).

    Not captured, because they are not global: JAX keys, ``np.random.Generator`` objects, ``torch.Generator``
    objects, Keras seed generators and ``tf.random.Generator`` objects. Put those in the state
    themselves (ckptstore saves them as leaves). TensorFlow's op-level seeded random ops keep hidden
    per-op state that no API exposes.

    Example::

        store.save(step, {"model": model, "rng": ckptstore.RNGState()})
        store.restore(like={"model": model, "rng": ckptstore.RNGState()})  # RNGs restored in place
    """

    def state_dict(self) -> dict[str, Any]:
        """The current states: ``python`` (``random.getstate()``), ``numpy`` (the global RandomState's
        state dict), ``torch`` (a uint8 tensor) and ``cuda`` (a list, one per device) where present."""
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=False),
        }
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "get_rng_state"):
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the generators to ``state`` (as ``state_dict()`` returned it, or restored without ``like``:
        arrays may be NumPy arrays, lists may stand for tuples).

        Raises:
            StructureMismatchError: the state is not an RNGState's.
        """
        if not isinstance(state, dict) or "python" not in state or "numpy" not in state:
            keys = list(state) if isinstance(state, dict) else type(state).__name__
            raise StructureMismatchError(f"RNGState: not an RNG state (keys: {keys})")
        try:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
            np.random.set_state(_numpy_state(state["numpy"]))
        except (TypeError, ValueError, KeyError) as e:
            raise StructureMismatchError(f"RNGState: bad Python or NumPy generator state ({e})") from None
        if "torch" in state:
            _load_torch(state["torch"], state.get("cuda"))

    def __repr__(self) -> str:
        return "RNGState()"


def _numpy_state(saved: Any) -> dict[str, Any]:
    inner = dict(saved["state"])
    inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    return {**saved, "state": inner}


def _load_torch(cpu: Any, cuda: list[Any] | None) -> None:
    torch = importlib.import_module("torch")  # the checkpoint holds torch's state: restore it

    def as_bytes(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.detach().to("cpu", torch.uint8)
        return torch.from_numpy(np.array(t, dtype=np.uint8))

    try:
        torch.set_rng_state(as_bytes(cpu))
    except (TypeError, ValueError, RuntimeError) as e:
        raise StructureMismatchError(f"RNGState: bad torch generator state ({e})") from None
    if not cuda:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(cuda):
        warnings.warn(
            f"RNGState: the checkpoint holds {len(cuda)} CUDA generator states, this process sees {available} "
            f"devices; restoring the first {min(available, len(cuda))}",
            stacklevel=3,
        )
    for device, s in enumerate(cuda[:available]):
        torch.cuda.set_rng_state(as_bytes(s), device)
