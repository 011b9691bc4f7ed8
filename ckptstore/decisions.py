"""When to save: step and time intervals, and preemption signals, agreed across ranks.

:class:`Decisions` answers ``CheckpointStore.should_save(step)`` and ``reached_preemption(step)`` from
what this store object knows: the step of the last save it started and when (by its ``clock``), and whether
a preemption signal arrived. ``should_save(step)`` is true when ``step`` is past the last step this object
started saving and one of these holds:

* ``step % save_interval_steps == 0``;
* ``save_interval_secs`` have passed since the last save started (before any save: since the first
  ``should_save`` call, so a long restore does not make the first step save);
* a preemption signal arrived (``save_on_preemption=True``) and no save has started since.

With no interval and no ``save_on_preemption`` it is true for every new step; with ``save_on_preemption``
alone, only on preemption. ``save(step)`` calls :meth:`Decisions.started`, so ``should_save(step)`` is false
right after it.

**Signals.** With ``save_on_preemption=True`` the store installs a handler for each of
``preemption_signals`` (SIGTERM by default) when it is created, which must be in the main thread (Python
allows signal handlers nowhere else): :class:`~ckptstore.errors.CkptStoreError` otherwise. The handler only
counts the signal (no I/O, no lock), then calls the handler it replaced if that was a Python function
(chaining: SIGINT's ``default_int_handler`` still raises KeyboardInterrupt); ``SIG_DFL`` and ``SIG_IGN``
are not acted on, since the default action of SIGTERM would kill the process before the checkpoint is
written. The training loop then sees ``should_save`` true, saves, sees ``reached_preemption`` true, waits
for its saves (an async save in flight included) and exits. ``close()`` puts the replaced handlers back
(the next ``should_save`` installs them again).

**Across ranks.** Under torch.distributed every rank must get the same answer. Step intervals are decided
locally (every rank calls with the same steps). The time interval (rank 0's clock) and the preemption flag
(any rank's signal) are shared by one small all-reduce (max) on a gloo group of its own
(:func:`ckptstore.distributed.side_group`) at the first ``should_save`` call and then every K-th: K is
``knobs.preemption_sync_every`` if set, else adapted as the job runs so that agreements cost at most
``AGREEMENT_SHARE`` (0.5%) of the time between them (:meth:`Decisions._period`). Time and preemption
decisions are made only at those calls: a signal is acted on within K steps. Ranks must call
``should_save`` equally often (it is a collective). A store with neither ``save_interval_secs`` nor
``save_on_preemption`` communicates nothing. See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import signal
import threading
import time
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import distributed, knobs
from .errors import CkptStoreError

__all__ = ["Decisions", "SavePolicy"]

#: Across ranks, agreements are spaced so that each costs at most this share of the time the calls between
#: two agreements take (the calls' pace is the training step's), unless ``knobs.preemption_sync_every`` fixes
#: the spacing; at most this many calls apart, and at most twice as far as the last two.
AGREEMENT_SHARE = 0.005
MAX_PERIOD = 1000
_SMOOTHING = 0.25  # the weight of the newest agreement in the moving average of their durations

#: Signals that cannot be caught.
_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


@dataclasses.dataclass(frozen=True)
class SavePolicy:
    """A store's save decisions (:meth:`ckptstore.CheckpointStore.should_save`), checked when made.

    Raises:
        CkptStoreError: an interval that is not a positive int (steps) or a positive finite number
            (seconds), a ``save_on_preemption`` that is not a bool, or a signal that is not a catchable
            signal number of this platform.
    """

    save_interval_steps: int | None = None
    save_interval_secs: float | None = None
    save_on_preemption: bool = False
    preemption_signals: tuple[int, ...] = (signal.SIGTERM,)

    def __post_init__(self) -> None:
        steps, secs = self.save_interval_steps, self.save_interval_secs
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
                raise CkptStoreError(f"save_interval_steps must be a positive int or None, got {steps!r}")
            object.__setattr__(self, "save_interval_steps", int(steps))
        if secs is not None:
            if isinstance(secs, bool) or not isinstance(secs, numbers.Real) or not (math.isfinite(secs) and secs > 0):
                raise CkptStoreError(f"save_interval_secs must be a positive finite number or None, got {secs!r}")
            object.__setattr__(self, "save_interval_secs", float(secs))
        if not isinstance(self.save_on_preemption, bool):
            raise CkptStoreError(f"save_on_preemption must be a bool, got {self.save_on_preemption!r}")
        sigs: list[int] = []
        valid = signal.valid_signals()
        for s in self.preemption_signals:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or int(s) not in valid:
                raise CkptStoreError(f"preemption_signals: {s!r} is not a signal number of this platform")
            if int(s) in _UNCATCHABLE:
                raise CkptStoreError(f"preemption_signals: {signal.Signals(int(s)).name} cannot be caught")
            try:
                number: int = signal.Signals(int(s))
            except ValueError:  # real-time signals other than SIGRTMIN and SIGRTMAX have no name
                number = int(s)
            if number not in sigs:
                sigs.append(number)
        if self.save_on_preemption and not sigs:
            raise CkptStoreError("save_on_preemption=True needs at least one signal in preemption_signals")
        object.__setattr__(self, "preemption_signals", tuple(sigs))


class _Handler:
    """The installed signal handler: counts the signal into its Decisions (while they are open), then calls
    the handler it replaced if that is a Python function. Closed (``decisions`` None), it only passes the
    signal on; if it is still the signal's handler then (close() ran off the main thread), it first puts
    the handler it replaced back and, where that was the default action, raises the signal again."""

    __slots__ = ("decisions", "previous")

    def __init__(self, decisions: Decisions, previous: dict[int, Any]) -> None:
        self.decisions: Decisions | None = decisions
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        d = self.decisions
        if d is not None:
            d._signals += 1  # the only thing done for the store: no I/O, no lock
        prev = _unwrap(self.previous.get(signum), signum)
        if d is None and signal.getsignal(signum) is self:
            signal.signal(signum, signal.SIG_DFL if prev is None else prev)
            if prev in (None, signal.SIG_DFL):
                signal.raise_signal(signum)
                return
        if callable(prev):
            prev(signum, frame)


def _unwrap(handler: Any, signum: int) -> Any:
    """``handler``, or for a closed :class:`_Handler` the handler it replaced (recursively)."""
    while isinstance(handler, _Handler) and handler.decisions is None:
        handler = handler.previous.get(signum)
    return handler


class Decisions:
    """The save decisions of one store object: its last save, its clock, the preemption flag.

    Args:
        policy: the intervals and signals.
        coordinator: returns the coordinator of the store (resolved at each call, as saves do).
        clock: seconds, monotonic; the :attr:`clock` attribute may be replaced later (tests:
            ``store._decisions.clock = fake``).
    """

    def __init__(
        self,
        policy: SavePolicy,
        coordinator: Callable[[], distributed.Coordinator],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._coordinator = coordinator
        #: The clock of ``save_interval_secs`` (seconds; only rank 0's counts across ranks).
        self.clock = clock
        self._last_step: int | None = None  # the step of the last save this object started
        self._since: float | None = None  # when that save started; before any, the first should_save call
        self._coord: distributed.Coordinator | None = None  # as should_save last resolved it
        self._calls = 0  # should_save calls, counted for the agreement's period across ranks
        self._next_agreement = 0  # the call that agrees next (the first call does)
        self._agreed_at: tuple[int, float] | None = None  # the last agreement's call and end (perf_counter)
        self._cost: float | None = None  # an agreement's duration, seconds, averaged (None: not measured)
        self._signals = 0  # preemption signals received: written by the signal handler only
        self._seen = 0  # ... of which taken into a decision
        self._preempting = False  # a preemption decided (agreed across ranks), its save not started yet
        self._preempt_step: int | None = None  # the step of the save started for a preemption
        self._handler: _Handler | None = None
        if policy.save_on_preemption:
            self._install()

    # --- the decisions ------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether to save ``step`` now (module docstring); a collective across ranks when the policy has a
        time interval or ``save_on_preemption``."""
        step = _index(step)
        p = self.policy
        secs = p.save_interval_secs
        timed = False
        if secs is not None or p.save_on_preemption:  # the decisions that need the other ranks' word
            if p.save_on_preemption and self._handler is None:
                self._install()  # after close(): the store stays usable
            now = self.clock() if secs is not None else 0.0
            if self._since is None:
                self._since = now
            # Resolved at every call of one process, but across ranks only at agreements (cheap as it is,
            # resolving costs more than the rest of a call between two).
            coord = self._coord
            if coord is None or coord.world_size == 1 or self._calls >= self._next_agreement:
                coord = self._coord = self._coordinator()
            if coord.world_size == 1:
                timed = secs is not None and now - self._since >= secs
                if self._signals != self._seen:
                    self._seen = self._signals
                    self._preempting = True
            else:
                if self._calls >= self._next_agreement:
                    timed = self._agree(coord, now)
                self._calls += 1
        if self._last_step is not None and step <= self._last_step:
            return False
        if self._preempting or timed:
            return True
        if p.save_interval_steps is not None:
            return step % p.save_interval_steps == 0
        return secs is None and not p.save_on_preemption

    def _agree(self, coord: distributed.Coordinator, now: float) -> bool:
        """One agreement across ranks (a collective): any rank's signal, rank 0's time interval, and the
        number of calls until the next agreement; returns whether the time interval is due."""
        secs = self.policy.save_interval_secs
        signalled = self._signals != self._seen
        self._seen = self._signals
        due = coord.rank == 0 and secs is not None and self._since is not None and now - self._since >= secs
        start = time.perf_counter()
        every = self._period(start)
        any_signal, any_due, every = distributed.all_max(coord, [int(signalled), int(due), every])
        end = time.perf_counter()
        # The first agreement also makes the side group: its time is no measure of the next ones. Later ones
        # vary several-fold (peers' wake-ups, a busy machine): a moving average, so that one quick agreement
        # does not bring the next ones close together.
        if self._agreed_at is not None:
            cost = end - start
            self._cost = cost if self._cost is None else (1 - _SMOOTHING) * self._cost + _SMOOTHING * cost
        self._agreed_at = (self._calls, end)
        self._next_agreement = self._calls + max(1, every)
        self._preempting = self._preempting or bool(any_signal)
        return bool(any_due)

    def _period(self, now: float) -> int:
        """Calls until the next agreement, as this rank sees it (the ranks take the largest): the knob if set;
        else enough calls that one agreement costs ``AGREEMENT_SHARE`` of the time they take (measured: the
        agreements' duration, a moving average; the calls' pace since the last one), at least 1, at most
        twice the last period (a pace measured on quick first steps does not space them far at once) and
        ``MAX_PERIOD``."""
        fixed = knobs.current.preemption_sync_every
        if fixed > 0:
            return int(fixed)
        if self._cost is None or self._agreed_at is None:
            return 1
        calls, at = self._agreed_at
        elapsed = self._calls - calls
        per_call = (now - at) / max(1, elapsed)
        wanted = MAX_PERIOD if per_call <= 0 else math.ceil(self._cost / (AGREEMENT_SHARE * per_call))
        return max(1, min(wanted, 2 * elapsed, MAX_PERIOD))

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption was decided and a save of ``step`` (or of a later step) has started after
        it; then it stays true. In one process a signal that arrives after the save of ``step`` started
        counts too (that save holds the state of ``step``); across ranks only agreed preemptions count, so
        every rank answers alike."""
        step = _index(step)
        if (
            self._preempt_step is None
            and self._signals != self._seen
            and self._last_step is not None
            and step <= self._last_step
            and self._coordinator().world_size == 1
        ):
            self._seen = self._signals
            self._preempt_step = self._last_step
        return self._preempt_step is not None and step >= self._preempt_step

    def started(self, step: int) -> None:
        """A save of ``step`` has started (on this rank)."""
        self._last_step = step
        self._since = self.clock()
        if not self._preempting and self._signals != self._seen and self._coordinator().world_size == 1:
            self._seen = self._signals  # a signal before this save, not yet seen by should_save: covered
            self._preempting = True
        if self._preempting:
            self._preempting = False
            self._preempt_step = step

    # --- signal handlers ----------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise CkptStoreError(
                "save_on_preemption=True installs signal handlers, which Python allows only in the main "
                "thread: create the store (and call should_save after close()) in the main thread"
            )
        sigs = self.policy.preemption_signals
        previous = {s: signal.getsignal(s) for s in sigs}
        handler = _Handler(self, previous)
        done: list[int] = []
        try:
            for s in sigs:
                signal.signal(s, handler)
                done.append(s)
        except (OSError, ValueError) as e:
            for s in done:
                signal.signal(s, _restorable(previous[s], s))
            raise CkptStoreError(f"cannot install a handler for signal {s}: {e}") from e
        self._handler = handler

    def close(self) -> None:
        """Restore the signal handlers this object replaced (where its handler is still the one installed;
        where another was installed over it, that one keeps calling it, and it passes the signal on)."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        handler.decisions = None
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "CheckpointStore.close() off the main thread cannot restore the signal handlers of "
                "save_on_preemption; the first signal will restore them (and act as they would)",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for s, prev in handler.previous.items():
            if signal.getsignal(s) is handler:
                signal.signal(s, _restorable(prev, s))


def _restorable(handler: Any, signum: int) -> Any:
    """What ``signal.signal`` can put back: a closed handler's predecessor; SIG_DFL for a handler that was
    not installed from Python (``getsignal`` gives None)."""
    handler = _unwrap(handler, signum)
    return signal.SIG_DFL if handler is None else handler


def _index(step: Any) -> int:
    if isinstance(step, bool):
        raise CkptStoreError(f"step must be an int, got {step!r}")
    try:
        return operator.index(step)
    except TypeError:
        raise CkptStoreError(f"step must be an int, got {step!r}") from None
