"""Hugging Face ``transformers``: :class:`CkptStoreTrainer`, a ``Trainer`` that saves and resumes through a
CheckpointStore.

Each checkpoint is one ckptstore checkpoint at step ``global_step`` holding the model, the optimizer, the
learning-rate scheduler, the gradient scaler (when there is one), the global random generators, the
``TrainerState`` (``trainer_state.json``'s content, as plain data) and the data position.
``trainer.train(resume_from_checkpoint=True)`` (or a step, or a checkpoint's path) restores all of it and
continues as the Trainer's own resume does, bit for bit where that one is exact (docs/integrations.md).
Rotation is the store's retention: ``save_total_limit`` is its ``max_to_keep``, and the Trainer's best
checkpoint is kept by ``keep_best``; nothing else deletes checkpoints, so pins are honoured.

The Trainer has no public hook for where its checkpoints go, so this class overrides private methods of
``transformers.Trainer`` (:data:`OVERRIDDEN`), written against transformers 5.24; at construction it checks
that they exist with the parameters it relies on, and raises ``ConfigError`` naming the installed version
otherwise. Importing this module imports transformers and torch (``import ckptstore`` never does).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import warnings
from typing import Any, cast

import transformers
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import SaveStrategy, compare_trainer_and_checkpoint_args

from ..directory import restore as restore_directory
from ..errors import CheckpointNotFoundError, ConfigError
from ..rng import RNGState
from ..storage import Storage, parse_step, step_name
from ..store import CheckpointStore
from ..tree import MISSING

__all__ = ["OVERRIDDEN", "CkptStoreTrainer"]

log = logging.getLogger(__name__)

#: The private methods of ``transformers.Trainer`` that :class:`CkptStoreTrainer` overrides or calls, with
#: the parameters it relies on (checked at construction against the class it inherits them from).
OVERRIDDEN: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_init_training_state": (
        "max_steps",
        "num_update_steps_per_epoch",
        "num_train_epochs",
        "resume_from_checkpoint",
        "trial",
    ),
    "_prepare_for_training": ("max_steps", "train_dataloader", "resume_from_checkpoint"),
    "_run_epoch": ("epoch", "resume_from_checkpoint", "epochs_trained", "steps_trained_in_current_epoch"),
    "_load_rng_state": ("checkpoint",),
    "_load_best_model": (),
    "_load_callback_state": (),
}

#: What a native Trainer checkpoint directory holds (``train(resume_from_checkpoint=<such a directory>)``
#: resumes it natively, then saves into the store).
_NATIVE_STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class _Request:
    """What ``train(resume_from_checkpoint=...)`` asked for: the latest intact checkpoint, a step, or a path."""

    step: int | None = None
    path: str | None = None


@dataclasses.dataclass
class _Resumed:
    """A restored checkpoint, held from ``_init_training_state`` until the training loop has used it."""

    path: str  # passed to the Trainer's loop as its `resume_from_checkpoint`, and recognised by the overrides
    step: int
    optimizer: Any
    scheduler: Any
    scaler: Any
    rng: dict[str, Any] | None


def _check_compatible(trainer: Trainer) -> None:
    """Raise ConfigError unless the methods :class:`CkptStoreTrainer` overrides or calls exist, with their
    parameters, in the class it inherits them from (transformers' Trainer, or a subclass in between)."""
    problems = []
    for name, params in OVERRIDDEN.items():
        method = getattr(super(CkptStoreTrainer, trainer), name, None)
        if not callable(method):
            problems.append(f"{name} is missing")
            continue
        try:
            found = inspect.signature(method).parameters
        except (TypeError, ValueError):
            problems.append(f"{name} has no readable signature")
            continue
        missing = [p for p in params if p not in found]
        if missing:
            problems.append(f"{name} lacks the parameters {missing}")
    if problems:
        raise ConfigError(
            f"CkptStoreTrainer does not support transformers {transformers.__version__} (written against 5.24): "
            + "; ".join(problems)
            + ". Use a transformers version it supports, or the Trainer's own checkpoints"
        )


def _plain_state(state: TrainerState) -> dict[str, Any]:
    """The TrainerState as ``trainer_state.json`` holds it (JSON's types: str keys, lists, numbers, None), so
    that a resume sees what a native one would see."""
    return json.loads(json.dumps(dataclasses.asdict(state)))


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


class CkptStoreTrainer(Trainer):
    """A :class:`transformers.Trainer` whose checkpoints go into a :class:`~ckptstore.CheckpointStore`.

    Saving follows the Trainer's own schedule (``save_strategy``, ``save_steps``); each checkpoint is one
    ckptstore checkpoint at step ``state.global_step`` holding the model, optimizer, scheduler, gradient
    scaler, global random generators (``ckptstore.RNGState``: Python, NumPy, torch CPU and CUDA), the
    ``TrainerState`` (as ``trainer_state.json`` holds it: ``log_history``, ``best_metric``,
    ``best_global_step``, ``best_model_checkpoint``, the stateful callbacks) and the data position; with
    ``save_only_model=True``, the model, the TrainerState and the position only. Its metadata holds
    ``epoch``, the evaluation metrics logged at that step, and ``best_<metric>`` where the checkpoint was
    the Trainer's new best (:attr:`best_key`).

    ``train(resume_from_checkpoint=...)`` takes ``True`` (the latest intact checkpoint of the store: a
    damaged newest one is skipped with a warning), a step (int), or a path: a ckptstore checkpoint
    (``CheckpointInfo.path``, ``state.best_model_checkpoint``) or a native Trainer checkpoint directory
    (resumed the Trainer's way, then saved into the store). The resume restores what the Trainer's own
    resume restores, at the same moments, and so continues bit for bit where the Trainer's does.

    Retention (only the store deletes checkpoints, so readers' pins are honoured): ``save_total_limit=N``
    is the store's ``max_to_keep=N``; with a ``metric_for_best_model`` the store also ranks checkpoints by
    :attr:`best_key` and keeps the Trainer's best one (``keep_best=1``; the Trainer's rule: the first to
    reach the best value), which may make N+1 checkpoints where the Trainer keeps N.
    ``load_best_model_at_end`` restores the best model from the store.

    Args:
        *args, **kwargs: ``transformers.Trainer``'s.
        store: a path or URL (a store is opened there with the retention above), a
            :class:`~ckptstore.storage.Storage`, or a :class:`~ckptstore.CheckpointStore`, which keeps its
            own retention policy. Default: ``<output_dir>/ckptstore``.
        storage_options: fsspec options for a URL (``endpoint_url``, credentials...).

    Raises:
        ConfigError: the installed transformers lacks a method this class overrides (:data:`OVERRIDDEN`);
            a setting this class does not support (several processes, DeepSpeed, FSDP, ``push_to_hub``);
            ``save_total_limit`` with a given store; a given store that may delete the best checkpoint
            ``load_best_model_at_end`` needs.
    """

    def __init__(
        self,
        *args: Any,
        store: str | os.PathLike[str] | Storage | CheckpointStore | None = None,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_compatible(self)
        args_ = self.args
        unsupported = [
            (args_.world_size > 1, f"{args_.world_size} processes (one process only)"),
            (bool(args_.deepspeed), "DeepSpeed"),
            (bool(args_.fsdp), "FSDP"),
            (args_.push_to_hub, "push_to_hub (checkpoints are not folders to upload: push the final model)"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ConfigError(f"CkptStoreTrainer does not support {what}")
        metric = args_.metric_for_best_model
        #: The metadata key that marks the Trainer's new best checkpoints with its metric value
        #: (``"best_eval_loss"``), by which the store ranks them; None without ``metric_for_best_model``.
        self.best_key: str | None = None
        if metric is not None:
            self.best_key = "best_" + (metric if metric.startswith("eval_") else f"eval_{metric}")
        self._store: CheckpointStore | None = None
        self._location: str | os.PathLike[str] | Storage = os.path.join(
            args_.output_dir or "trainer_output", "ckptstore"
        )
        self._storage_options = storage_options
        if isinstance(store, CheckpointStore):
            self._check_given_store(store, storage_options)
            self._store = store
        elif store is not None:
            self._location = store
        self._request: _Request | None = None
        self._resumed: _Resumed | None = None
        self._updates_per_epoch: int | None = None

    def _check_given_store(self, store: CheckpointStore, storage_options: dict[str, Any] | None) -> None:
        if self.args.save_total_limit is not None and self.args.save_total_limit > 0:
            raise ConfigError(
                f"CkptStoreTrainer got a CheckpointStore and save_total_limit={self.args.save_total_limit}: a "
                "given store keeps its own retention policy; set it on the store (max_to_keep=...) or pass a URL"
            )
        if storage_options is not None:
            raise ConfigError("CkptStoreTrainer got a CheckpointStore and storage_options: open the store with them")
        policy = store.policy
        keeps_best = policy.keep_best is not None and policy.best_metric == self.best_key
        if self.args.load_best_model_at_end and policy.max_to_keep is not None and not keeps_best:
            mode = "max" if self.args.greater_is_better else "min"
            raise ConfigError(
                f"CkptStoreTrainer: load_best_model_at_end needs the best checkpoint, which the given store "
                f"({policy}) may delete: open it with keep_best=1, best_metric={self.best_key!r}, best_mode={mode!r}"
            )

    @property
    def store(self) -> CheckpointStore:
        """The store checkpoints go to: the one given, or one opened when first needed on the location given
        (default ``<output_dir>/ckptstore``) with ``save_total_limit`` and the best metric as retention."""
        if self._store is None:
            args = self.args
            limit = args.save_total_limit if args.save_total_limit is not None and args.save_total_limit > 0 else None
            self._store = CheckpointStore(
                self._location,
                max_to_keep=limit,
                # keep_best without max_to_keep would keep the newest and the best only: none is deleted then.
                keep_best=1 if limit is not None and self.best_key is not None else None,
                best_metric=self.best_key,
                best_mode="max" if args.greater_is_better else "min",
                storage_options=self._storage_options,
            )
        return self._store

    def checkpoint_path(self, step: int) -> str:
        """The path or URL of checkpoint ``step`` in :attr:`store` (committed or not)."""
        return self.store.storage.url_of(step_name(step))

    # --- train(): what to resume ---------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | os.PathLike[str] | bool | int | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``, saving into :attr:`store` and resuming from it.

        Args:
            resume_from_checkpoint: None or False: start afresh. True: the latest intact checkpoint of the
                store (CheckpointNotFoundError if it holds none; ``resume_from_checkpoint=
                trainer.store.latest_step() is not None`` resumes where there is one). An int: that step. A
                path or URL: a ckptstore checkpoint directory (of this store or another), or a native
                Trainer checkpoint directory (resumed by the Trainer itself).
            trial, ignore_keys_for_eval, kwargs: as for ``Trainer.train`` (hyperparameter search is not
                supported).

        Raises:
            CheckpointNotFoundError: nothing to resume from.
            ConfigError: a ``trial`` (hyperparameter search); a checkpoint saved with ``save_only_model``.
        """
        if trial is not None:
            raise ConfigError("CkptStoreTrainer does not support hyperparameter search (one store per run)")
        request = self._resolve(resume_from_checkpoint)
        if isinstance(request, str):  # a native checkpoint directory: the Trainer resumes it itself
            return super().train(request, trial, ignore_keys_for_eval, **kwargs)
        self._request = request
        try:
            if request is not None and self.args.auto_find_batch_size:
                # train() reads the batch size before the loop starts (the rest is restored in the loop)
                saved = self._read(request, keys=["trainer_state"])["trainer_state"]
                if saved.get("train_batch_size") is not None:
                    self._train_batch_size = saved["train_batch_size"]
            return super().train(None, trial, ignore_keys_for_eval, **kwargs)
        finally:
            self._request = self._resumed = None
            if self._store is not None:
                self._store.wait_until_finished()

    def _resolve(self, resume: str | os.PathLike[str] | bool | int | None) -> _Request | str | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            if self.store.latest_step() is None:
                raise CheckpointNotFoundError(
                    f"resume_from_checkpoint=True: no committed checkpoint in {self.store.url}"
                )
            return _Request()
        if isinstance(resume, int):
            if resume not in self.store.steps():
                raise CheckpointNotFoundError(f"resume_from_checkpoint={resume}: no such step in {self.store.url}")
            return _Request(step=resume)
        if isinstance(resume, str | os.PathLike):
            path = os.fspath(resume)
            if os.path.isfile(os.path.join(path, _NATIVE_STATE_FILE)):
                return path
            step = parse_step(path.rstrip("/").rsplit("/", 1)[-1])
            if step is not None and path.rstrip("/") == self.checkpoint_path(step):
                return _Request(step=step)
            return _Request(path=path)
        raise ConfigError(
            f"resume_from_checkpoint must be None, a bool, a step (int) or a path, got {type(resume).__name__}"
        )

    def _read(self, request: _Request, *, like: Any = MISSING, keys: list[str] | None = None) -> Any:
        """The checkpoint ``request`` names, restored (``like`` and ``keys`` as for ``restore``)."""
        if request.path is not None:
            return restore_directory(
                request.path, like=like, keys=keys, framework="torch", storage_options=self._storage_options
            )
        step = request.step if request.step is not None else self.store.latest_step()
        return self.store.restore(step, like=like, keys=keys, framework="torch")

    # --- the resume, at the moments the Trainer's own resume does each part --------------------------

    def _init_training_state(
        self,
        max_steps: int,
        num_update_steps_per_epoch: int,
        num_train_epochs: int,
        resume_from_checkpoint: str | None,
        trial: Any,
    ) -> tuple[int, int]:
        """The fresh TrainerState (super), then, when resuming, the checkpoint restored: the model now (after
        ``model_init``, before ``accelerator.prepare``, as ``train()`` loads it), the TrainerState as the
        Trainer's resume rebuilds it; the rest held for later hooks."""
        self._updates_per_epoch = num_update_steps_per_epoch
        started = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        request = self._request
        if request is None:
            return started
        like = {
            "model": self.model,  # restored in place
            "optimizer": MISSING,  # torch tensors, loaded once the optimizer exists (_prepare_for_training)
            "scheduler": None,
            "scaler": None,
            "rng": None,  # applied by _load_rng_state (RNGState takes the arrays as restored, torch's)
            "trainer_state": None,
            "position": None,
        }
        if request.path is None and request.step is None:  # the latest intact one: damaged ones are skipped
            state, latest = self.store.resume(like, framework="torch")
            if latest is None:  # deleted since train() began
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.store.url} to resume from")
            step, path = latest, self.checkpoint_path(latest)
        else:
            state = self._read(request, like=like)
            step = int(state["trainer_state"]["global_step"])
            path = request.path if request.path is not None else self.checkpoint_path(step)
        if state["optimizer"] is None:
            raise ConfigError(
                f"{path} holds the model only (saved with save_only_model=True): training cannot resume from it"
            )
        self._resumed = _Resumed(path, step, state["optimizer"], state["scheduler"], state["scaler"], state["rng"])
        log.info("resuming training from %s (step %d)", path, step)
        self.state = self._trainer_state(state["trainer_state"])
        compare_trainer_and_checkpoint_args(self.args, self.state)
        self._load_callback_state()
        # The data position, as the Trainer's resume derives it from global_step (its own rule).
        global_step = self.state.global_step
        epochs_trained = global_step // num_update_steps_per_epoch
        steps_in_epoch = 0
        if not self.args.ignore_data_skip:
            steps_in_epoch = (global_step % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps
        saved = state["position"]
        if [saved["epoch"], saved["batch"]] != [epochs_trained, steps_in_epoch] and not self.args.ignore_data_skip:
            warnings.warn(
                f"CkptStoreTrainer: {path} was saved after {saved['batch']} batches of epoch {saved['epoch']}; with "
                f"this run's data and batch sizes the Trainer resumes after {steps_in_epoch} batches of epoch "
                f"{epochs_trained} (the dataset, the batch size or gradient_accumulation_steps changed)",
                stacklevel=2,
            )
        self.state.init_training_references(self, max_steps, num_train_epochs, trial)
        return epochs_trained, steps_in_epoch

    def _trainer_state(self, saved: dict[str, Any]) -> TrainerState:
        """The TrainerState of a checkpoint, its best checkpoint kept only while it is still committed (the
        Trainer's own resume drops a ``best_model_checkpoint`` directory that is gone, with a warning)."""
        known = {f.name for f in dataclasses.fields(TrainerState)}
        state = TrainerState(**{k: v for k, v in saved.items() if k in known})
        best = state.best_model_checkpoint
        if best is not None and not self._best_exists(best, state.best_global_step):
            log.warning(
                "the best checkpoint %s recorded in the resumed state does not exist anymore; ignoring it for this run",
                best,
            )
            state.best_model_checkpoint = None
        return state

    def _best_exists(self, path: str, step: int | None) -> bool:
        if step is not None and path == self.checkpoint_path(step):
            return step in self.store.steps()
        return os.path.isdir(path)  # a checkpoint elsewhere (resumed from a path): a local directory

    def _prepare_for_training(self, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """The model wrapped, the optimizer and scheduler created (super); then, when resuming, their states
        (and the gradient scaler's) loaded, as the Trainer's ``_load_optimizer_and_scheduler`` does here."""
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        resumed = self._resumed
        if resumed is not None:
            optimizer, scheduler = self.optimizer, self.lr_scheduler
            assert optimizer is not None and scheduler is not None  # created by super()
            optimizer.load_state_dict(resumed.optimizer)
            scheduler.load_state_dict(resumed.scheduler)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and resumed.scaler is not None:
                scaler.load_state_dict(resumed.scaler)
            resumed.optimizer = resumed.scheduler = resumed.scaler = None  # free the copies
        return prepared

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's epoch, told that it resumes (it then skips the batches trained before the checkpoint
        and restores the generators through :meth:`_load_rng_state`)."""
        resumed = self._resumed
        if resumed is None:
            return super()._run_epoch(*args, **kwargs)
        bound = inspect.signature(super()._run_epoch).bind(*args, **kwargs)
        bound.arguments["resume_from_checkpoint"] = resumed.path
        return super()._run_epoch(*bound.args, **bound.kwargs)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The checkpoint's generators, at the moment the Trainer's resume restores them."""
        resumed = self._resumed
        if resumed is None or checkpoint != resumed.path:
            super()._load_rng_state(checkpoint)
            return
        if resumed.rng is not None:
            RNGState().load_state_dict(resumed.rng)

    # --- saving ----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """One ckptstore checkpoint at ``global_step``, with the TrainerState updated as the Trainer's own
        ``_save_checkpoint`` updates it (best checkpoint, stateful callbacks). No rotation here: the store's
        retention runs after the commit."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        state = self.state
        step = state.global_step
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy in strategies and state.best_global_step:
            best = state.best_global_step
            if best == step or best in self.store.steps():
                state.best_model_checkpoint = self.checkpoint_path(best)
        exported = cast(dict[str, Any], state.stateful_callbacks)  # a dict once built (typed as a list)
        for cb in [cb for cb in [*self.callback_handler.callbacks, self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(exported[name], list):
                exported[name].append(cb.state())
            else:
                exported[name] = cb.state()
        tree: dict[str, Any] = {
            "model": self.model,
            "optimizer": None,
            "scheduler": None,
            "scaler": None,
            "rng": RNGState(),
            "trainer_state": _plain_state(state),
            "position": self._position(step),
        }
        if not self.args.save_only_model:
            tree["optimizer"], tree["scheduler"] = self.optimizer, self.lr_scheduler
            tree["scaler"] = getattr(self.accelerator, "scaler", None)
        # overwrite: a damaged checkpoint that the resume skipped may lie at this step.
        self.store.save(step, tree, metadata=self._metadata(state), overwrite=True)

    def _position(self, step: int) -> dict[str, int]:
        """Where the data stands after ``step`` updates: epochs done, and batches of the next one trained."""
        per_epoch = self._updates_per_epoch or 1
        return {"epoch": step // per_epoch, "batch": (step % per_epoch) * self.args.gradient_accumulation_steps}

    def _metadata(self, state: TrainerState) -> dict[str, Any]:
        """``epoch``, the evaluation metrics logged at this step and, on the Trainer's new best checkpoint,
        :attr:`best_key` (what the store ranks by: every checkpoint carrying it is better than the older
        ones that do, so the store's best is the Trainer's, ties going to the first as the Trainer has it)."""
        metadata: dict[str, Any] = {"epoch": float(state.epoch or 0.0)}
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            for key, value in entry.items():
                if key.startswith("eval_") and _number(value) is not None:
                    metadata.setdefault(key, value)
        if self.best_key is not None and state.best_global_step == state.global_step:
            best = _number(state.best_metric)
            if best is not None:
                metadata[self.best_key] = best
        return metadata

    def _load_best_model(self) -> None:
        """The best checkpoint's model, from the store (or the ckptstore directory it names)."""
        state = self.state
        best, step = state.best_model_checkpoint, state.best_global_step
        if best is None:
            return
        log.info("loading best model from %s (score: %s)", best, state.best_metric)
        like = {"model": self.model}
        if step is not None and best == self.checkpoint_path(step):
            self.store.wait_until_finished()
            self.store.restore(step, like=like, keys=["model"])
        elif os.path.isfile(os.path.join(best, _NATIVE_STATE_FILE)):
            super()._load_best_model()  # a native checkpoint this run resumed from
        else:
            restore_directory(best, like=like, keys=["model"], storage_options=self._storage_options)
