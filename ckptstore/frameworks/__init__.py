"""Framework adapters: one thin module per framework, behind one small protocol.

Every adapter converts its framework's arrays to and from NumPy arrays holding the exact bits (bfloat16
and float8 as ml_dtypes types); everything else in ckptstore sees NumPy only. An adapter is looked up
from a value's type's module name, so a framework is imported only when one of its values is met:
``import ckptstore`` imports no ML framework.

Adding a framework means adding a module here with a module-level ``ADAPTER`` and one line in
``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from ..errors import CkptStoreError

__all__ = ["Adapter", "adapter_for", "adapter_for_module", "adapter_named", "known_frameworks"]


class Adapter(Protocol):
    """What ckptstore needs of a framework."""

    #: The name users pass as ``framework=``.
    name: str

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array (tensor) of this framework."""
        ...

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        """A host NumPy array with ``x``'s shape and exact bits; ``copy=True`` guarantees it shares no
        memory with ``x`` (a snapshot that later in-place updates of ``x`` cannot change)."""
        ...

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        """An array of this framework holding ``arr``; with ``like``, of ``like``'s dtype and device."""
        ...


# Top-level module name of a value's type -> the adapter module that handles it.
_MODULES: dict[str, str] = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "tensorflow": "tf",
    "keras": "tf",
}
# framework= names -> adapter module.
_NAMES: dict[str, str] = {
    "numpy": "numpy",
    "np": "numpy",
    "torch": "torch",
    "jax": "jax",
    "tf": "tf",
    "tensorflow": "tf",
}
_loaded: dict[str, Adapter] = {}


def _load(module: str) -> Adapter:
    adapter = _loaded.get(module)
    if adapter is None:
        adapter = importlib.import_module(f"{__name__}.{module}").ADAPTER
        _loaded[module] = adapter
    return adapter


def adapter_for(x: Any) -> Adapter | None:
    """The adapter whose framework ``x`` is an array of, or None. Imports nothing new for other values."""
    module = _MODULES.get(type(x).__module__.partition(".")[0])
    if module is None:
        return None
    adapter = _load(module)
    return adapter if adapter.is_array(x) else None


def adapter_for_module(module_name: str) -> Adapter | None:
    """The adapter of the framework a module belongs to (``torch.optim.adam`` -> torch), or None."""
    module = _MODULES.get(module_name.partition(".")[0])
    return None if module is None else _load(module)


def adapter_named(name: str) -> Adapter:
    """The adapter for ``framework=name`` (numpy, torch, jax, tf)."""
    module = _NAMES.get(name)
    if module is None:
        raise CkptStoreError(f"unknown framework {name!r}; known: {', '.join(sorted(_NAMES))}")
    return _load(module)


def known_frameworks() -> list[str]:
    """The names ``framework=`` accepts."""
    return sorted(_NAMES)
