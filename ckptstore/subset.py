"""Restoring part of a checkpoint: ``restore(keys=["model"])``.

A key is a path of dict keys joined by '/' (``"model"``, ``"model/encoder"``, ``"opt/state"``), matched
from the root of the saved tree. The result keeps the tree's shape down to each key selected and holds the
selected subtrees whole; everything else is left out and its tensors are never read (on an object store:
their byte ranges are never requested).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .errors import StructureMismatchError, short_repr
from .skeleton import TensorRef, iter_refs, render_path


def _parse(keys: Sequence[str] | str) -> list[tuple[str, ...]]:
    if isinstance(keys, str):
        keys = [keys]
    elif isinstance(keys, bytes | bytearray) or not isinstance(keys, Iterable):
        raise StructureMismatchError(
            f"keys must be a string like 'model' or 'model/w', or a list of them; got a {type(keys).__name__} "
            f"({short_repr(keys)})"
        )
    out = []
    for k in keys:
        if not isinstance(k, str) or not k.strip("/"):
            raise StructureMismatchError(
                f"keys must be non-empty strings like 'model' or 'model/w', got {short_repr(k)}"
            )
        out.append(tuple(k.strip("/").split("/")))
    return out


def select(skeleton: Any, keys: Sequence[str] | str) -> Any:
    """The part of ``skeleton`` that ``keys`` select; StructureMismatchError names a key that is not there."""
    paths = _parse(keys)
    for p in paths:
        _check(skeleton, p)
    return _prune(skeleton, paths)


def _check(node: Any, path: tuple[str, ...]) -> None:
    for depth, part in enumerate(path):
        if type(node) is not dict:
            where = "/".join(path[:depth]) or "the root"
            raise StructureMismatchError(
                f"key {'/'.join(path)!r}: {where} is not a dict (keys select within dicts only)"
            )
        match = [k for k in node if str(k) == part]
        if not match:
            raise StructureMismatchError(
                f"key {'/'.join(path)!r}: the checkpoint has no {render_path(path[: depth + 1])}"
            )
        node = node[match[0]]


def _prune(node: Any, paths: list[tuple[str, ...]]) -> Any:
    if any(not p for p in paths):
        return node  # selected whole
    out = {}
    for k, v in node.items():
        below = [p[1:] for p in paths if p[0] == str(k)]
        if below:
            out[k] = _prune(v, below)
    return out


def tensor_indices(skeleton: Any) -> list[int]:
    """Indices of the stored tensors a (pruned) skeleton refers to (a sharded array's: its blocks')."""
    found: list[int] = []
    for ref in iter_refs(skeleton):
        if isinstance(ref, TensorRef):
            found.append(ref.index)
        else:
            found.extend(i for i, _ in ref.blocks)
    return found
