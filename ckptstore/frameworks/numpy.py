"""NumPy: the core every other adapter funnels through, and NumPy's random generators.

A ``np.random.Generator``, ``RandomState`` or bare ``BitGenerator`` is saved as its bit generator's
state (a plain dict; MT19937's key is an array) and restored into its counterpart in ``like``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import StructureMismatchError, UnsupportedTypeError
from . import Walk


def _bit_generator(x: Any) -> Any:
    if isinstance(x, np.random.Generator):
        return x.bit_generator
    if isinstance(x, np.random.BitGenerator):
        return x
    return None


class NumpyAdapter:
    name = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        if isinstance(x, np.ma.MaskedArray):  # asarray would drop the mask without a word
            raise UnsupportedTypeError("a numpy masked array (save its .data and .mask as two arrays)")
        arr = np.asarray(x)
        if not arr.dtype.isnative:  # big-endian data (from a file format): saved as the same values, native
            return arr.astype(arr.dtype.newbyteorder("="))
        return np.array(arr, copy=True) if copy else arr

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        if isinstance(like, np.ndarray) and like.dtype != arr.dtype:
            if like.dtype.kind in "US" or like.dtype.type is np.void:  # (bfloat16 & co. are kind V too)
                # astype would give text or records that are not the saved numbers (or truncate them)
                raise StructureMismatchError(
                    f"`like` is a numpy array of dtype {like.dtype}, which cannot hold the checkpoint's "
                    f"{arr.dtype} array as numbers"
                )
            return arr.astype(like.dtype)
        return arr

    # --- objects: random generators ---------------------------------------------------------------

    def object_state(self, x: Any) -> Any | None:
        if isinstance(x, np.random.RandomState):
            return x.get_state(legacy=False)
        bits = _bit_generator(x)
        return None if bits is None else bits.state

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        kind = saved.get("bit_generator") if isinstance(saved, dict) else None
        if kind != template["bit_generator"]:
            raise StructureMismatchError(
                f"{where}: the checkpoint holds the state of a {kind or type(saved).__name__} bit generator, "
                f"`like` a {template['bit_generator']}"
            )
        state = walk(saved, template, ())
        try:
            if isinstance(like, np.random.RandomState):
                like.set_state(state)
            else:
                _bit_generator(like).state = state
        except (TypeError, ValueError, KeyError) as e:
            raise StructureMismatchError(f"{where}: the saved {kind} state does not fit: {e}") from None
        return like


ADAPTER = NumpyAdapter()
