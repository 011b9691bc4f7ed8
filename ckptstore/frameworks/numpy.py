"""NumPy: the core every other adapter funnels through."""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyAdapter:
    name = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        return np.array(x, copy=True) if copy else np.asarray(x)

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        if isinstance(like, np.ndarray) and like.dtype != arr.dtype:
            return arr.astype(like.dtype)
        return arr


ADAPTER = NumpyAdapter()
