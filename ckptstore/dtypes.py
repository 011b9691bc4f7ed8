"""Element types: safetensors' dtype codes and their NumPy (and ml_dtypes) counterparts.

Every framework adapter funnels through NumPy, so this table is the one place that knows which bit
layouts exist. Types NumPy lacks (bfloat16, float8) come from ml_dtypes, which JAX and TensorFlow use too.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import CorruptCheckpointError

_CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "C64": np.dtype(np.complex64),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _CODES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)

_BY_DTYPE: dict[np.dtype, str] = {dt: code for code, dt in _CODES.items()}


def code_of(dtype: np.dtype) -> str | None:
    """The safetensors code of a NumPy dtype, or None when safetensors cannot hold it."""
    return _BY_DTYPE.get(np.dtype(dtype))


def dtype_of(code: str) -> np.dtype:
    """The NumPy dtype of a safetensors code; a code not in the table is a corrupt checkpoint."""
    try:
        return _CODES[code]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"unknown tensor dtype {code!r}") from None


def supported_codes() -> list[str]:
    """Every dtype code this version reads and writes."""
    return list(_CODES)
