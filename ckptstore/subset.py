"""Restoring part of a checkpoint, ``restore(keys=["model"])``, and under other names,
``restore(key_map={"model": "net"})``.

A key is a path of dict keys joined by '/' (``"model"``, ``"model/encoder"``, ``"opt/state"``), matched
from the root of the saved tree. The result keeps the tree's shape down to each key selected and holds the
selected subtrees whole; everything else is left out and its tensors are never read (on an object store:
their byte ranges are never requested).

``key_map`` renames the checkpoint's key paths, in the same notation, before they are matched against
``like`` (see :func:`remap`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .errors import StructureMismatchError, short_repr
from .skeleton import KeyPath, Stateful, TensorRef, iter_refs, render_path

#: ``restore(key_map=...)``: {saved path prefix: new prefix or None}, or a function of a saved path that
#: gives its new path or None.
KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


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


# --- key_map ----------------------------------------------------------------------------------------


def remap(skeleton: Any, key_map: KeyMap) -> Any:
    """``skeleton`` with its key paths renamed by ``key_map``.

    Paths are the checkpoint's dict keys joined by '/' (``"model/fc.weight"``; a stateful object's state
    dict lies at the object's path), down to each value that is not a dict (an array, a list, a number;
    an empty dict). ``key_map`` is either

    - a dict ``{saved prefix: new prefix}``: a path equal to a prefix or under it (``"model"`` covers
      ``"model/fc.weight"``, not ``"model2"``) is renamed by the longest prefix that covers it; a new
      prefix of ``None`` drops what it covers, ``""`` lifts it to the root; or
    - a function ``f(saved_path) -> new_path | None`` (None drops the value).

    Segments a renaming leaves as they were, at the start and the end of a path, keep their saved keys
    (an int key stays an int, as in an optimizer's state); new segments are str. Dropped values' tensors
    are never read.

    Raises:
        StructureMismatchError: ``key_map`` is malformed, gives no path, or gives one path to two values
            (or a path under another value's).
    """
    rename = _mapper(key_map)
    if type(skeleton) is Stateful and type(skeleton.state) is dict:
        skeleton = skeleton.state
    if type(skeleton) is not dict or not skeleton:
        return skeleton  # nothing here has a key path
    out: dict[Any, Any] = {}
    leaves: dict[KeyPath, str] = {}  # new path -> the saved path that went there
    inner: dict[KeyPath, str] = {}  # paths of dicts made to hold the renamed values
    for path, node in _leaves(skeleton):
        old = "/".join(str(k) for k in path)
        try:
            new = rename(old)
        except Exception as e:
            raise StructureMismatchError(f"key_map({old!r}) raised {type(e).__name__}: {e}") from e
        if new is None:
            continue
        if not isinstance(new, str):
            raise StructureMismatchError(f"key_map gave {short_repr(new)} for {old!r}; a key path (str) or None")
        keys = path if new == old else _keys(path, old, new)
        taken = leaves.get(keys) or inner.get(keys)
        above = next((leaves[keys[:i]] for i in range(1, len(keys)) if keys[:i] in leaves), None)
        if taken is not None or above is not None:
            raise StructureMismatchError(
                f"key_map gives {old!r} the path {new!r}, which {taken or above!r} already takes (or lies above)"
            )
        d = out
        for i, k in enumerate(keys[:-1]):
            d = d.setdefault(k, {})
            inner.setdefault(keys[: i + 1], old)
        d[keys[-1]] = node
        leaves[keys] = old
    return out


def _mapper(key_map: KeyMap) -> Callable[[str], str | None]:
    if callable(key_map):
        return key_map
    if not isinstance(key_map, Mapping):
        raise StructureMismatchError(
            f"key_map must be a dict {{saved prefix: new prefix}} or a function of a key path, got a "
            f"{type(key_map).__name__} ({short_repr(key_map)})"
        )
    prefixes: dict[str, str | None] = {}
    for old, new in key_map.items():
        if not isinstance(old, str) or not old.strip("/") or not (new is None or isinstance(new, str)):
            raise StructureMismatchError(
                f"key_map entries must be 'saved/prefix': 'new/prefix' (or None), got {short_repr(old)}: "
                f"{short_repr(new)}"
            )
        prefixes[old.strip("/")] = None if new is None else new.strip("/")
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))

    def rename(path: str) -> str | None:
        for old, new in ordered:
            if path == old or path.startswith(old + "/"):
                if new is None:
                    return None
                rest = path[len(old) :]
                return new + rest if new else rest.lstrip("/")
        return path

    return rename


def _leaves(skeleton: dict[Any, Any]) -> list[tuple[KeyPath, Any]]:
    """``(path, node)`` of each value below dicts (and stateful objects' state dicts) that is not a
    non-empty dict, in order."""
    out: list[tuple[KeyPath, Any]] = []
    stack: list[tuple[KeyPath, Any]] = [((), skeleton)]
    while stack:
        path, node = stack.pop()
        if type(node) is Stateful and type(node.state) is dict:
            node = node.state  # restored as a state dict: into the object in `like`, or as a dict
        if type(node) is dict and node:
            stack.extend(reversed([((*path, k), v) for k, v in node.items()]))
        else:
            out.append((path, node))
    return out


def _keys(path: KeyPath, old: str, new: str) -> KeyPath:
    """The key tuple of ``new``, a renaming of ``old`` (the path ``path`` joined): segments unchanged at
    either end keep their saved keys."""
    was, now = old.split("/"), new.split("/")
    if not new or "" in now:
        raise StructureMismatchError(f"key_map gave {new!r} for {old!r}, which is no key path ('a/b')")
    if len(was) != len(path):  # a saved key holds a '/': only the unchanged ends can be kept
        return tuple(now)
    head = 0
    while head < min(len(was), len(now)) and was[head] == now[head]:
        head += 1
    tail = 0
    while tail < min(len(was), len(now)) - head and was[-1 - tail] == now[-1 - tail]:
        tail += 1
    middle = tuple(now[head : len(now) - tail])
    return (*path[:head], *middle, *(path[len(path) - tail :] if tail else ()))
