"""Keras 3: :class:`CkptStoreCallback`, backup and restore of a ``model.fit`` run through a CheckpointStore.

Rerunning the same ``model.fit(...)`` after a crash restores the model, its optimizer (``iterations``
included), the compiled metrics' running values, the process's global random generators and the epoch
(and the batch, for saves inside an epoch) from the latest intact checkpoint, and continues exactly
(docs/integrations.md).

Importing this module imports Keras (``import ckptstore`` never does).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Literal

import keras

from ..errors import ConfigError
from ..rng import RNGState
from ..storage import Storage
from ..store import CheckpointStore

__all__ = ["CkptStoreCallback", "resolve_mode"]

log = logging.getLogger(__name__)

#: Parts of a metric name that ``mode="auto"`` maximises when the model has no compiled metric of that
#: name to ask (Keras' own metrics with ``_direction == "up"``: accuracies, AUC, precision, recall, F-scores,
#: IoU, R2).
HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "fbeta", "iou", "r2")

_MODES = ("auto", "min", "max")


def resolve_mode(monitor: str, mode: str = "auto", model: Any = None) -> Literal["min", "max"]:
    """Whether a lower (``"min"``) or a higher (``"max"``) value of ``monitor`` is better.

    ``"min"`` and ``"max"`` are returned as they are. ``"auto"`` decides as Keras 3's own callbacks do
    (``ModelCheckpoint``, ``EarlyStopping``): a loss (the name without its ``val_`` prefix is ``loss`` or
    ends in ``loss``) is ``"min"``; else ``model``'s compiled metric of that name decides by its direction
    (accuracies, AUC, precision, recall, F-scores, IoU, R2: ``"max"``; errors: ``"min"``). Where ``model``
    is None or has no such metric (Keras would raise), the name decides: ``"max"`` if it contains one of
    :data:`HIGHER_IS_BETTER`, else ``"min"``.

    Raises:
        ConfigError: ``mode`` is not ``"auto"``, ``"min"`` or ``"max"``.
    """
    decided = _decide_mode(monitor, mode, model)
    if decided is not None:
        return decided
    name = monitor.removeprefix("val_").lower()
    return "max" if any(part in name for part in HIGHER_IS_BETTER) else "min"


def _decide_mode(monitor: str, mode: str, model: Any) -> Literal["min", "max"] | None:
    """:func:`resolve_mode` without its fallback on the name: None where the model cannot tell (yet)."""
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    if mode != "auto":
        raise ConfigError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    name = monitor.removeprefix("val_")
    if name.endswith("loss"):
        return "min"
    direction = _metric_direction(model, name) if model is not None else None
    if direction is None:
        return None
    return "max" if direction == "up" else "min"


def _metric_direction(model: Any, name: str) -> str | None:
    """``_direction`` ("up" or "down") of ``model``'s metric named ``name`` (compiled metrics included)."""
    try:
        metrics = list(model.metrics)
    except Exception:  # a model whose metrics are not built yet
        return None
    for m in metrics:
        try:
            inner = list(getattr(m, "metrics", None) or ())  # CompileMetrics, MetricsList
        except Exception:
            inner = []
        for metric in [m, *inner]:
            if getattr(metric, "name", None) == name and getattr(metric, "_direction", None) in ("up", "down"):
                return str(metric._direction)
    return None


class _FrozenRNG:
    """The global random generators' state taken earlier (as the epoch began), saved as an
    :class:`~ckptstore.RNGState` is (and restored by one)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        RNGState().load_state_dict(state)


def _number(value: Any) -> float | None:
    """A logged metric as a float (Python, NumPy or framework scalar), or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class CkptStoreCallback(keras.callbacks.Callback):
    """Back up a ``model.fit`` run into a :class:`~ckptstore.CheckpointStore` and resume it exactly.

    Rerunning the same ``model.fit(..., callbacks=[CkptStoreCallback(url)])`` after a crash restores, from
    the latest intact checkpoint (at ``on_train_begin``): the model's variables, the optimizer's
    (``iterations`` included, so learning-rate schedules continue), the compiled metrics' running values,
    the global random generators (``ckptstore.RNGState``: Python, NumPy, torch; as they were when the epoch
    began, until the epoch's batches before the checkpoint are drawn again, then as they were at the save)
    and the position: the epoch, and for a checkpoint saved inside an epoch the batch, whose earlier
    batches are then drawn from the data but not trained on. The rest of the run is the uninterrupted
    one's where the data comes in the same order (docs/integrations.md). A rerun of a run that finished
    trains no further (its epochs are done): a new run needs a new URL.

    Checkpoint steps count batches: step N holds the state after N training batches since the run began
    (across epochs). Each checkpoint's metadata holds ``epoch`` (epochs completed), ``batch`` (batches
    of the next epoch completed: 0 at an epoch's end) and, where the logs hold it, the ``monitor`` metric.

    Args:
        url_or_store: a path or URL (a store is opened with the retention arguments below), a
            :class:`~ckptstore.storage.Storage`, or a :class:`~ckptstore.CheckpointStore`, which keeps its
            own retention policy (passing ``max_to_keep``, ``keep_best`` or ``mode`` with one raises).
        save_freq: ``"epoch"`` (at the end of each epoch, after validation) or an int N (every N batches,
            counted across epochs as Keras' own callbacks do; not at epoch ends).
        max_to_keep: keep the newest N checkpoints (``CheckpointStore(max_to_keep=...)``).
        keep_best: also keep the N checkpoints with the best ``monitor`` value.
        monitor: the logged metric recorded in each checkpoint's metadata and ranked by ``keep_best`` and
            ``store.best_step()`` (the store's ``best_metric``). Default: the given store's ``best_metric``,
            else ``"val_loss"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (the store's ``best_mode``; ``"auto"`` as Keras decides,
            :func:`resolve_mode`, when the store is opened: at the start of ``fit`` or at the first use
            of :attr:`store`).
        extra_state: more entries saved and restored with the model (``{"data": my_dataset}``): objects
            with ``state_dict()`` / ``load_state_dict()`` (a data source's position), generators, arrays.
        storage_options: fsspec options for a URL (``endpoint_url``, credentials...).

    Raises:
        ConfigError: a bad ``save_freq`` or ``mode``; retention arguments given with a CheckpointStore, or a
            ``monitor`` other than the store's ``best_metric``.
    """

    def __init__(
        self,
        url_or_store: str | os.PathLike[str] | Storage | CheckpointStore,
        *,
        save_freq: Literal["epoch"] | int = "epoch",
        max_to_keep: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["auto", "min", "max"] = "auto",
        extra_state: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ConfigError(f"save_freq must be 'epoch' or a positive int (batches), got {save_freq!r}")
        if mode not in _MODES:
            raise ConfigError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigError(f"monitor must be a non-empty str (a logged metric) or None, got {monitor!r}")
        if extra_state is not None and not isinstance(extra_state, dict):
            raise ConfigError(f"extra_state must be a dict or None, got {type(extra_state).__name__}")
        self._store: CheckpointStore | None = None
        self._location: str | os.PathLike[str] | Storage | None = None  # where to open one
        self._owns_store = not isinstance(url_or_store, CheckpointStore)
        if isinstance(url_or_store, CheckpointStore):
            given: dict[str, Any] = {
                name: value
                for name, value in (
                    ("max_to_keep", max_to_keep),
                    ("keep_best", keep_best),
                    ("storage_options", storage_options),
                )
                if value is not None
            }
            if mode != "auto":
                given["mode"] = mode
            if given:
                args = ", ".join(f"{k}={v!r}" for k, v in given.items())
                raise ConfigError(
                    f"CkptStoreCallback got a CheckpointStore and {args}: a given store keeps its own retention "
                    "policy; set it on the store (CheckpointStore(url, max_to_keep=..., keep_best=..., "
                    "best_metric=..., best_mode=...)) or give the callback a URL"
                )
            metric = url_or_store.policy.best_metric
            if monitor is not None and metric is not None and monitor != metric:
                raise ConfigError(
                    f"CkptStoreCallback(monitor={monitor!r}) but the given store ranks checkpoints by "
                    f"best_metric={metric!r}: pass monitor={metric!r}, or leave monitor out"
                )
            self._store = url_or_store
            monitor = monitor or metric
        else:
            self._location = url_or_store
        self.save_freq = save_freq
        self.monitor: str = monitor or "val_loss"
        self._max_to_keep, self._keep_best, self._mode = max_to_keep, keep_best, mode
        self._storage_options = storage_options
        self._extra = extra_state
        self._reset_progress()

    def _reset_progress(self) -> None:
        self._global_step = 0  # training batches since the run began (the checkpoint step)
        self._last_saved: int | None = None
        self._epoch = 0  # the epoch in progress (0-based)
        self._batch = 0  # its batches done
        self._epoch_base = 0  # _global_step when the epoch in progress began
        self._epoch_rng: dict[str, Any] | None = None  # the global generators at the start of that epoch
        self._resume_at: tuple[int, int] | None = None  # (epoch, batch) a restored checkpoint left off at
        self._resumed_metrics: list[Any] | None = None  # running metric values to restore (mid-epoch)
        self._resumed_rng: dict[str, Any] | None = None  # the generators at the save (mid-epoch)
        self._initial_epoch_to_put_back: tuple[Any] | None = None
        self._skip_until = 0  # batches of this epoch to draw without training (a mid-epoch resume)
        self._skipping = False
        self._skip_logs: dict[str, Any] = {}
        self._real_train_function: Any = None
        self._warned_monitor = False

    # --- the store ----------------------------------------------------------------------------------

    @property
    def store(self) -> CheckpointStore:
        """The store checkpoints go to: the one given, or one opened on the URL when first needed, with
        ``mode="auto"`` resolved then (:func:`resolve_mode`, against the model's compiled metrics): at the
        start of ``fit`` if the monitor is a loss or the model's metrics are built, else at the first save
        (on TensorFlow, ``fit`` builds the compiled metrics at its first step)."""
        if self._store is None:
            model = getattr(self, "_model", None)
            assert self._location is not None  # a store is given, or a location to open one on
            self._store = CheckpointStore(
                self._location,
                max_to_keep=self._max_to_keep,
                keep_best=self._keep_best,
                best_metric=self.monitor,
                best_mode=resolve_mode(self.monitor, self._mode, model),
                storage_options=self._storage_options,
            )
        return self._store

    def _state(self, model: Any, rng: Any, epoch_rng: Any, metrics: Any) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": model,
            "optimizer": model.optimizer,
            "metrics": metrics,
            "rng": rng,  # the global generators at the save
            "epoch_rng": epoch_rng,  # ... and when the epoch in progress began (the same at an epoch's end)
            "progress": {"epoch": self._epoch, "batch": self._batch},
        }
        if self._extra is not None:
            state["extra"] = self._extra
        return state

    # --- Keras' hooks -------------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._reset_progress()
        model = self.model
        # The store is opened now if "auto" can be decided now, else at the first save (the model's
        # compiled metrics are built by then); meanwhile a store without retention reads.
        if self._location is not None and self._store is None and _decide_mode(self.monitor, self._mode, model) is None:
            reader = CheckpointStore(self._location, storage_options=self._storage_options)
        else:
            reader = self.store
        if not model.built:
            if reader.latest_step() is None:
                return  # a fresh run: nothing to restore into it (fit builds it)
            raise ConfigError(
                f"CkptStoreCallback: {reader.url} holds checkpoints to resume from, but the model is not built "
                "at the start of fit(): build it first (give it a keras.Input, or call it on a batch)"
            )
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)  # its slot variables, to restore into
        # The metrics' values come back as arrays (on TensorFlow, fit builds the compiled metrics at its first
        # step: they may not exist yet), put into the metrics where a resume inside an epoch needs them.
        # The generators as the epoch began are restored now (a rerun draws the epoch's data order from
        # them); those of the save once the batches before it are drawn again (_finish_skipping).
        restored, step = reader.resume(like=self._state(model, None, RNGState(), None))
        if step is None:
            return
        epoch, batch = int(restored["progress"]["epoch"]), int(restored["progress"]["batch"])
        self._global_step = self._last_saved = step
        self._epoch, self._batch = epoch, batch
        log.info("resuming fit from %s step %d (epoch %d, batch %d)", reader.url, step, epoch, batch)
        # Where Keras' own BackupAndRestore puts the epoch to start from (fit reads it after this hook);
        # the model's own value is put back once fit has read it, so a later fit() is not affected.
        self._initial_epoch_to_put_back = (getattr(model, "_initial_epoch", None),)
        model._initial_epoch = epoch
        if batch:
            self._resume_at = (epoch, batch)
            self._resumed_metrics = list(restored["metrics"])
            self._resumed_rng = restored["rng"]

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        self._put_back_initial_epoch(model)
        self._epoch, self._batch = epoch, 0
        self._epoch_base = self._global_step
        # The generators as the epoch starts, before the data order of the epoch is drawn (JAX and torch
        # backends draw it from NumPy's and torch's global generators): what a save inside this epoch holds.
        self._epoch_rng = RNGState().state_dict()
        resume, self._resume_at = self._resume_at, None
        if resume is None:
            return
        resume_epoch, resume_batch = resume
        if resume_epoch != epoch:
            warnings.warn(
                f"CkptStoreCallback: the checkpoint left off in epoch {resume_epoch} at batch {resume_batch}, but "
                f"fit() begins with epoch {epoch}: its batches are all trained",
                stacklevel=2,
            )
            self._resumed_metrics = self._resumed_rng = None
            return
        self._batch = resume_batch
        self._epoch_base = self._global_step - resume_batch
        self._skip_until = resume_batch
        # fit() reset the metrics just before this hook: their running values as the checkpoint had them
        # (on TensorFlow, where they are not built yet, at the first batch drawn).
        self._restore_metrics(model, last_chance=keras.backend.backend() != "tensorflow")
        self._install_skipping(model)

    def _restore_metrics(self, model: Any, batch: Any = None, *, last_chance: bool = True) -> None:
        """Put the checkpoint's running metric values into the model's metrics, and take the logs the skipped
        batches report. On TensorFlow fit builds the compiled metrics at its first step: given a ``batch`` of
        data, this builds them first; with ``last_chance=False`` and metrics not built, it waits."""
        saved = self._resumed_metrics
        if saved is None:
            return
        if len(model.metrics_variables) != len(saved) and batch is not None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            model.compute_metrics(x, y, model(x, training=False), sample_weight)  # builds them (values replaced)
        variables = list(model.metrics_variables)
        if len(variables) == len(saved):
            for variable, value in zip(variables, saved):
                variable.assign(value)
        elif not last_chance:
            return
        else:
            warnings.warn(
                f"CkptStoreCallback: the checkpoint holds {len(saved)} metric variables, the model has "
                f"{len(variables)}: the logs of epoch {self._epoch} cover the batches after the resume only "
                "(the model and the optimizer are restored all the same)",
                stacklevel=2,
            )
            model.reset_metrics()
        self._resumed_metrics = None
        self._skip_logs = dict(model.get_metrics_result())

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._real_train_function is None:
            return
        self._skipping = batch < self._skip_until
        if not self._skipping:
            self._finish_skipping()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._skipping:
            self._skipping = False
            return
        self._batch = batch + 1
        self._global_step = self._epoch_base + batch + 1
        if isinstance(self.save_freq, int) and self._global_step - (self._last_saved or 0) >= self.save_freq:
            epoch_rng = _FrozenRNG(self._epoch_rng) if self._epoch_rng is not None else RNGState()
            self._save(epoch_rng, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._finish_skipping()  # every batch of the epoch was trained before the checkpoint
        self._epoch, self._batch = epoch + 1, 0
        if self.save_freq == "epoch":
            self._save(RNGState(), logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        self._uninstall_skipping()
        self._put_back_initial_epoch(model)
        if self._store is None:
            return
        if self._owns_store:
            self._store.close()
        else:
            self._store.wait_until_finished()

    # --- saving -------------------------------------------------------------------------------------

    def _save(self, epoch_rng: Any, logs: dict[str, Any] | None) -> None:
        model = self.model
        metadata: dict[str, Any] = {"epoch": self._epoch, "batch": self._batch}
        value = _number((logs or {}).get(self.monitor))
        if value is not None:
            metadata[self.monitor] = value
        elif self._batch == 0:
            self._warn_unmonitored(logs)
        # overwrite: a damaged checkpoint that the resume skipped may lie at this step.
        self.store.save(
            self._global_step,
            self._state(model, RNGState(), epoch_rng, list(model.metrics_variables)),
            metadata=metadata,
            overwrite=True,
        )
        self._last_saved = self._global_step

    def _warn_unmonitored(self, logs: dict[str, Any] | None) -> None:
        policy = self.store.policy
        if self._warned_monitor or policy.keep_best is None or policy.best_metric != self.monitor:
            return
        self._warned_monitor = True
        warnings.warn(
            f"CkptStoreCallback: monitor={self.monitor!r} is not in the logs at the end of epoch {self._epoch} "
            f"(they hold {sorted(logs or {})}): keep_best cannot rank these checkpoints (pass validation_data, "
            "or monitor a logged metric)",
            stacklevel=3,
        )

    # --- a mid-epoch resume: the epoch's first batches drawn, not trained on -----------------------------

    def _install_skipping(self, model: Any) -> None:
        real = model.train_function
        backend = keras.backend.backend()
        per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))

        def train_function(*args: Any) -> Any:
            # Keras 3.15: TensorFlow's train function takes (iterator), JAX's (state, iterator): each draws its
            # batches itself; torch's takes (batches), drawn already by the epoch iterator.
            if not self._skipping:
                return real(*args)
            source = args[-1]
            if hasattr(source, "__next__"):
                for _ in range(per_call):
                    batch = next(source)  # drawn, not trained on
                    if self._resumed_metrics is not None:
                        self._restore_metrics(model, batch)
            if backend == "jax":
                return self._skip_logs, args[0]  # the training state passes through unchanged
            return self._skip_logs

        self._real_train_function = real
        model.train_function = train_function

    def _finish_skipping(self) -> None:
        """The batches before the checkpoint are drawn: the training function back, and the global
        generators as they were at the save."""
        self._uninstall_skipping()
        rng, self._resumed_rng = self._resumed_rng, None
        if rng is not None:
            RNGState().load_state_dict(rng)

    def _uninstall_skipping(self) -> None:
        real, self._real_train_function = self._real_train_function, None
        self._skipping, self._skip_until = False, 0
        if real is not None:
            self.model.train_function = real

    def _put_back_initial_epoch(self, model: Any) -> None:
        saved, self._initial_epoch_to_put_back = self._initial_epoch_to_put_back, None
        if saved is not None:
            model._initial_epoch = saved[0]
