"""JAX: ``jax.Array`` leaves, typed PRNG keys, and registered pytree nodes of any class.

Arrays go to host NumPy arrays with their exact bits (bfloat16 and float8 are ml_dtypes types in JAX as
in ckptstore) and come back with ``jax.device_put`` onto the sharding of their counterpart in ``like``
(single-device placement; a sharding whose devices this process addresses all works too).

A global array over the devices of several processes (``jax.distributed``) is saved by every process as
its distinct blocks (:func:`ckptstore.shard.from_global_jax`). Restored into a ``jax.ShapeDtypeStruct``
(with a sharding, or none: this process's first device) or into such a global array, each process builds
only its devices' blocks (:meth:`JaxAdapter.block_layout`, :meth:`JaxAdapter.from_blocks`) and the global
array is assembled with ``jax.make_array_from_single_device_arrays``.

A registered pytree node (a flax struct dataclass, a class registered with ``register_pytree_node`` or
``register_dataclass``) is saved as its children one level down: a dict by field name where JAX gives
names, else a list. It is rebuilt with the tree definition of its counterpart in ``like``, so static
(meta) fields come from ``like``. NamedTuples (optax states) are tuples to ckptstore and need no JAX.

A typed key (``jax.random.key``) is saved as its implementation's name and its ``key_data``; a raw
``uint32`` key (``jax.random.PRNGKey``) is an ordinary array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..errors import StructureMismatchError, UnsupportedTypeError
from . import Walk

_KEY_FIELDS = ("impl", "key_data")


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _one_level(x: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``x``'s children with their keys, and the tree definition of ``x`` one level deep."""
    return jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda c: c is not x)


def _children_state(pairs: list[tuple[Any, Any]]) -> dict[str, Any] | list[Any]:
    names: list[str] = []
    for keypath, _ in pairs:
        key = keypath[0] if len(keypath) == 1 else None
        name = key.key if isinstance(key, jax.tree_util.DictKey) else getattr(key, "name", None)
        if type(name) is not str or name in names:
            return [child for _, child in pairs]  # unnamed (register_pytree_node) or ambiguous
        names.append(name)
    return {n: child for n, (_, child) in zip(names, pairs)}


def _fit_without_x64(arr: np.ndarray) -> np.ndarray:
    """Without ``jax_enable_x64`` JAX stores 64-bit values in 32 bits and silently wraps integers that do
    not fit. Floats lose precision as in any JAX program; integers that would change are an error."""
    target = jax.dtypes.canonicalize_dtype(arr.dtype)
    if target == arr.dtype or arr.dtype.kind not in "iu" or arr.size == 0:
        return arr
    info = np.iinfo(target)
    if arr.min() < info.min or arr.max() > info.max:
        raise UnsupportedTypeError(
            f"{arr.dtype} values up to {arr.max()} do not fit JAX's {target} (jax_enable_x64 is off); "
            "enable it, restore with like= a template, or with framework='numpy'"
        )
    return arr.astype(target)


def _always() -> bool:
    return True


class JaxAdapter:
    name = "jax"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array) and not _is_key(x)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        if isinstance(x, jax.core.Tracer):
            raise UnsupportedTypeError(f"a traced JAX value ({type(x).__name__}): save outside jit/grad/vmap")
        if not x.is_fully_addressable:
            raise UnsupportedTypeError(
                f"a jax.Array sharded over devices of other processes ({x.sharding}); "
                "save each process's shards or gather it first"
            )
        # np.asarray of a CPU array may alias its buffer; JAX arrays are immutable, but a donated buffer
        # is reused, so a snapshot copies.
        return np.array(x, copy=True) if copy else np.asarray(x)

    def immutable_view(self, x: Any, host: np.ndarray) -> Callable[[], bool] | None:
        """JAX never changes an array's bytes; a host view of a CPU array's buffer stays what it is for as
        long as the array is not deleted, nor donated to a computation (JAX does not donate a buffer a
        NumPy view holds, and a donated array reports ``is_deleted()``). Any other host array from
        :meth:`to_numpy` is JAX's private copy."""
        try:
            aliased = len(x.devices()) == 1 and host.ctypes.data == x.unsafe_buffer_pointer()
        except Exception:  # an array without one buffer (several devices): np.asarray gathered a copy
            aliased = False
        return (lambda: not x.is_deleted()) if aliased else _always

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        if isinstance(like, jax.Array) and not _is_key(like):
            if arr.dtype != like.dtype:
                arr = arr.astype(like.dtype)
            return jax.device_put(arr, like.sharding)
        return jax.device_put(_fit_without_x64(arr))

    # --- global arrays, restored block by block ---------------------------------------------------

    def block_layout(self, like: Any) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]] | None:
        """For a template restored block by block (a ``jax.ShapeDtypeStruct``, or a ``jax.Array`` over
        devices of other processes): its global shape and the distinct blocks ``(offsets, shape)`` that
        this process's devices hold, in offsets order. None for any other value."""
        sharding = _block_sharding(like)
        if sharding is None:
            return None
        gshape = tuple(int(d) for d in like.shape)
        blocks = {_block(index, gshape) for index in sharding.addressable_devices_indices_map(gshape).values()}
        return gshape, sorted(blocks)

    def from_blocks(self, like: Any, blocks: dict[tuple[int, ...], np.ndarray]) -> Any:
        """The global array of ``like``'s shape, dtype and sharding whose blocks on this process's devices
        are ``blocks`` (by offsets, as :meth:`block_layout` named them)."""
        sharding = _block_sharding(like)
        assert sharding is not None
        gshape = tuple(int(d) for d in like.shape)
        dtype = np.dtype(like.dtype)
        on_devices = []
        for device, index in sharding.addressable_devices_indices_map(gshape).items():
            arr = blocks[_block(index, gshape)[0]]
            on_devices.append(jax.device_put(arr if arr.dtype == dtype else arr.astype(dtype), device))
        return jax.make_array_from_single_device_arrays(gshape, sharding, on_devices)

    # --- objects: typed keys and registered pytree nodes ------------------------------------------

    def object_state(self, x: Any) -> Any | None:
        if _is_key(x):
            return {"impl": str(jax.random.key_impl(x)), "key_data": jax.random.key_data(x)}
        if isinstance(x, jax.Array):
            return None
        pairs, treedef = _one_level(x)
        if jax.tree_util.treedef_is_leaf(treedef):
            return None  # not a registered pytree node
        return _children_state(pairs)

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        if _is_key(like):
            if type(saved) is not dict or set(saved) != set(_KEY_FIELDS):
                raise StructureMismatchError(f"{where}: the checkpoint holds no typed JAX key, `like` does")
            if saved["impl"] != template["impl"]:
                raise StructureMismatchError(
                    f"{where}: the checkpoint holds a {saved['impl']} key, `like` a {template['impl']} key"
                )
            data = walk(saved["key_data"], template["key_data"], ("key_data",))
            return jax.random.wrap_key_data(data, impl=template["impl"])
        if (
            type(saved) is not type(template)
            or len(saved) != len(template)
            or (isinstance(saved, dict) and saved.keys() != template.keys())
        ):
            raise StructureMismatchError(
                f"{where}: the checkpoint's children {_describe(saved)} do not fit those of `like`, a "
                f"{type(like).__qualname__} pytree node with children {_describe(template)}"
            )
        children = walk(saved, template, ())
        values = [children[k] for k in template] if isinstance(template, dict) else children
        _, treedef = _one_level(like)
        return jax.tree_util.tree_unflatten(treedef, values)


def _block_sharding(like: Any) -> Any:
    """The sharding a template restored block by block asks for, or None for other values."""
    if isinstance(like, jax.ShapeDtypeStruct):
        if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
            raise UnsupportedTypeError("a ShapeDtypeStruct of typed PRNG keys cannot be restored into: use a key")
        sharding = getattr(like, "sharding", None)
        return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(like, jax.Array) and not _is_key(like) and not like.is_fully_addressable:
        return like.sharding
    return None


def _block(index: tuple[slice, ...], gshape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, shape)`` of a device's block from its index into the global array."""
    bounds = [sl.indices(g)[:2] for sl, g in zip(index, gshape)]
    return tuple(a for a, _ in bounds), tuple(b - a for a, b in bounds)


def _describe(children: Any) -> str:
    if isinstance(children, dict):
        return f"{list(children)}"
    return f"({len(children)} unnamed)" if isinstance(children, list) else f"({type(children).__name__})"


ADAPTER = JaxAdapter()
