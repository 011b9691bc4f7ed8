"""TensorFlow: ``tf.Tensor`` and ``tf.Variable`` leaves, ``tf.Module`` and ``tf.random.Generator`` objects.

TensorFlow's bfloat16 and float8 are the ml_dtypes types, so ``numpy()`` gives the exact bits. A tensor
comes back as a new tensor on its counterpart's device; a variable in ``like`` is assigned in place and
returned (other code holds references to variables: a model, a ``tf.train.Checkpoint``).

A ``tf.Module`` without Keras (Keras objects have their own adapter) is saved as its variables in
``module.variables`` order, keyed by their names, and restored in place by that order; a
``tf.random.Generator`` is saved as its state variable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ..errors import StructureMismatchError, UnsupportedTypeError
from . import Walk
from ._variables import restore_in_order, variables_by_path

# Dtypes whose values are no array of numbers: strings, resource handles, variants (datasets, lists...).
_NOT_NUMBERS = frozenset({tf.string, tf.resource, tf.variant})


class TfAdapter:
    name = "tf"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, tf.Tensor | tf.Variable)

    def to_numpy(self, x: Any, *, copy: bool) -> np.ndarray:
        if x.dtype in _NOT_NUMBERS:
            raise UnsupportedTypeError(f"a tf.{x.dtype.name} tensor, which holds no numbers an array file can store")
        try:
            arr = x.numpy()
        except (AttributeError, NotImplementedError, TypeError) as e:  # a symbolic tensor inside tf.function
            raise UnsupportedTypeError(f"a {type(x).__name__} without a value ({e})") from None
        except tf.errors.OpError as e:
            raise UnsupportedTypeError(f"a {type(x).__name__} whose value cannot be read ({e.message})") from None
        if not isinstance(arr, np.ndarray):  # 0-d tensors give NumPy scalars
            arr = np.asarray(arr)
        # An eager tensor's numpy() may alias the tensor's buffer; a snapshot must not.
        return np.array(arr, copy=True) if copy else arr

    def from_numpy(self, arr: np.ndarray, like: Any | None) -> Any:
        if isinstance(like, tf.Tensor | tf.Variable) and like.dtype in _NOT_NUMBERS:
            raise StructureMismatchError(
                f"`like` is a tf.{like.dtype.name} {type(like).__name__}, which cannot hold the checkpoint's "
                f"{arr.dtype} array"
            )
        if isinstance(like, tf.Variable):
            like.assign(arr.astype(like.dtype.as_numpy_dtype, copy=False))
            return like
        if isinstance(like, tf.Tensor):
            with tf.device(like.device):
                return tf.identity(tf.convert_to_tensor(arr, dtype=like.dtype))
        return tf.convert_to_tensor(arr)

    # --- objects: modules and random generators ---------------------------------------------------

    def object_state(self, x: Any) -> Any | None:
        if isinstance(x, tf.random.Generator):
            return {"algorithm": int(x.algorithm), "state": x.state}
        if isinstance(x, tf.Module) and not type(x).__module__.startswith("keras"):
            return variables_by_path(x.variables, lambda v: v.name)
        return None

    def restore_object(self, like: Any, saved: Any, template: Any, walk: Walk, where: str) -> Any:
        if isinstance(like, tf.random.Generator):
            if not isinstance(saved, dict) or saved.get("algorithm") != template["algorithm"]:
                raise StructureMismatchError(
                    f"{where}: the checkpoint holds no tf.random.Generator state of algorithm {template['algorithm']}"
                )
            walk(saved["state"], like.state, ("state",))  # assigns the state variable in place
            return like
        restore_in_order(like, saved, template, walk, where)
        return like


ADAPTER = TfAdapter()
