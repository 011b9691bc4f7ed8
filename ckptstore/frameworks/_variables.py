"""Objects saved as their variables (Keras layers and optimizers, ``tf.Module``), matched by order.

Saved as a dict from each variable's path to its value, in the object's own variable order: the paths
are for people reading the manifest. Restoring matches by position, not by path, because a model rebuilt
in the same process gets new names (Keras turns ``dense`` into ``dense_2`` and ``adam`` into ``adam_1``);
the count and every shape must agree. Imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..errors import StructureMismatchError
from . import Walk


def variables_by_path(variables: Iterable[Any], path_of: Callable[[Any], str]) -> dict[str, Any]:
    """``{path: variable}`` in order; a repeated path gets ``#2``, ``#3``... so no variable is lost."""
    out: dict[str, Any] = {}
    for v in variables:
        base = str(path_of(v))
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}#{n}"
        out[name] = v
    return out


def restore_in_order(like: Any, saved: Any, template: dict[str, Any], walk: Walk, where: str) -> None:
    """Assign the saved values to ``like``'s variables (``template``, from :func:`variables_by_path`) by
    position. Raises StructureMismatchError naming ``where`` and both variable lists when counts differ."""
    what = type(like).__qualname__
    if not isinstance(saved, dict):
        raise StructureMismatchError(f"{where}: the checkpoint holds no variables of a {what} here")
    if len(saved) != len(template):
        raise StructureMismatchError(
            f"{where}: the checkpoint holds {len(saved)} variables, `like` (a {what}) has {len(template)}; "
            f"saved: {_short(saved)}; like: {_short(template)}"
        )
    for (saved_path, node), variable in zip(saved.items(), template.values()):
        walk(node, variable, (saved_path,))


def _short(paths: dict[str, Any], limit: int = 8) -> str:
    names = list(paths)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
