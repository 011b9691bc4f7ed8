"""PyTorch tensors, on any device, every dtype safetensors holds (bfloat16 and float8 included)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..errors import UnsupportedTypeError

# Torch dtypes NumPy lacks: reinterpret their bits through a same-width integer type.
_VIA_INT: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
}
if hasattr(torch, "float8_e8m0fnu") and hasattr(ml_dtypes, "float8_e8m0fnu"):
    _VIA_INT[torch.float8_e8m0fnu] = (torch.uint8, np.dtype(ml_dtypes.float8_e8m0fnu))
_INT_OF: dict[np.dtype, tuple[np.dtype, torch.dtype]] = {
    np_dt: (np.dtype(np.int16) if t_dt is torch.bfloat16 else np.dtype(np.uint8), t_dt)
    for t_dt, (_, np_dt) in _VIA_INT.items()
}


class TorchAdapter:
    name = "torch"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        t = x.detach()
        if t.layout is not torch.strided or t.is_quantized:
            raise UnsupportedTypeError(f"torch tensor layout {t.layout} (quantized={t.is_quantized})")
        t = t.resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a copy already
        elif copy:
            t = t.clone()
        via = _VIA_INT.get(t.dtype)
        if via is not None:
            return t.view(via[0]).numpy().view(via[1])
        return t.numpy()

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        via = _INT_OF.get(arr.dtype)
        t = torch.from_numpy(arr) if via is None else torch.from_numpy(arr.view(via[0])).view(via[1])
        if isinstance(like, torch.Tensor):
            t = t.to(device=like.device, dtype=like.dtype)
            if like.requires_grad:
                t.requires_grad_(True)
        return t


ADAPTER = TorchAdapter()
