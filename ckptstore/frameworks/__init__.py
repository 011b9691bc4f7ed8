"""Framework adapters: one thin module per framework, behind one small protocol.

Every adapter converts its framework's arrays to and from NumPy arrays holding the exact bits (bfloat16
and float8 as ml_dtypes types); everything else in ckptstore sees NumPy only. An adapter is looked up
from a value's type's module name, so a framework is imported only when one of its values is met:
``import ckptstore`` imports no ML framework.

Adding a framework means adding a module here with a module-level ``ADAPTER`` and one line in
``_MODULES``. An adapter may also save framework objects that are not arrays but hold some (a JAX
pytree node, a Keras layer, a NumPy generator): it then implements :class:`ObjectAdapter` as well; and
it may rename or partially load the state of its stateful objects (:class:`StateAdapter`: torch modules
saved compiled or wrapped in DDP), and have their arrays filled in place (``fill_view``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from ..bounce import DeviceTarget
from ..errors import CkptStoreError, short_repr

__all__ = [
    "Adapter",
    "ObjectAdapter",
    "StateAdapter",
    "adapter_for",
    "adapter_for_module",
    "adapter_named",
    "known_frameworks",
    "object_adapter_for",
]


class Adapter(Protocol):
    """What ckptstore needs of a framework.

    An adapter whose arrays are immutable may also define ``immutable_view(x, host)``: for the host array
    ``to_numpy(x, copy=False)`` returned, a check that it is still intact where it is a view of ``x``'s own
    buffer, or ``lambda: True`` where it is a private copy; None where ``x`` may change in place. A
    background save keeps such arrays as they are instead of copying them into its snapshot
    (:class:`ckptstore.skeleton.ArrayLeaf`'s ``intact``).
    """

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


#: ``walk(saved, template, key)`` rebuilds a part of a saved object state against a template part;
#: ``key`` extends the key path (``()`` for none) so that errors name the exact place.
Walk = Callable[[Any, Any, tuple[Any, ...]], Any]


class ObjectAdapter(Adapter, Protocol):
    """An adapter that also saves framework objects holding arrays but lacking ``state_dict()``.

    Such an object is saved as a plain tree (its *object state*: containers, arrays, plain values) and
    restored from that tree into an object of ``like`` (in place, or rebuilt with ``like``'s structure).
    """

    def object_state(self, x: Any) -> Any | None:
        """The state tree of ``x``, or None when ``x`` is no object this adapter saves."""
        ...

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        """``like`` restored from ``saved`` (a skeleton part); ``template`` is ``object_state(like)``.

        Returns the restored object (``like`` itself when restored in place).
        Raises StructureMismatchError, naming ``where`` (the key path), when ``saved`` does not fit.
        """
        ...


class StateAdapter(Adapter, Protocol):
    """Optional hooks for stateful objects of the framework (torch modules), used when their state is
    restored with ``load_state_dict``; an adapter without them gets the generic behaviour."""

    def state_key_map(self, obj: Any, saved: list[Any], target: list[Any], *, strict: bool) -> dict[Any, Any] | None:
        """Renames of the saved state dict's keys (``saved``) to fit ``obj``'s own (``target``: the keys of
        ``obj.state_dict()``), or None to keep them as saved."""
        ...

    def load_state(self, obj: Any, state: Any, *, strict: bool) -> bool:
        """Load a state that may lack some of ``obj``'s keys (``strict=False``) in the framework's own way;
        False when ``obj`` is no object it knows (the caller then fills the missing keys from
        ``obj.state_dict()`` and calls ``load_state_dict``)."""
        ...

    def fill_view(self, x: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | DeviceTarget | None:
        """Where the checkpoint's bytes of an array of ``dtype`` and ``shape`` can be read in place into
        ``x`` (an array of the object's state dict): a writable, C-contiguous uint8 view of its memory in
        host memory, a :class:`~ckptstore.bounce.DeviceTarget` in a device's; None when ``x`` cannot take
        them so (another dtype, shape or layout)."""
        ...

    def state_fits(self, obj: Any, saved: dict[Any, Any], template: Any) -> bool:
        """Whether ``obj.load_state_dict`` will accept a state of the structure of ``saved`` (a skeleton;
        ``template`` is ``obj.state_dict()``): checked before any array of it is filled in place."""
        ...


# Top-level module name of a value's type -> the adapter module that handles it.
_MODULES: dict[str, str] = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "tensorflow": "tf",
    "keras": "keras",
    "flax": "flax",
}
# framework= names -> adapter module.
_NAMES: dict[str, str] = {
    "numpy": "numpy",
    "np": "numpy",
    "torch": "torch",
    "jax": "jax",
    "tf": "tf",
    "tensorflow": "tf",
    "keras": "keras",
}
_loaded: dict[str, Adapter] = {}


def _load(module: str) -> Adapter:
    adapter = _loaded.get(module)
    if adapter is None:
        try:
            adapter = importlib.import_module(f"{__name__}.{module}").ADAPTER
        except ImportError as e:  # framework="jax" where JAX is not installed (or fails to import)
            raise CkptStoreError(f"framework {module!r} cannot be used: {type(e).__name__}: {e}") from e
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


def object_adapter_for(x: Any) -> tuple[ObjectAdapter, Any] | None:
    """The adapter that saves ``x`` as an object, and ``x``'s object state; None if none does.

    Asks the frameworks of ``x``'s classes first, then every framework already imported (a class
    registered as a JAX pytree node may come from any module). Imports no framework that is not
    imported yet.
    """
    for module in _object_candidates(type(x)):
        adapter = _load(module)
        object_state = getattr(adapter, "object_state", None)
        if object_state is None:
            continue
        state = object_state(x)
        if state is not None:
            return adapter, state  # type: ignore[return-value]
    return None


def _object_candidates(cls: type) -> Iterator[str]:
    seen: set[str] = set()
    tops = [c.__module__.partition(".")[0] for c in cls.__mro__]
    tops += [top for top in _MODULES if top in sys.modules]
    for top in tops:
        module = _MODULES.get(top)
        if module is not None and module not in seen:
            seen.add(module)
            yield module


def adapter_named(name: str) -> Adapter:
    """The adapter for ``framework=name`` (numpy, torch, jax, tf, keras)."""
    module = _NAMES.get(name) if isinstance(name, str) else None
    if module is None:
        raise CkptStoreError(
            f"framework must be one of {', '.join(sorted(_NAMES))} (or None for numpy), got {short_repr(name)}"
            if not isinstance(name, str)
            else f"unknown framework {name!r}; known: {', '.join(sorted(_NAMES))}"
        )
    return _load(module)


def known_frameworks() -> list[str]:
    """The names ``framework=`` accepts."""
    return sorted(_NAMES)
