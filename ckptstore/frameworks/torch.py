"""PyTorch tensors, on any device, every dtype safetensors holds (bfloat16 and float8 included), and
``torch.Generator`` objects (saved as their ``get_state()``, restored into the generator in ``like``).

A module's state dict is restored with its keys renamed to fit the module in ``like`` when they differ
only by the prefixes wrappers add: ``_orig_mod.`` (``torch.compile``) and ``module.`` (DDP,
``DataParallel``), in any nesting; see :meth:`TorchAdapter.state_key_map`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..errors import StructureMismatchError, UnsupportedTypeError
from ..shard import is_dtensor
from . import Walk
from ._prefixes import wrapper_prefix as _wrapper_prefix

# Torch dtypes NumPy lacks: reinterpret their bits through a same-width integer type.
_VIA_INT: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
}
if hasattr(torch, "float8_e8m0fnu") and hasattr(ml_dtypes, "float8_e8m0fnu"):
    _VIA_INT[torch.float8_e8m0fnu] = (torch.uint8, np.dtype(ml_dtypes.float8_e8m0fnu))
# Torch dtypes that Tensor.numpy() converts by itself (any other raises a bare TypeError there).
_NUMPY_OK = frozenset(
    {
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
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
# The NumPy dtype of each torch dtype ckptstore saves.
_NUMPY_OF: dict[torch.dtype, np.dtype] = {t: np.dtype(torch.empty(0, dtype=t).numpy().dtype) for t in _NUMPY_OK} | {
    t: np_dt for t, (_, np_dt) in _VIA_INT.items()
}
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
        if t.is_nested or t.layout is not torch.strided or t.is_quantized:
            raise UnsupportedTypeError(
                f"torch tensor layout {t.layout} (nested={t.is_nested}, quantized={t.is_quantized})"
            )
        if t.device.type == "meta":
            raise UnsupportedTypeError("a torch tensor on the meta device holds no data")
        if t.dtype not in _NUMPY_OK and t.dtype not in _VIA_INT:
            raise UnsupportedTypeError(f"torch dtype {t.dtype}, which safetensors cannot hold")
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
            if like.is_nested or like.layout is not torch.strided or like.is_quantized:
                raise StructureMismatchError(
                    f"`like` is a torch tensor of layout {like.layout} (nested={like.is_nested}, "
                    f"quantized={like.is_quantized}); the checkpoint holds a plain {arr.dtype} array"
                )
            if like.device.type == "meta":  # the bytes would be dropped without a word
                raise StructureMismatchError(
                    "`like` is a torch tensor on the meta device, which holds no data; create it on a real device "
                    "first (module.to_empty(device=...)), or pass None there to get the saved array"
                )
            t = t.to(device=like.device, dtype=like.dtype)
            if isinstance(like, torch.nn.Parameter):  # a Parameter in, a Parameter out (an optimizer can take it)
                return torch.nn.Parameter(t, requires_grad=like.requires_grad)
            if like.requires_grad:
                t.requires_grad_(True)
        return t

    # --- objects: torch.Generator (no state_dict(); get_state/set_state) -------------------------

    def object_state(self, x: Any) -> Any | None:
        if isinstance(x, torch.Generator):
            return {"device": str(x.device), "state": x.get_state()}
        return None

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        if not isinstance(saved, dict) or set(saved) != {"device", "state"}:
            raise StructureMismatchError(f"{where}: the checkpoint holds no torch.Generator state here")
        state = walk(saved["state"], template["state"], ("state",))
        try:
            like.set_state(state)
        except (RuntimeError, TypeError, ValueError) as e:
            raise StructureMismatchError(
                f"{where}: the saved {saved['device']} generator state does not fit a {template['device']} "
                f"torch.Generator ({e})"
            ) from None
        return like

    # --- stateful objects: modules saved wrapped, partial loads ----------------------------------

    def state_key_map(self, obj: Any, saved: list[Any], target: list[Any], *, strict: bool) -> dict[Any, Any] | None:
        """For a module ``obj``: the saved state dict's keys renamed to ``obj``'s own (``target``), when the
        two differ by the wrappers' prefixes (``_orig_mod.``, ``module.``, in any nesting) that every key of
        a side carries: a compiled or DDP model's checkpoint into a plain model, and back. Applied when the
        renamed keys equal ``target`` one to one; with ``strict=False``, when they match more of ``target``
        than the keys as saved do. None: nothing to rename."""
        if not isinstance(obj, torch.nn.Module):
            return None
        have, want = _wrapper_prefix(saved), _wrapper_prefix(target)
        if have == want:
            return None
        renamed = {k: want + k[len(have) :] for k in saved}
        wanted = set(target)
        hits = sum(1 for k in renamed.values() if k in wanted)
        ok = hits == len(wanted) == len(saved) if strict else hits > len(wanted.intersection(saved))
        return renamed if ok else None

    def load_state(self, obj: Any, state: Any, *, strict: bool) -> bool:
        """``obj.load_state_dict(state, strict=strict)`` for a module (True); False for anything else."""
        if not isinstance(obj, torch.nn.Module):
            return False
        obj.load_state_dict(state, strict=strict)
        return True

    # --- restoring in place: the checkpoint's bytes read straight into the tensors of `like`'s objects ---

    def fill_view(self, x: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | DeviceTensor | None:
        """Where the checkpoint's bytes of an array of ``dtype`` and ``shape`` can be read straight into
        ``x``: a plain tensor (no subclass) of exactly that dtype and shape, dense, contiguous, not a
        conjugated or negated view. A writable uint8 view of its memory on the CPU; on another device, a
        :class:`DeviceTensor` filled through a bounce buffer (:mod:`ckptstore.bounce`). None otherwise
        (the array is then read the usual way and ``load_state_dict`` copies it).

        A DTensor: the view of its local tensor, for its block of ``shape`` (read into it block by block)."""
        if is_dtensor(x):
            with torch.no_grad():  # its own local tensor, not an autograd view of it
                local = x.to_local()
            return self.fill_view(local, dtype, shape)
        if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:  # no subclass (DTensor, fake...)
            return None
        if x.layout is not torch.strided or x.device.type == "meta":
            return None
        if x.is_nested or x.is_quantized or x.is_conj() or x.is_neg() or not x.is_contiguous():
            return None
        if x.shape != shape or x.numel() == 0 or _NUMPY_OF.get(x.dtype) != dtype:
            return None
        if x.device.type != "cpu":
            return self.device_target(x)
        try:  # x's own bytes (contiguous: a view), as NumPy sees them
            view = x.detach().reshape(-1).view(torch.uint8).numpy()
        except Exception:  # whatever torch refuses is restored the usual way, which reports it
            return None
        return view if view.flags.writeable else None

    def device_array(self, x: Any) -> DeviceArray | None:
        """A tensor on an accelerator as a :class:`DeviceArray`, which an async save's snapshot copies
        straight into its pinned buffer (one device-to-host copy, not one into fresh memory and another
        into the buffer); None for a CPU tensor, copied the usual way."""
        if not isinstance(x, torch.Tensor) or x.device.type in ("cpu", "meta"):
            return None
        if x.is_nested or x.layout is not torch.strided or x.is_quantized:
            return None  # to_numpy names what is wrong
        if x.dtype not in _NUMPY_OK and x.dtype not in _VIA_INT:
            return None
        return DeviceArray(x)

    @staticmethod
    def device_target(x: Any) -> DeviceTensor:
        """``x`` (contiguous) as a target of the bounce-buffer pipeline: what ``fill_view`` gives for a tensor
        on an accelerator. A CPU tensor works the same way (how the pipeline is tested without a GPU)."""
        return DeviceTensor(x)

    def state_fits(self, obj: Any, saved: dict[Any, Any], template: Any) -> bool:
        """Whether ``obj.load_state_dict`` can accept a state of ``saved``'s structure (checked before any
        tensor of it is filled in place): an optimizer's parameter groups must match in number and size."""
        if not isinstance(obj, torch.optim.Optimizer):
            return True
        have, want = saved.get("param_groups"), template.get("param_groups")
        if not isinstance(have, list | tuple) or not isinstance(want, list | tuple) or len(have) != len(want):
            return False
        for a, b in zip(have, want):
            if not isinstance(a, dict) or not isinstance(b, dict):
                return False
            pa, pb = a.get("params"), b.get("params")
            if not isinstance(pa, list | tuple) or not isinstance(pb, list | tuple) or len(pa) != len(pb):
                return False
        return True

    def state_for_load(self, obj: Any, state: Any) -> Any:
        """``state`` as given to ``obj.load_state_dict``: for an optimizer, each parameter group's list of
        parameter ids made a :class:`_ParamIds`. torch's ``Optimizer.load_state_dict`` asks, for every state
        tensor, which group holds its parameter with ``in`` on those lists: quadratic in the number of
        parameters (10 of 15 s of a restore of 25,000 parameters and their AdamW state). The same answer,
        from a set."""
        if not isinstance(obj, torch.optim.Optimizer) or type(state) is not dict:
            return state
        groups = state.get("param_groups")
        if type(groups) is not list:
            return state
        fast = [
            {**g, "params": _ParamIds(g["params"])} if type(g) is dict and type(g.get("params")) is list else g
            for g in groups
        ]
        return {**state, "param_groups": fast}


class _ParamIds(list):
    """A list of parameter ids whose ``in`` is a set lookup (see :meth:`TorchAdapter.state_for_load`)."""

    __slots__ = ("_ids",)

    def __init__(self, ids: list[Any]) -> None:
        super().__init__(ids)
        try:
            self._ids: set[Any] | None = set(ids)
        except TypeError:  # unhashable ids: the list's own search
            self._ids = None

    def __contains__(self, x: object) -> bool:
        return x in self._ids if self._ids is not None else super().__contains__(x)


ADAPTER = TorchAdapter()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return _NUMPY_OF[dtype]


class DeviceArray:
    """A tensor's bytes to be copied to host memory later, into a snapshot buffer (``asyncsave``): what an
    async save's walk of the state keeps for a tensor on an accelerator. Quacks as far as the snapshot
    needs like the NumPy array it becomes (``dtype``, ``shape``, ``nbytes``)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.tensor = x.detach()
        self.dtype = _numpy_dtype(x.dtype)
        self.shape = tuple(x.shape)
        self.ndim = len(self.shape)
        self.nbytes = x.numel() * x.element_size()

    def copy_to(self, dst: np.ndarray) -> None:
        """Start copying the tensor's bytes into ``dst`` (uint8 of ``nbytes``, in a :meth:`host_buffer`);
        done at the buffer's ``fence``."""
        src = self.tensor.resolve_conj().resolve_neg().contiguous()
        torch.from_numpy(dst).copy_(src.reshape(-1).view(torch.uint8), non_blocking=src.device.type == "cuda")

    def host_buffer(self, nbytes: int) -> tuple[np.ndarray, Callable[[], Callable[[], None]]]:
        """Host memory for snapshots of this device's tensors (pinned where CUDA is) and its fence: a
        function giving a wait for the copies issued so far."""
        buffer = BounceBuffer(nbytes, self.tensor.device)
        return buffer.host, buffer.fence


class DeviceTensor:
    """A tensor filled from a bounce buffer (:class:`ckptstore.bounce.DeviceTarget`): host-to-device
    copies, non-blocking from pinned memory, on the device's current stream."""

    def __init__(self, x: torch.Tensor) -> None:
        self.bytes = x.detach().reshape(-1).view(torch.uint8)  # (contiguous: a view of x's own memory)
        self.nbytes = self.bytes.numel()
        self.address = (str(x.device), x.data_ptr())

    def copy_in(self, offset: int, host: np.ndarray) -> None:
        src = torch.from_numpy(host)
        self.bytes[offset : offset + host.nbytes].copy_(src, non_blocking=self.bytes.device.type != "cpu")

    def bounce_buffer(self, nbytes: int) -> BounceBuffer:
        return BounceBuffer.get(nbytes, self.bytes.device)


class BounceBuffer:
    """Host memory for copies to a device: pinned when CUDA is there (pinning needs it), kept per process
    for the next restore (pinning 128 MiB takes tens of milliseconds), and grown when too small."""

    _kept: BounceBuffer | None = None
    _lock = threading.Lock()

    def __init__(self, nbytes: int, device: torch.device) -> None:
        pin = device.type == "cuda" and torch.cuda.is_available()
        self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.host = self._tensor.numpy()
        self.device = device

    @classmethod
    def get(cls, nbytes: int, device: torch.device) -> BounceBuffer:
        with cls._lock:
            kept = cls._kept
            if kept is None or kept.host.nbytes < nbytes or kept.device.type != device.type:
                cls._kept = kept = None  # drop the old one before allocating its replacement
                cls._kept = kept = cls(nbytes, device)
            return kept

    def fence(self) -> Callable[[], None]:
        if self.device.type != "cuda":
            return _done  # the copies ran already
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event.synchronize


def _done() -> None:
    pass
