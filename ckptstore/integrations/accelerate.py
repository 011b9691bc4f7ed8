"""Hugging Face Accelerate: :func:`save_state` / :func:`load_state`, ``accelerator.save_state`` /
``load_state`` through a CheckpointStore, and :func:`skip_first_batches` for resuming inside an epoch.

One checkpoint holds what ``accelerator.save_state`` writes (the prepared models, optimizers, schedulers,
the gradient scaler, the objects registered with ``accelerator.register_for_checkpointing``, the global
random generators, ``accelerator.step``) and each prepared dataloader's epoch counter and seed: a rerun
of the same script continues bit for bit (docs/integrations.md). Accelerate's save-state hooks
(``register_save_state_pre_hook``) only customise how model weights are written into a local folder, so
this is a pair of functions instead.

They read the accelerator's registries (``_models``, ``_optimizers``, ``_schedulers``, ``_dataloaders``,
``_custom_objects``, which Accelerate's own ``save_state`` reads: there is no public accessor), written
against accelerate 1.15; a version without them gets ``ConfigError`` naming it. Importing this module
imports accelerate and torch (``import ckptstore`` never does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import accelerate
import torch
from accelerate.data_loader import SeedableRandomSampler, get_sampler

from ..asyncsave import SaveHandle
from ..errors import ConfigError
from ..rng import RNGState
from ..storage import Storage
from ..store import CheckpointInfo, CheckpointStore

__all__ = ["load_state", "save_state", "skip_first_batches"]

#: The attributes of ``accelerate.Accelerator`` these functions read: the objects ``prepare`` and
#: ``register_for_checkpointing`` registered, as Accelerate's own ``save_state`` reads them.
REGISTRIES = ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects")


def _check(accelerator: Any) -> None:
    """ConfigError unless ``accelerator`` is one process with the registries this module reads."""
    missing = [name for name in (*REGISTRIES, "step", "scaler") if not hasattr(accelerator, name)]
    if missing:
        raise ConfigError(
            f"ckptstore.integrations.accelerate does not support accelerate {accelerate.__version__} (written "
            f"against 1.15): the Accelerator has no {missing}; use accelerator.save_state / load_state"
        )
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"ckptstore.integrations.accelerate supports one process; this accelerator has "
            f"{accelerator.num_processes}: use accelerator.save_state / load_state"
        )
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA"):
        raise ConfigError(f"ckptstore.integrations.accelerate does not support {kind}")


#: Set on the dataloader :func:`skip_first_batches` iterates: the prepared dataloader it stands for.
_SOURCE = "_ckptstore_skipped_from"


class _LoaderPosition:
    """A prepared dataloader's epoch counter (its ``iteration``, from which its ``set_epoch`` and a
    seedable sampler's order follow), the seed of a seedable sampler (``torch.initial_seed()`` of the
    process that built it, unless ``data_seed`` was given), and a stateful dataloader's own state.

    The counter saved is the pass the next batch belongs to: a dataloader (or the one
    :func:`skip_first_batches` iterates for it) that has just yielded the last batch of its pass counts
    the pass as done, although it increments its ``iteration`` only once the loop asks for more."""

    def __init__(self, accelerator: Any, loader: Any) -> None:
        self.accelerator, self.loader = accelerator, loader

    def _iteration(self) -> int:
        loader = self.loader
        references = getattr(self.accelerator.gradient_state, "dataloader_references", [])
        active = [r for r in references if r is not None and (r is loader or getattr(r, _SOURCE, None) is loader)]
        if not active:
            return int(getattr(loader, "iteration", 0))
        current = active[-1]
        return int(current.iteration) + (1 if getattr(current, "end_of_dataloader", False) else 0)

    def state_dict(self) -> dict[str, Any]:
        loader = self.loader
        state: dict[str, Any] = {"iteration": self._iteration()}
        sampler = get_sampler(loader)
        if isinstance(sampler, SeedableRandomSampler):
            state["initial_seed"] = int(sampler.initial_seed)
        if getattr(loader, "use_stateful_dataloader", False):
            state["loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader = self.loader
        sampler = get_sampler(loader)
        if "initial_seed" in state and isinstance(sampler, SeedableRandomSampler):
            sampler.initial_seed = int(state["initial_seed"])
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(int(state["iteration"]))
        if "loader" in state:
            loader.load_state_dict(state["loader"])


class _Gradients:
    """A model's accumulated gradients (``param.grad``, by parameter name; parameters without one are left
    out): a checkpoint saved inside a gradient-accumulation cycle resumes it with what it had accumulated."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {name: p.grad for name, p in self.model.named_parameters() if p.grad is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, p in self.model.named_parameters():
            grad = state.get(name)
            p.grad = None if grad is None else torch.as_tensor(grad).to(device=p.device, dtype=p.dtype, copy=True)


def _state(accelerator: Any, rng: Any) -> dict[str, Any]:
    """The checkpoint's tree: the accelerator's objects themselves (saved through ``state_dict()`` and
    restored in place through ``load_state_dict()``)."""
    models = [accelerator.unwrap_model(m) for m in accelerator._models]
    return {
        "models": models,
        "gradients": [_Gradients(m) for m in models],
        "optimizers": list(accelerator._optimizers),
        "schedulers": list(accelerator._schedulers),
        "dataloaders": [_LoaderPosition(accelerator, dl) for dl in accelerator._dataloaders],
        "scaler": accelerator.scaler,
        "custom_objects": list(accelerator._custom_objects),
        "rng": rng,
        "accelerator": {"step": int(accelerator.step)},
    }


def _open(url_or_store: str | os.PathLike[str] | Storage | CheckpointStore, storage_options: Any) -> CheckpointStore:
    if isinstance(url_or_store, CheckpointStore):
        if storage_options is not None:
            raise ConfigError("got a CheckpointStore and storage_options: open the store with them")
        return url_or_store
    return CheckpointStore(url_or_store, storage_options=storage_options)


def save_state(
    accelerator: Any,
    url_or_store: str | os.PathLike[str] | Storage | CheckpointStore,
    step: int,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = True,
    blocking: bool = True,
) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
    """``accelerator.save_state``, as checkpoint ``step`` of a :class:`~ckptstore.CheckpointStore`.

    Saves the prepared models (unwrapped) and their accumulated gradients (where a parameter has one: a
    save inside a gradient-accumulation cycle), optimizers and schedulers, the gradient scaler (where mixed
    precision has one), the objects registered with ``accelerator.register_for_checkpointing``, the global
    random generators (``ckptstore.RNGState``: Python, NumPy, torch CPU and CUDA), ``accelerator.step``
    (the gradient-accumulation counter) and, per prepared dataloader, its epoch counter and seed (a
    stateful dataloader's own state too). The checkpoint's step is the caller's (batches or optimizer
    steps done: :func:`load_state` gives it back, to find where the data stands).

    Args:
        accelerator: the ``accelerate.Accelerator`` (one process).
        url_or_store: a path or URL (a store without retention is opened there), a
            :class:`~ckptstore.storage.Storage`, or a :class:`~ckptstore.CheckpointStore` (with its
            retention: ``max_to_keep``, ``keep_best``...).
        step: the checkpoint's step.
        metadata: small plain values for the checkpoint's metadata (``{"loss": 0.3}``; ``keep_best`` ranks by it).
        storage_options: fsspec options for a URL.
        overwrite: replace a checkpoint of the same step (as ``accelerator.save_state`` overwrites its
            folder; a rerun may save again a step whose damaged checkpoint :func:`load_state` skipped).
        blocking: False returns once the state is copied to host memory and writes in the background
            (a CheckpointStore only: ``store.wait_until_finished()``).

    Returns:
        The committed checkpoint's ``CheckpointInfo`` (``blocking=False``: a handle whose ``result()`` is).

    Raises:
        ConfigError: several processes, DeepSpeed, FSDP, Megatron-LM or XLA; an accelerate without the
            registries read; ``blocking=False`` with a URL.
    """
    _check(accelerator)
    store = _open(url_or_store, storage_options)
    state = _state(accelerator, RNGState())
    if not blocking:
        if store is not url_or_store:
            raise ConfigError("save_state(blocking=False) needs a CheckpointStore (to wait for the save on)")
        return store.save(step, state, metadata=metadata, overwrite=overwrite, blocking=False)
    try:
        return store.save(step, state, metadata=metadata, overwrite=overwrite)
    finally:
        if store is not url_or_store:
            store.close()


def load_state(
    accelerator: Any,
    url_or_store: str | os.PathLike[str] | Storage | CheckpointStore,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> int | None:
    """``accelerator.load_state``, from a :class:`~ckptstore.CheckpointStore`: everything :func:`save_state`
    saved, restored in place into the accelerator's prepared objects (call it after ``prepare`` and
    ``register_for_checkpointing``, just before the training loop).

    Args:
        accelerator: the ``accelerate.Accelerator`` (one process), with the same objects prepared and
            registered, in the same order, as when the checkpoint was saved.
        url_or_store: as for :func:`save_state`.
        step: the step to restore; None: the latest intact checkpoint (a damaged newest one is skipped with
            a warning), or nothing when the store holds none.

    Returns:
        The step restored, or None when ``step`` is None and the store holds no checkpoint (nothing is
        changed: start afresh).

    Raises:
        CheckpointNotFoundError: ``step`` is not committed.
        StructureMismatchError: the accelerator's objects do not fit the checkpoint (another number of
            models, optimizers, schedulers, dataloaders or registered objects, or other shapes).
        ConfigError: as for :func:`save_state`.
    """
    _check(accelerator)
    store = _open(url_or_store, storage_options)
    like = _state(accelerator, RNGState())
    like["scaler"] = accelerator.scaler  # in place, or None: a placeholder
    try:
        if step is None:
            restored, found = store.resume(like)
            if found is None:
                return None
        else:
            restored, found = store.restore(step, like=like), step
    finally:
        if store is not url_or_store:
            store.close()
    accelerator.step = int(restored["accelerator"]["step"])
    return found


class _SkippedBatches:
    """A dataloader's batches after the first ``num_batches`` (see :func:`skip_first_batches`)."""

    def __init__(self, accelerator: Any, dataloader: Any, num_batches: int) -> None:
        self.accelerator, self.dataloader, self.num_batches = accelerator, dataloader, num_batches

    def __len__(self) -> int:
        return max(0, len(self.dataloader) - self.num_batches)

    def __iter__(self) -> Iterator[Any]:
        saved = RNGState().state_dict()
        skipped = self.accelerator.skip_first_batches(self.dataloader, self.num_batches)
        setattr(skipped, _SOURCE, self.dataloader)  # a save during this pass saves the dataloader's position
        batches = iter(skipped)  # draws the loader's seed from torch's global generator
        try:
            first = next(batches)
        except StopIteration:
            return
        finally:
            RNGState().load_state_dict(saved)
        yield first
        yield from batches
        # The pass is over: the dataloader counts it, as if it had run it itself.
        if hasattr(self.dataloader, "set_epoch") and hasattr(skipped, "iteration"):
            self.dataloader.set_epoch(skipped.iteration)


def skip_first_batches(accelerator: Any, dataloader: Any, num_batches: int) -> Any:
    """The batches of ``dataloader``'s current epoch after the first ``num_batches``, for the epoch a
    checkpoint was saved in: ``accelerator.skip_first_batches``, with the global random generators put
    back once the skipping dataloader has begun (creating its iterator draws from torch's global
    generator, which :func:`load_state` restored as it was at the save, after the epoch's own draw), and
    the dataloader's epoch counter advanced once the pass is over. ``num_batches=0`` returns ``dataloader``.

    The batches are the ones an uninterrupted run draws when the epoch's order does not depend on the
    global generators at the epoch's start: a seedable sampler (``DataLoaderConfiguration(
    use_seedable_sampler=True)``), or no shuffling.

    Raises:
        ConfigError: ``num_batches`` is not a non-negative int.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ConfigError(f"num_batches must be a non-negative int, got {num_batches!r}")
    if num_batches == 0:
        return dataloader
    return _SkippedBatches(accelerator, dataloader, num_batches)
