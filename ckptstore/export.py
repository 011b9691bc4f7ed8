"""Export a model from a checkpoint in the layout of the Hugging Face hub: ``model.safetensors``, or
shards ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``, which
``transformers``' ``from_pretrained`` loads given the model's config.

The tensors are those of one subtree of the saved state (``keys="model"``: a module's state dict, saved
as ``model.state_dict()`` or as the module itself), named as the model's own ``state_dict()`` names them:
the subtree's key in the state is not part of the names, nor are the prefixes that wrappers add to every
key (``_orig_mod.`` of ``torch.compile``, ``module.`` of DDP; the same rule as restoring into a module,
:mod:`ckptstore.frameworks.torch`). Nested dicts below the subtree are joined with ``.``, as a parent
module's state dict joins its children's.

Tensors are read one output file at a time through the store's subset restore (``restore(keys=...,
key_map=...)``: only that file's tensors are read; on local disk they are mapped, not copied), so memory
stays bounded by ``max_shard_size`` even for a store on an object store. Each file is written under a
temporary name, synced, then renamed; the index comes last. A failed export removes what it wrote.

Tied weights: a checkpoint holds each tensor of a state dict on its own, the tied ones too (GPT-2's
``lm_head.weight`` and ``transformer.wte.weight``), so nothing in the files shares memory and safetensors
takes them. ``from_pretrained`` loads such a file as it loads one without the tied copy (which
``save_pretrained`` leaves out): with ``tie_word_embeddings`` it ties them again, without it it needs both.
Pass ``exclude=["lm_head.weight"]`` for a file without the copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import dtypes, knobs, load
from .directory import restore as restore_directory
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
    StructureMismatchError,
    UnsupportedTypeError,
    short_repr,
)
from .frameworks._prefixes import wrapper_prefix
from .manifest import Manifest
from .progress import ProgressArg, scope
from .skeleton import KeyPath, ShardedRef, Stateful, TensorRef, render_path
from .storage import Storage, open_parent, step_name
from .store import CheckpointStore
from .subset import KeyMap, select

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "INDEX_NAME", "WEIGHTS_NAME", "export_hf"]

#: The single file's name, and the index's, as transformers names them.
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Tensor bytes per file before the export is sharded (a tensor larger than this gets a file of its own).
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor to export: where it lies in the saved tree, its exported name, dtype code and shape."""

    path: KeyPath
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.dtype_of(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class _File:
    """One output file: its name, its tensors in order, and its safetensors header (bytes)."""

    name: str
    tensors: tuple[_Tensor, ...]
    header: bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


#: ``read(key_map)``: the saved tree restored with only what ``key_map`` keeps.
_Read = Callable[[KeyMap], Any]


def export_hf(
    source: str | os.PathLike[str] | Storage | CheckpointStore,
    to: str | os.PathLike[str],
    *,
    step: int | None = None,
    keys: str | None = "model",
    exclude: Sequence[str] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: ProgressArg = None,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the tensors of subtree ``keys`` of a checkpoint into directory ``to`` as a Hugging Face model's
    weights (``model.safetensors``, metadata ``{"format": "pt"}``; sharded above ``max_shard_size``).

    Args:
        source: a store (path, URL, :class:`~ckptstore.storage.Storage` or :class:`CheckpointStore`), or
            the path or URL of one checkpoint directory (``ckptstore.save``; ``step`` must then be None).
        to: a local directory, created if needed; it must be empty (config and tokenizer files are added
            after the export: ``config.save_pretrained(to)``).
        step: the checkpoint (default: the latest committed).
        keys: the subtree holding the model's state dict: dict keys joined by '/' (``"model"``,
            ``"model/encoder"``); None for a state that is the state dict itself.
        exclude: exported names to leave out (``["lm_head.weight"]``: a tied copy, as ``save_pretrained``
            leaves it out).
        max_shard_size: tensor bytes per file: an int, or a size such as ``"5GB"`` or ``"500MiB"``.
        progress: ``True`` for a bar on stderr (a terminal only), a function ``(done_bytes, total_bytes)``,
            or a :class:`ckptstore.progress.Progress`; the total is the bytes of the safetensors files.
        verify: check each tensor's checksum as it is read.
        storage_options: fsspec options for a URL.

    Returns:
        The files written: the safetensors files in order, then the index if there is one.

    Raises:
        CheckpointNotFoundError: no such committed checkpoint.
        StructureMismatchError: ``keys`` selects nothing in the checkpoint, holds no tensor, or two of its
            tensors get one name; ``exclude`` names a tensor the export does not hold.
        UnsupportedTypeError: the subtree holds something else than tensors (a list, a number, a string)
            where a state dict holds tensors; the message names its key path.
        CheckpointExistsError: ``to`` exists and is not an empty directory.
        ConfigError: ``max_shard_size`` is no positive size.

    Example::

        export_hf("ckpts/run1", "export/gpt2", keys="model")
        config.save_pretrained("export/gpt2")
        model = AutoModelForCausalLM.from_pretrained("export/gpt2")
    """
    limit = parse_size(max_shard_size)
    target = Path(to)
    _check_target(target)
    with _open(source, step, keys, storage_options, verify) as (m, read):
        tensors = _select(m, keys, exclude)
        files = _plan(tensors, limit)
        with scope(progress, sum(f.size for f in files), desc="export") as shown:
            return _write(target, files, read, shown.advance)


def parse_size(size: int | str) -> int:
    """``max_shard_size`` as bytes: an int, or digits with a unit (``"5GB"``: 5 * 10**9, as the hub counts;
    ``"5GiB"``: 5 * 2**30).

    Raises:
        ConfigError: not a positive size.
    """
    value: float | None = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if match and match.group(2).upper() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value is None or not 1 <= value < math.inf:
        raise ConfigError(f"max_shard_size must be a positive number of bytes or a size like '5GB', got {size!r}")
    return int(value)


def _check_target(target: Path) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CheckpointExistsError(f"export target {target} exists and is not a directory")
        if any(target.iterdir()):
            raise CheckpointExistsError(
                f"export target {target} is not empty: export into a new or empty directory (nothing there is replaced)"
            )


@contextlib.contextmanager
def _open(
    source: str | os.PathLike[str] | Storage | CheckpointStore,
    step: int | None,
    keys: str | None,
    storage_options: dict[str, Any] | None,
    verify: bool,
) -> Iterator[tuple[Manifest, _Read]]:
    """The checkpoint's manifest and a reader of parts of it (the store's subset restore); a step of a
    store is pinned meanwhile, where this reader may write leases, so that retention keeps it."""
    if step is None and isinstance(source, str | os.PathLike):
        storage, name = open_parent(source, storage_options)
        if storage.is_committed(name):  # one checkpoint directory (ckptstore.save)
            url = storage.url_of(name)

            def read_directory(key_map: KeyMap) -> Any:
                return restore_directory(
                    url, storage_options=storage_options, keys=keys, key_map=key_map, mmap=True, verify=verify
                )

            yield load.read_manifest(storage, name), read_directory
            return
    store = source if isinstance(source, CheckpointStore) else CheckpointStore(source, storage_options=storage_options)
    if step is None:
        step = store.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {store.url}")
    chosen = step

    def read_step(key_map: KeyMap) -> Any:
        return store.restore(chosen, keys=keys, key_map=key_map, mmap=True, verify=verify)

    with _pinned(store, chosen):
        try:
            m = load.read_manifest(store.storage, step_name(chosen))
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint of step {chosen} in {store.url}") from None
        yield m, read_step


@contextlib.contextmanager
def _pinned(store: CheckpointStore, step: int) -> Iterator[None]:
    try:
        lease = store.pin(step)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint of step {step} in {store.url}") from None
    except StorageError:  # a reader without write access to the store reads unpinned
        yield
        return
    with lease:
        yield


# --- what is exported, under which names ----------------------------------------------------------


def _select(m: Manifest, keys: str | None, exclude: Sequence[str]) -> list[_Tensor]:
    """The tensors of subtree ``keys``, in the saved order, with their exported names."""
    if keys is not None and not isinstance(keys, str):
        raise StructureMismatchError(f"keys must be one key path like 'model' (or None), got {short_repr(keys)}")
    if isinstance(exclude, str):
        exclude = [exclude]
    prefix: KeyPath = ()
    node = m.tree
    if keys is not None:
        node = select(node, keys)  # raises for a key that is not there
        for part in keys.strip("/").split("/"):
            key = next(k for k in node if str(k) == part)
            prefix, node = (*prefix, key), node[key]
    found = _tensors(m, node, prefix)
    where = f"keys {keys!r}" if keys is not None else "the checkpoint"
    if not found:
        raise StructureMismatchError(f"{where} holds no tensor: nothing to export")
    names = [".".join(str(k) for k in path[len(prefix) :]) for path, _, _ in found]

    strip = len(wrapper_prefix(names))
    out: list[_Tensor] = []
    seen: dict[str, KeyPath] = {}
    for (path, dtype, shape), full in zip(found, names):
        name = full[strip:]
        if name in seen:
            raise StructureMismatchError(
                f"{render_path(seen[name])} and {render_path(path)} would both be exported as {name!r}"
            )
        seen[name] = path
        out.append(_Tensor(path, name, dtype, shape))
    unknown = [n for n in exclude if n not in seen]
    if unknown:
        raise StructureMismatchError(
            f"exclude names {unknown}, which {where} does not hold (its names: {', '.join(list(seen)[:5])}, ...)"
        )
    kept = [t for t in out if t.name not in set(exclude)]
    if not kept:
        raise StructureMismatchError(f"exclude leaves nothing of {where} to export")
    return kept


def _tensors(m: Manifest, node: Any, prefix: KeyPath) -> list[tuple[KeyPath, str, tuple[int, ...]]]:
    """``(key path, dtype code, shape)`` of each tensor below ``node`` (at ``prefix``), in order. Dicts and
    objects saved as their state dict are walked; anything else that is not a tensor is an error."""
    out: list[tuple[KeyPath, str, tuple[int, ...]]] = []
    stack: list[tuple[KeyPath, Any]] = [(prefix, node)]
    while stack:
        path, x = stack.pop()
        if type(x) is Stateful:
            x = x.state  # a module saved as itself: its state dict lies at its own path
        if type(x) is dict:
            for k in x:
                if type(k) not in (str, int):
                    raise UnsupportedTypeError(f"{render_path(path)} has the key {short_repr(k)}: names are str")
            stack.extend(reversed([((*path, k), v) for k, v in x.items()]))
        elif type(x) is TensorRef:
            e = m.tensors[x.index]
            out.append((path, e.dtype, tuple(e.shape)))
        elif type(x) is ShardedRef:
            out.append((path, x.dtype, tuple(x.global_shape)))
        else:
            raise UnsupportedTypeError(
                f"{render_path(path)} is not a tensor ({_kind(x)}): a Hugging Face export holds tensors only "
                "(keys= must select a subtree holding the model's state dict)"
            )
    return out


def _kind(x: Any) -> str:
    if type(x) in (list, tuple, dict):
        return f"a {type(x).__name__}"
    if type(x).__module__ == "ckptstore.skeleton":  # Scalar (a NumPy scalar), NamedTuple
        return type(x).__name__
    return f"{type(x).__name__}: {short_repr(x)}"


# --- the files ------------------------------------------------------------------------------------


def _plan(tensors: list[_Tensor], limit: int) -> list[_File]:
    """Tensors in order into files of at most ``limit`` tensor bytes (a larger tensor gets its own),
    named as transformers names them."""
    groups: list[list[_Tensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > limit and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [_File(name, tuple(g), _header(g)) for name, g in zip(names, groups)]


def _header(tensors: Sequence[_Tensor]) -> bytes:
    """The safetensors header of a file holding ``tensors`` back to back, metadata ``{"format": "pt"}``
    (transformers refuses a file without it), padded with spaces to a multiple of 8 bytes."""
    doc: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write(target: Path, files: list[_File], read: _Read, advance: Callable[[int], None]) -> list[Path]:
    """Write each file (read, then written under a temporary name, synced, renamed), then the index; on
    failure remove what this export wrote (and ``target`` if it created it)."""
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for f in files:
            tree = read(_only({"/".join(map(str, t.path)) for t in f.tensors}))
            arrays = [_at(tree, t) for t in f.tensors]
            del tree
            written.append(_publish(target, f.name, functools.partial(_fill, f=f, arrays=arrays, advance=advance)))
            del arrays  # a mapped file is let go before the next is read
        if len(files) > 1:
            index = _index(files)
            written.append(_publish(target, INDEX_NAME, lambda out: out.write(index)))
        _sync_dir(target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()
        raise
    return written


def _only(wanted: set[str]) -> Callable[[str], str | None]:
    """A ``key_map`` that keeps the key paths ``wanted`` (as they are) and drops the rest: a restore
    through it reads only those tensors."""

    def keep(path: str) -> str | None:
        return path if path in wanted else None

    return keep


def _at(tree: Any, t: _Tensor) -> np.ndarray:
    node = tree
    for k in t.path:
        node = node[k]
    arr = np.asarray(node)
    if arr.dtype != dtypes.dtype_of(t.dtype) or arr.shape != t.shape:  # the manifest promised otherwise
        raise StructureMismatchError(
            f"{render_path(t.path)} was restored as {arr.dtype} {list(arr.shape)}, the manifest says "
            f"{t.dtype} {list(t.shape)}"
        )
    return arr


def _fill(out: BinaryIO, f: _File, arrays: list[np.ndarray], advance: Callable[[int], None]) -> None:
    out.write(f.header)
    advance(len(f.header))
    chunk = knobs.current.chunk_bytes
    for arr in arrays:
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            out.write(piece)
            advance(len(piece))


def _index(files: list[_File]) -> bytes:
    """``model.safetensors.index.json`` as transformers writes it (sorted keys, two-space indent)."""
    tensors = [t for f in files for t in f.tensors]
    doc = {
        "metadata": {
            "total_parameters": sum(math.prod(t.shape) for t in tensors),
            "total_size": sum(t.nbytes for t in tensors),
        },
        "weight_map": {t.name: f.name for f in files for t in f.tensors},
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _publish(target: Path, name: str, fill: Callable[[BinaryIO], object]) -> Path:
    """Write ``name`` in ``target`` through ``fill``: under a temporary name, synced, then renamed."""
    final = target / name
    partial = target / f".{name}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "xb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
