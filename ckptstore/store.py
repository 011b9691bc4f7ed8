"""CheckpointStore: versioned step directories under one root, with retention. Orchestration only: the
work is done by :mod:`.checkpoint` (one directory), :mod:`.storage` (commit protocols, listing) and
:mod:`.retention` (which steps to keep)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from . import checkpoint, tree
from .errors import CheckpointExistsError, CheckpointNotFoundError, CkptStoreError
from .manifest import Manifest
from .retention import RetentionPolicy, StepInfo
from .storage import Storage, open_storage, step_name

__all__ = ["CheckpointInfo", "CheckpointStore"]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as read from its manifest (no tensor is read)."""

    step: int
    #: Path (local) or URL (remote) of the checkpoint directory; ``ckptstore.restore(path)`` opens it.
    path: str
    #: Creation time, seconds since the epoch.
    created: float
    #: Bytes of the checkpoint's tensor files.
    nbytes: int
    metadata: dict[str, Any]


def _info(storage: Storage, name: str, m: Manifest) -> CheckpointInfo:
    return CheckpointInfo(m.step, storage.url_of(name), m.created, sum(f.size for f in m.files), m.metadata)


def _check_step(step: Any) -> int:
    # The upper bound keeps the step in an int64 (and the directory name within what listing parses).
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 63:
        raise CkptStoreError(f"step must be an int in [0, 2**63), got {step!r}")
    return int(step)


class CheckpointStore:
    """Versioned checkpoints of one training run under ``url_or_path``.

    Args:
        url_or_path: a local directory (created if needed) or any fsspec URL (``s3://bucket/run1``), or a
            :class:`~ckptstore.storage.Storage` object.
        max_to_keep: keep the newest N checkpoints (None keeps all).
        keep_every_n_steps: also keep every step divisible by K, forever.
        keep_every_n_hours: also keep one checkpoint per H hours.
        storage_options: passed to the fsspec filesystem (``endpoint_url``, credentials, ...).

    Example::

        store = ckptstore.CheckpointStore("ckpts", max_to_keep=3)
        store.save(step, {"model": model, "opt": opt, "step": step})
        state = store.restore(like={"model": model, "opt": opt, "step": 0})
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike[str] | Storage,
        *,
        max_to_keep: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_every_n_hours: float | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.policy = RetentionPolicy(max_to_keep, keep_every_n_steps, keep_every_n_hours)
        self.storage = open_storage(url_or_path, storage_options)
        self._created: dict[int, float] = {}

    @property
    def url(self) -> str:
        """The store's root, as a path or URL."""
        return self.storage.url

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, {self.policy})"

    # --- writing ------------------------------------------------------------------------------------

    def save(
        self, step: int, state: Any, *, metadata: dict[str, Any] | None = None, overwrite: bool = False
    ) -> CheckpointInfo:
        """Save ``state`` as checkpoint ``step``, atomically; then apply retention.

        Args:
            step: a non-negative int; the directory is ``step_XXXXXXXX``.
            state: a tree of dicts, lists, tuples, arrays (numpy, torch, ...), plain Python values and
                stateful objects (anything with ``state_dict()`` / ``load_state_dict()``).
            metadata: a small dict of plain values, readable through :meth:`info` without reading tensors.
            overwrite: replace a committed checkpoint of the same step.

        Returns:
            The committed checkpoint's :class:`CheckpointInfo`.

        Raises:
            UnsupportedTypeError: a leaf cannot be saved (nothing is written).
            CheckpointExistsError: ``step`` is committed already and ``overwrite`` is False.
        """
        step = _check_step(step)
        prepared = checkpoint.prepare(state, metadata)
        name = step_name(step)
        if not overwrite and self.storage.is_committed(name):
            raise CheckpointExistsError(
                f"{self.storage.url_of(name)} is already committed (pass overwrite=True to replace it)"
            )
        m = checkpoint.write(self.storage, name, step, prepared, overwrite=overwrite)
        self._created[step] = m.created
        try:
            self._apply_retention()
        except OSError as e:
            if isinstance(e, CkptStoreError):
                raise
            raise checkpoint.storage_error(
                e, f"step {step} is committed, but retention failed (it runs again on the next save)"
            ) from e
        return _info(self.storage, name, m)

    def _apply_retention(self) -> list[int]:
        with self.storage.lock():
            self.storage.clean_leftovers()
            if self.policy.keeps_all:
                return []
            steps = self.storage.committed_steps()
            infos = [StepInfo(s, self._created_of(s)) for s in steps]
            doomed = self.policy.to_delete(infos)
            for s in doomed:
                self.storage.delete(step_name(s))
                self._created.pop(s, None)
            return doomed

    def _created_of(self, step: int) -> float:
        if self.policy.keep_every_n_hours is None:
            return 0.0
        if step not in self._created:
            self._created[step] = checkpoint.read_manifest(self.storage, step_name(step)).created
        return self._created[step]

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (its manifest first, then its data).

        Raises:
            CheckpointNotFoundError: no committed checkpoint has this step.
        """
        step = _check_step(step)
        with self.storage.lock():
            checkpoint.require_committed(self.storage, step_name(step))
            self.storage.delete(step_name(step))
        self._created.pop(step, None)

    # --- reading ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending (listed fresh from the filesystem)."""
        return self.storage.committed_steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _resolve(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.url}")
            return latest
        return _check_step(step)

    def info(self, step: int | None = None) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of ``step`` (default: the latest), from its manifest alone."""
        name = step_name(self._resolve(step))
        return _info(self.storage, name, _manifest(self.storage, name))

    def restore(
        self,
        step: int | None = None,
        *,
        like: Any = tree._MISSING,
        framework: str | None = None,
        verify: bool = False,
    ) -> Any:
        """Restore checkpoint ``step`` (default: the latest committed).

        Args:
            like: a template tree. Each array comes back with the type, dtype and device of its
                counterpart; each stateful object in it gets ``load_state_dict`` in place and is returned.
            framework: arrays without a counterpart come back as ``"numpy"`` (default) or ``"torch"``,
                ``"jax"``, ``"tf"`` arrays.
            verify: check every tensor's checksum while reading.

        Raises:
            CheckpointNotFoundError: no such committed checkpoint.
            CorruptCheckpointError: the manifest or a tensor file is damaged.
            StructureMismatchError: ``like`` does not fit the checkpoint.
        """
        name = step_name(self._resolve(step))
        m = _manifest(self.storage, name)
        return checkpoint.read(self.storage, name, like=like, framework=framework, verify=verify, m=m)


def _manifest(storage: Storage, name: str) -> Manifest:
    try:
        return checkpoint.read_manifest(storage, name)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url_of(name)}") from None
