"""Keras 3 (any backend): ``keras.Variable`` leaves; layers, models, optimizers, metrics and seed
generators as stateful objects.

A Keras object is saved as its variables (``obj.variables``: weights, non-trainable state such as batch
norm statistics, seed generator states; an optimizer's ``iterations``, learning rate and slots) and
restored in place, matched by order (see ``_variables``), so a model rebuilt in the same process, whose
layers Keras has renamed, still restores. A model's optimizer is not part of the model's variables: save
it next to the model.

Keras optimizers create their slot variables lazily. Restoring into one that is not built yet raises
StructureMismatchError asking for ``optimizer.build(model.trainable_variables)`` first.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ..errors import StructureMismatchError
from . import Walk
from ._variables import restore_in_order, variables_by_path

_OBJECTS = (keras.Layer, keras.optimizers.Optimizer, keras.metrics.Metric)
_TF_BACKEND = keras.backend.backend() == "tensorflow"


class KerasAdapter:
    name = "keras"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, keras.Variable)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        # On TensorFlow, convert_to_numpy goes through np.array(tensor), which NumPy 2 warns about.
        arr = np.asarray(x.value.numpy() if _TF_BACKEND else keras.ops.convert_to_numpy(x.value))
        return np.array(arr, copy=True) if copy else arr

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        if isinstance(like, keras.Variable):
            like.assign(arr)  # converts to the variable's dtype
            return like
        return keras.ops.convert_to_tensor(arr)

    # --- objects: layers, models, optimizers, metrics, seed generators ----------------------------

    def object_state(self, x: Any) -> Any | None:
        if isinstance(x, _OBJECTS):
            return variables_by_path(x.variables, lambda v: v.path)
        if isinstance(x, keras.random.SeedGenerator):
            return variables_by_path([x.state], lambda v: v.path)
        return None

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        if isinstance(saved, dict) and len(saved) > len(template):
            if isinstance(like, keras.optimizers.Optimizer) and not like.built:
                raise StructureMismatchError(
                    f"{where}: the optimizer {like.name!r} is not built yet, so it lacks its slot variables; "
                    "call optimizer.build(model.trainable_variables) before restoring"
                )
            if isinstance(like, keras.Layer) and not like.built:
                raise StructureMismatchError(
                    f"{where}: the layer {like.name!r} is not built yet, so it lacks its variables; "
                    "build it (call it on an input, or give the model an Input) before restoring"
                )
        restore_in_order(like, saved, template, walk, where)
        return like


ADAPTER = KerasAdapter()
