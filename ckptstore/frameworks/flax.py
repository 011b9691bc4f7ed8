"""Flax NNX: modules, optimizers, RNG streams (any ``nnx.Pytree``) saved as their state, restored in place.

An NNX object is saved as ``nnx.state(obj)`` in the plain form ``nnx.to_pure_dict`` gives: a nested dict
from attribute names to the variables' values, so the manifest reads ``model/l1/kernel``,
``opt/step``, ``opt/opt_state/0/mu/l1/kernel`` and ``rngs/default/key``. The values are JAX arrays, which
the JAX adapter saves (an RNG stream's typed key as its implementation's name and key data, its count as
an ordinary array); bfloat16 keeps its bits.

Restoring into an NNX object in ``like`` rebuilds the saved dict against the object's own state (each
array takes the dtype and sharding of its variable; keys must match as for any dict, so a layer only one
side has raises StructureMismatchError naming its key path, or with ``strict=False`` is reported and left
as it is) and only then writes the values into the object with ``nnx.update``: the module, its
submodules and its ``Variable`` objects stay the same objects, a mismatch leaves them untouched, and
training continues exactly.

Why not as the JAX pytree node an NNX object also is: its pytree children hold NNX's bookkeeping
(``_pytree__state``), which is no data, and a node rebuilt from them would be a new object while the
training loop keeps using the old one. ``nnx.Variable`` and ``nnx.State`` values met outside an NNX object
(a state split by hand) are saved as before: Variables as JAX pytree nodes, a State as a mapping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from ..errors import StructureMismatchError
from . import Walk
from .jax import ADAPTER as JAX


class FlaxAdapter:
    """Arrays are JAX's (Flax has no array type of its own); the objects are NNX's."""

    name = "flax"

    def is_array(self, x: Any) -> bool:
        return False  # asked only of Flax's own types, none of which is an array

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        return JAX.to_numpy(x, copy=copy)

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        # Arrays inside an NNX object's state that `like` has no counterpart for come back as JAX arrays.
        return JAX.from_numpy(arr, like)

    # --- objects: nnx.Module, nnx.Optimizer, nnx.Rngs and every other nnx.Pytree ------------------

    def object_state(self, x: Any) -> Any | None:
        if isinstance(x, nnx.Pytree):
            return nnx.to_pure_dict(nnx.state(x))
        return None  # a Variable, a flax.struct node, a FrozenDict...: the JAX adapter or the tree walk

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        if type(saved) is not dict:
            raise StructureMismatchError(
                f"{where}: the checkpoint holds no NNX state here (a {type(saved).__name__}), `like` is a "
                f"{type(like).__qualname__}"
            )
        # Rebuilt in full (checked and converted) before anything is written: a mismatch found half-way
        # must not leave the object partly restored.
        state = walk(saved, template, ())
        nnx.update(like, state)
        return like


ADAPTER = FlaxAdapter()
