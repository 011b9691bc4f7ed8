"""PyTorch Lightning: :class:`CkptStoreCheckpointIO`, a ``CheckpointIO`` plugin that writes ckptstore checkpoints.

``Trainer(plugins=[CkptStoreCheckpointIO()])`` makes everything Lightning saves through its checkpoint plugin
(``ModelCheckpoint``: top-k, ``save_last``, ``every_n_*``; ``trainer.save_checkpoint``) a ckptstore
checkpoint, and ``trainer.fit(ckpt_path=...)`` resume from one (docs/integrations.md).

**One Lightning path, one checkpoint directory.** The path Lightning names (``ckpts/epoch=1-step=20.ckpt``)
becomes a ckptstore checkpoint directory, written by ``ckptstore.save``: on local disk it appears at once,
complete (written in a hidden temp directory, renamed into place), so whatever Lightning finds at one of its
paths is a whole checkpoint. Lightning's own file naming, its existence checks (``fs.exists`` sees the
directory), top-k bookkeeping and ``last.ckpt`` (saved again, or ``save_last="link"``: a symlink to the
directory) work unchanged. Not a ``CheckpointStore`` in each path: a store's root would exist before its
first commit, and Lightning would take an empty one for a checkpoint. The checkpoint's metadata holds
``step`` (Lightning's ``global_step``) and ``epoch``; ``ckptstore.restore(path)`` reads it without Lightning.

Importing this module imports Lightning (``import ckptstore`` never does). It works with the ``lightning``
package (``lightning.pytorch``) and with ``pytorch_lightning``: the class is registered as a
``CheckpointIO`` of both, where installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import directory, leases, load, tree
from ..errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsupportedTypeError
from ..storage import Storage, new_token, open_parent, open_storage, url_to_fs

if TYPE_CHECKING or importlib.util.find_spec("lightning") is not None:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
else:  # only pytorch_lightning (and lightning_fabric) installed
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

__all__ = ["CkptStoreCheckpointIO", "latest_checkpoint", "load_from_checkpoint"]

log = logging.getLogger(__name__)

#: Where the torch version metadata of the model's state dict (``state_dict._metadata``: each submodule's
#: ``{"version": n}``, which ``load_state_dict`` hands to modules that convert older layouts) is kept in the
#: stored tree; taken out again when loaded.
STATE_DICT_METADATA_KEY = "__ckptstore_state_dict_metadata__"

#: The checkpoint entries that hold hyper-parameters (a LightningModule's, a LightningDataModule's).
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


class CkptStoreCheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin for ckptstore: ``Trainer(plugins=[CkptStoreCheckpointIO()])``.

    Each checkpoint Lightning saves is a ckptstore checkpoint directory at Lightning's own path (see the
    module docstring): safetensors and a msgpack manifest, nothing pickled, written atomically. Wrap it in
    ``AsyncCheckpointIO(CkptStoreCheckpointIO())`` to save on a background thread.

    Args:
        storage_options: fsspec options for remote paths (``endpoint_url``, credentials, ...); those given
            to ``trainer.save_checkpoint(..., storage_options=...)`` are added to them for that save.
        verify: check every tensor's checksum when a checkpoint is loaded (as ``ckptstore.restore``).
        hparams: what to do with a hyper-parameter (an entry of ``hyper_parameters`` or
            ``datamodule_hyper_parameters``) that ckptstore cannot store without pickle (a ``Path``, a
            ``torch.dtype``, a module, any object): ``"raise"`` (default) raises ``UnsupportedTypeError``
            naming its key path, and nothing is written; ``"str"`` stores ``str(value)`` instead, with a
            warning naming the key (``load_from_checkpoint`` then passes the string to ``__init__``).

    ``remove_checkpoint`` honours readers' pins (``ckptstore.pin(path)``): a pinned checkpoint is deleted
    once unpinned, at a later save or at the end of the run (a warning names one still pinned then).

    Under the DDP strategy Lightning calls the plugin on global rank 0 alone (every rank loads), so a
    checkpoint is written by one process. FSDP and DeepSpeed do not save or load through a CheckpointIO
    (docs/integrations.md).
    """

    def __init__(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        hparams: Literal["raise", "str"] = "raise",
    ) -> None:
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(f"storage_options must be a dict or None, got {storage_options!r}")
        if hparams not in ("raise", "str"):
            raise ConfigError(f"hparams must be 'raise' or 'str', got {hparams!r}")
        if not isinstance(verify, bool):
            raise ConfigError(f"verify must be a bool, got {verify!r}")
        self.storage_options = storage_options
        self.verify = verify
        self.hparams = hparams
        self._lock = threading.Lock()
        # Saves running now (AsyncCheckpointIO runs them on its thread), by path: a removal of one waits.
        self._saving: dict[str, threading.Event] = {}
        # Removals a reader's pin held back, retried after each save and at teardown.
        self._deferred: set[str] = set()

    def __repr__(self) -> str:
        return f"CkptStoreCheckpointIO(verify={self.verify}, hparams={self.hparams!r})"

    # --- CheckpointIO ----------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as a ckptstore checkpoint directory at ``path``, atomically,
        replacing the checkpoint there (Lightning saves ``last.ckpt`` again and again).

        Raises:
            UnsupportedTypeError: an entry cannot be stored without pickle; the message names its key path
                (``checkpoint['hyper_parameters']['data_dir']``). Nothing is written.
            CheckpointExistsError: something that is not a ckptstore checkpoint lies at ``path`` (a torch
                ``.ckpt`` file of an earlier run): it is not replaced.
            ConfigError: ``storage_options`` is not a dict.
        """
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(
                f"CkptStoreCheckpointIO: storage_options must be a dict of fsspec options, got {storage_options!r}"
            )
        options = {**(self.storage_options or {}), **(storage_options or {})} or None
        state = self._storable(checkpoint)
        metadata: dict[str, Any] = {}
        for entry, name in (("global_step", "step"), ("epoch", "epoch")):
            value = checkpoint.get(entry)
            if type(value) is int and 0 <= value < 1 << 63:  # (absent from a bare state dict, Fabric's saves)
                metadata[name] = value
        key = _key(path)
        done = threading.Event()
        with self._lock:
            self._saving[key] = done
        try:
            try:
                directory.save(path, state, metadata=metadata, storage_options=options, overwrite=True)
            except UnsupportedTypeError as e:
                raise UnsupportedTypeError(_unsupported_message(path, e)) from None
            storage, _ = open_parent(path, options)
            if storage.supports_mmap:  # local disk: the temp directory of a save killed here is removed
                with storage.lock():
                    storage.clean_leftovers()
        finally:
            with self._lock:
                if self._saving.get(key) is done:
                    del self._saving[key]
            done.set()
        self._retry_deferred()

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint dict saved at ``path`` (its tensors on the CPU, or on ``map_location``).

        ``weights_only`` is accepted and has nothing to restrict: nothing is unpickled.

        Args:
            path: a checkpoint directory this plugin saved (or a symlink to one: ``save_last="link"``).
            map_location: None (the CPU: Lightning moves the state to the model's device as it restores
                it), or a device (``"cuda:0"``, ``torch.device``) every tensor is moved to. A dict or a
                function (``torch.load``'s storage remapping) raises ConfigError: the checkpoint does not
                record where its tensors were.

        Raises:
            CheckpointNotFoundError: no ckptstore checkpoint at ``path`` (a torch ``.ckpt`` file says so).
            CorruptCheckpointError: the checkpoint is damaged (a checksum fails, a file is truncated).
        """
        device = _device(map_location)
        try:
            restored = directory.restore(
                path, framework="torch", storage_options=self.storage_options, verify=self.verify
            )
        except (CheckpointNotFoundError, CorruptCheckpointError):  # (local disk: "manifest.msgpack: not a directory")
            if _is_file(path, self.storage_options):
                raise CheckpointNotFoundError(
                    f"{path} is a file, not a ckptstore checkpoint directory: a checkpoint saved by Lightning's "
                    "own TorchCheckpointIO (load it without CkptStoreCheckpointIO)"
                ) from None
            raise
        if not isinstance(restored, dict):
            raise CorruptCheckpointError(f"{path} holds a {type(restored).__name__}, not a Lightning checkpoint dict")
        checkpoint = _as_lightning(restored)
        if device is not None:
            checkpoint = _to_device(checkpoint, device)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` through ckptstore: gone at once (renamed away, then removed),
        unless a reader pins it (``ckptstore.pin``), in which case it is deleted once unpinned (retried after
        each later save and at teardown). A save of ``path`` running on another thread (``AsyncCheckpointIO``)
        is waited for first; one still queued there is not known to this plugin yet, so its removal finds
        nothing and the checkpoint stays (as with Lightning's TorchCheckpointIO). A symlink
        (``save_last="link"``) is removed, not what it points to; nothing at ``path`` is nothing to do;
        anything there that is not a ckptstore checkpoint is left alone, with a warning."""
        key = _key(path)
        with self._lock:
            running = self._saving.get(key)
        if running is not None:
            running.wait()
        if not self._remove(path):
            with self._lock:
                self._deferred.add(os.fspath(path))
            log.info("kept %s for now: a reader pins it (it is deleted once unpinned)", path)

    def teardown(self) -> None:
        """The end of a run: deletions held back by pins are tried once more; a warning names those still
        pinned (left in place)."""
        self._retry_deferred()
        with self._lock:
            left = sorted(self._deferred)
        if left:
            warnings.warn(
                f"CkptStoreCheckpointIO: {len(left)} checkpoint(s) that ModelCheckpoint removed are still pinned "
                f"by readers and were left in place: {', '.join(left)}",
                stacklevel=2,
            )

    # --- helpers ---------------------------------------------------------------------------------------

    def _storable(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The tree to store: Lightning's dict as it is (never changed), plus the model state dict's version
        metadata, and (``hparams="str"``) hyper-parameters ckptstore cannot store as strings."""
        if not isinstance(checkpoint, Mapping):
            raise UnsupportedTypeError(f"a Lightning checkpoint is a dict, got a {type(checkpoint).__name__}")
        state = dict(checkpoint)
        if STATE_DICT_METADATA_KEY in state:
            raise ConfigError(f"the checkpoint dict holds {STATE_DICT_METADATA_KEY!r}, a key ckptstore reserves")
        metadata = getattr(state.get("state_dict"), "_metadata", None)
        if isinstance(metadata, Mapping):
            state[STATE_DICT_METADATA_KEY] = {str(k): dict(v) for k, v in metadata.items() if isinstance(v, Mapping)}
        if self.hparams == "str":
            for key in HPARAMS_KEYS:
                if isinstance(state.get(key), Mapping):
                    state[key] = _stringify_unstorable(state[key], key)
        return state

    def _remove(self, path: Any) -> bool:
        """Delete the checkpoint at ``path`` unless pinned; True when nothing is left to do."""
        storage, name = open_parent(path, self.storage_options)
        if not (storage.is_committed(name) or _is_link(path)):
            if storage.is_occupied(name):
                log.warning("%s is not a ckptstore checkpoint; not removing it", path)
            return True
        return _delete_unless_pinned(storage, name)

    def _retry_deferred(self) -> None:
        with self._lock:
            deferred = sorted(self._deferred)
        for path in deferred:
            try:
                removed = self._remove(path)
            except Exception as e:  # tried again later; never fails the save that triggered it
                log.warning("could not remove %s (tried again later): %s", path, e)
                continue
            if removed:
                with self._lock:
                    self._deferred.discard(path)


def _delete_unless_pinned(storage: Storage, name: str) -> bool:
    """Delete checkpoint ``name`` of ``storage`` unless a reader pins it; True if deleted. The deleting side
    of ckptstore's lease protocol (:mod:`ckptstore.leases`): a deletion mark is written before the leases
    are looked at, and a reader writes its lease before it looks for marks, so never both go ahead."""
    files = leases.LeaseDir(storage)
    mark = f"{name}.{new_token()}.{leases.MARK}"
    with storage.lock():
        files.put(mark)
        try:
            if name in leases.live_pins(files.names(), time.time()):
                return False
            storage.delete(name)
            return True
        finally:
            files.remove(mark)


def _key(path: Any) -> str:
    """``path`` as one string per checkpoint (local paths made absolute), for matching saves and removals."""
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(text)


def _is_link(path: Any) -> bool:
    text = os.fspath(path)
    return "://" not in text and os.path.islink(text)


def _is_file(path: Any, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``path`` is a file (a torch checkpoint, say); False where that cannot be told."""
    text = os.fspath(path)
    if "://" not in text:
        return os.path.isfile(text)
    with contextlib.suppress(Exception):
        fs, inner = url_to_fs(text, storage_options)
        return bool(fs.isfile(inner))
    return False


def _unsupported_message(path: Any, e: UnsupportedTypeError) -> str:
    """ckptstore's message (which names the key path), as a Lightning user reads it."""
    text = str(e)
    if text.startswith("state["):
        text = "checkpoint" + text.removeprefix("state")
    hint = ""
    if any(f"['{key}']" in text for key in HPARAMS_KEYS):
        hint = (
            "; a hyper-parameter must be a plain value (str, int, float, bool, None, or lists, tuples and dicts "
            "of them, or a tensor): leave it out (self.save_hyperparameters(ignore=[...])), pass a plain value, "
            "or let the plugin store it as a string (CkptStoreCheckpointIO(hparams='str'))"
        )
    elif "['hparams_type']" in text or "['datamodule_hparams_type']" in text:
        hint = "; hyper-parameters given as an omegaconf container are not supported: pass a dict"
    return f"cannot save the Lightning checkpoint {os.fspath(path)}: {text}{hint}"


def _stringify_unstorable(hparams: Mapping[Any, Any], key: str) -> dict[Any, Any]:
    """``hparams`` with each value ckptstore cannot store replaced by ``str(value)`` (a warning names them)."""
    out = dict(hparams)
    converted = []
    for name, value in hparams.items():
        try:
            tree.flatten(value)
        except UnsupportedTypeError:
            out[name] = str(value)
            converted.append(f"{name} ({type(value).__name__})")
    if converted:
        warnings.warn(
            f"CkptStoreCheckpointIO(hparams='str'): stored checkpoint[{key!r}] entries as strings: "
            + ", ".join(converted),
            stacklevel=4,
        )
    return out


def _as_lightning(restored: dict[str, Any]) -> dict[str, Any]:
    """The restored tree as Lightning's dict: the model's state dict an OrderedDict with its metadata back."""
    checkpoint = dict(restored)
    metadata = checkpoint.pop(STATE_DICT_METADATA_KEY, None)
    state_dict = checkpoint.get("state_dict")
    if isinstance(state_dict, dict):
        ordered: Any = OrderedDict(state_dict)
        if isinstance(metadata, dict):
            ordered._metadata = OrderedDict(metadata)
        checkpoint["state_dict"] = ordered
    return checkpoint


def _device(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    raise ConfigError(
        f"CkptStoreCheckpointIO loads tensors onto the CPU, or onto one device given as map_location (a str or "
        f"torch.device); got {map_location!r} (a dict or function remaps torch.load's storages, which a ckptstore "
        "checkpoint does not have)"
    )


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, OrderedDict):
        moved: Any = OrderedDict((k, _to_device(v, device)) for k, v in x.items())
        if hasattr(x, "_metadata"):
            moved._metadata = x._metadata
        return moved
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_to_device(v, device) for v in x)
    return x


# --- without a Trainer ------------------------------------------------------------------------------------


def load_from_checkpoint(
    cls: type[Any],
    checkpoint_path: str | os.PathLike[str],
    *,
    map_location: Any | None = None,
    hparams_file: str | os.PathLike[str] | None = None,
    strict: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a checkpoint :class:`CkptStoreCheckpointIO`
    saved. Lightning's own classmethod reads the path with ``torch.load`` (a checkpoint directory fails with
    ``IsADirectoryError``); this does what it does, reading through ckptstore.

    ``cls`` is a LightningModule or LightningDataModule class (of ``lightning.pytorch`` or
    ``pytorch_lightning``). Its saved hyper-parameters, updated by ``kwargs`` (and replaced by
    ``hparams_file``), are passed to ``cls(...)``; a module then gets ``on_load_checkpoint`` and the state
    dict (``strict`` as Lightning's), and is moved to ``map_location`` (default: the CPU), a datamodule its
    ``load_state_dict``. Mirrors ``lightning.pytorch.core.saving._load_from_checkpoint`` (Lightning 2.x),
    whose ``_load_state`` it calls.

    Example::

        model = load_from_checkpoint(MyModule, "ckpts/last.ckpt")

    Raises:
        CheckpointNotFoundError: no ckptstore checkpoint at ``checkpoint_path``.
        ConfigError: ``cls`` is not a LightningModule or LightningDataModule class.
    """
    package = _lightning_package(cls)
    saving = importlib.import_module(f"{package}.core.saving")
    migration = importlib.import_module(f"{package}.utilities.migration.utils")
    pl = importlib.import_module(package)
    io = CkptStoreCheckpointIO(storage_options=storage_options)
    checkpoint = io.load_checkpoint(checkpoint_path, map_location=map_location)
    checkpoint = migration._pl_migrate_checkpoint(checkpoint, checkpoint_path=os.fspath(checkpoint_path))
    if hparams_file is not None:
        extension = os.fspath(hparams_file).rsplit(".", 1)[-1].lower()
        if extension == "csv":
            checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = saving.load_hparams_from_tags_csv(hparams_file)
        elif extension in ("yml", "yaml"):
            checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = saving.load_hparams_from_yaml(hparams_file)
        else:
            raise ConfigError(f"hparams_file must be a .csv, .yml or .yaml file, got {hparams_file}")
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return saving._load_state(cls, checkpoint, **kwargs)
    model = saving._load_state(cls, checkpoint, strict=strict, **kwargs)
    return model.to(_device(map_location) or torch.device("cpu"))


def _lightning_package(cls: Any) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package whose LightningModule (or
    LightningDataModule) ``cls`` derives from."""
    for base in getattr(cls, "__mro__", ()):
        if base.__name__ in ("LightningModule", "LightningDataModule"):
            module = base.__module__
            if module.startswith("lightning.pytorch."):
                return "lightning.pytorch"
            if module.startswith("pytorch_lightning."):
                return "pytorch_lightning"
    raise ConfigError(f"load_from_checkpoint needs a LightningModule or LightningDataModule class, got {cls!r}")


def latest_checkpoint(dirpath: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> str | None:
    """The path of the checkpoint in ``dirpath`` (a ``ModelCheckpoint``'s directory) with the highest
    ``global_step`` (of those, the newest), or None if it holds none: ``trainer.fit(ckpt_path=...)`` resumes
    from it without ``save_last``. Only committed ckptstore checkpoints count (entries whose name starts with
    ``.`` are skipped); one whose manifest cannot be read is skipped with a warning."""
    storage = open_storage(dirpath, storage_options)
    best: tuple[int, float, str] | None = None
    for name in sorted(_entries(storage)):
        if not storage.is_committed(name):
            continue  # a file, a directory of something else, a save in progress
        try:
            m = load.read_manifest(storage, name)
        except CheckpointNotFoundError:
            continue  # deleted meanwhile
        except CorruptCheckpointError as e:
            log.warning("latest_checkpoint: skipped %s: %s", storage.url_of(name), e)
            continue
        candidate = (m.step, m.created, _join(dirpath, name))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return None if best is None else best[2]


def _join(dirpath: str | os.PathLike[str], name: str) -> str:
    """``name`` in ``dirpath``, spelt as the caller spelt ``dirpath`` (a URL stays the URL given)."""
    text = os.fspath(dirpath)
    return f"{text.rstrip('/')}/{name}" if "://" in text else os.path.join(text, name)


def _entries(storage: Storage) -> Iterator[str]:
    for name in storage.listdir(""):
        if not name.startswith("."):
            yield name


def _register_as_checkpoint_io_of_both_packages() -> None:
    """Make ``isinstance(plugin, CheckpointIO)`` true for ``pytorch_lightning``'s Trainer as well as for
    ``lightning``'s: the two packages define the same ABC twice. Registration is all it takes (the Trainer
    only checks the type, then calls the methods)."""
    for module in ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io"):
        if importlib.util.find_spec(module.split(".", 1)[0]) is None:
            continue
        base = importlib.import_module(module).CheckpointIO
        if not issubclass(CkptStoreCheckpointIO, base):
            base.register(CkptStoreCheckpointIO)


_register_as_checkpoint_io_of_both_packages()
