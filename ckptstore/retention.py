"""Which committed checkpoints to keep: pure functions over (step, creation time), easy to test.

What survives is the union of the policies given (as in TensorFlow's CheckpointManager):

* ``max_to_keep=N``: the newest N checkpoints (None keeps all);
* ``keep_every_n_steps=K``: every step divisible by K, forever;
* ``keep_every_n_hours=H``: one checkpoint per H hours: walking from the oldest, a checkpoint is kept when
  it was created at least H hours after the last one kept this way (the oldest is kept). The choice is
  stable: applied again to the survivors it keeps the same ones.

Checkpoints that a reader has pinned are never deleted while the pin lasts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from .errors import CkptStoreError


@dataclasses.dataclass(frozen=True, slots=True)
class StepInfo:
    """What retention knows of a committed checkpoint."""

    step: int
    created: float  # seconds since the epoch


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """The retention options of a store; all None keeps everything."""

    max_to_keep: int | None = None
    keep_every_n_steps: int | None = None
    keep_every_n_hours: float | None = None

    def __post_init__(self) -> None:
        for name, kinds in (("max_to_keep", int), ("keep_every_n_steps", int), ("keep_every_n_hours", (int, float))):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
                what = "a positive int" if kinds is int else "a positive number"
                raise CkptStoreError(f"{name} must be {what} or None, got {value!r}")

    @property
    def keeps_all(self) -> bool:
        return self.max_to_keep is None

    def to_keep(self, infos: Sequence[StepInfo]) -> set[int]:
        """The steps this policy keeps among ``infos``."""
        ordered = sorted(infos, key=lambda i: i.step)
        if self.max_to_keep is None:
            return {i.step for i in ordered}
        keep = {i.step for i in ordered[-self.max_to_keep :]}
        if self.keep_every_n_steps is not None:
            keep.update(i.step for i in ordered if i.step % self.keep_every_n_steps == 0)
        if self.keep_every_n_hours is not None:
            spacing = self.keep_every_n_hours * 3600.0
            last: float | None = None
            for i in ordered:
                if last is None or i.created - last >= spacing:
                    keep.add(i.step)
                    last = i.created
        return keep

    def to_delete(self, infos: Sequence[StepInfo], pinned: Iterable[int] = ()) -> list[int]:
        """The steps to delete, oldest first: all that no policy keeps and no reader pins."""
        keep = self.to_keep(infos) | set(pinned)
        return sorted(i.step for i in infos if i.step not in keep)
