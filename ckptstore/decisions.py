"""When to save: step and time intervals, and preemption signals, agreed across ranks.

(Being built: the issue #14 helper completes this module.)
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable

from . import distributed


@dataclasses.dataclass(frozen=True)
class SavePolicy:
    """A store's save decisions (:meth:`ckptstore.CheckpointStore.should_save`)."""

    save_interval_steps: int | None = None
    save_interval_secs: float | None = None
    save_on_preemption: bool = False
    preemption_signals: tuple[int, ...] = (signal.SIGTERM,)


class Decisions:
    """The save decisions of one store object: its last save, its clock, the preemption flag."""

    def __init__(self, policy: SavePolicy, coordinator: Callable[[], distributed.Coordinator]) -> None:
        self.policy = policy
        self._coordinator = coordinator

    def should_save(self, step: int) -> bool:
        raise NotImplementedError

    def reached_preemption(self, step: int) -> bool:
        raise NotImplementedError

    def started(self, step: int) -> None:
        """A save of ``step`` has started (on this rank)."""

    def close(self) -> None:
        """Restore the signal handlers this object replaced."""
