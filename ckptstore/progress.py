"""Progress of long reads and writes (verify, export, restore), counted in bytes.

A caller of an API that takes ``progress=`` passes one of:

- ``None`` or ``False``: nothing is shown (the default of every API);
- ``True``: a tqdm bar on stderr, only when stderr is a terminal and tqdm is installed (the
  ``ckptstore[progress]`` extra); otherwise nothing (without tqdm, a debug log says why);
- a function ``report(done_bytes, total_bytes)``, called after each piece of work, from whichever thread
  did it, one call at a time (it should return quickly, and must not call back into the progress);
- a :class:`Progress`: the same counter across several calls (one bar for a whole command); each call
  adds its own bytes to the total, and the owner closes it.

The code doing the work counts through a :class:`Progress` (:func:`scope` makes one from the argument): it
calls :meth:`Progress.advance` with the bytes it just finished, from any thread. Nothing here imports
tqdm until a bar is asked for: ``import ckptstore`` never does.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

from .errors import ConfigError

__all__ = ["Progress", "ProgressArg", "bar", "scope"]

log = logging.getLogger(__name__)

#: ``report(done_bytes, total_bytes)``.
Report: TypeAlias = Callable[[int, int], None]
#: What an API's ``progress=`` argument accepts (see the module's docstring).
ProgressArg: TypeAlias = "bool | Report | Progress | None"


class Progress:
    """A thread-safe byte counter that reports to a tqdm bar, to a function, or to nothing.

    ``advance(n)`` may be called from any number of threads at once; the counter and the reports are
    updated under one lock, so a report function sees ``done`` grow monotonically, and never past the
    total unless the work itself overruns its announced size.
    """

    def __init__(
        self, total: int = 0, report: Report | None = None, *, make_bar: Callable[[int], Any] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._report = report
        #: ``make_bar(total)``: the tqdm bar, made once there is work to show (its clock starts then).
        self._make_bar = make_bar
        self._bar: Any = None
        self._closed = False
        if total > 0:
            self._start_bar()

    def _start_bar(self) -> None:
        if self._bar is None and self._make_bar is not None and not self._closed:
            self._bar = self._make_bar(self._total)

    @property
    def done(self) -> int:
        """Bytes done so far."""
        return self._done

    @property
    def total(self) -> int:
        """Bytes announced so far."""
        return self._total

    @property
    def shown(self) -> bool:
        """Whether a bar is on the terminal now."""
        return self._bar is not None and not self._closed

    def add_total(self, nbytes: int) -> None:
        """Announce ``nbytes`` more bytes of work (a call that joins a counter made by its caller)."""
        with self._lock:
            self._total += nbytes
            if self._bar is None:
                if self._total > 0:
                    self._start_bar()
            elif not self._closed:
                self._bar.total = self._total
                self._bar.refresh()

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more bytes done; safe to call from worker threads."""
        if nbytes <= 0:
            return
        with self._lock:
            self._done += nbytes
            if self._closed:
                return
            self._start_bar()
            if self._bar is not None:
                self._bar.update(nbytes)
            if self._report is not None:
                self._report(self._done, self._total)

    def close(self) -> None:
        """Stop reporting (the bar is finished and, unless it was made to stay, cleared). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(desc: str, total: int = 0, *, force: bool = False, leave: bool = True) -> Progress:
    """A :class:`Progress` shown as a tqdm bar on stderr, in bytes: when stderr is a terminal (or ``force``)
    and tqdm can be imported; otherwise a counter that shows nothing. The bar appears once there is work
    (a total or an advance), so a caller may make it before it knows the total. ``leave=False`` clears the
    bar when it closes (one bar per item of a list whose lines are printed after it)."""
    if not force and not _is_tty(sys.stderr):
        return Progress(total)
    try:
        from tqdm import tqdm
    except ImportError:
        log.debug("no progress bar: tqdm is not installed (pip install 'ckptstore[progress]')")
        return Progress(total)

    def make_bar(n: int) -> Any:
        return tqdm(
            total=n,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=leave,
            dynamic_ncols=True,
        )

    return Progress(total, make_bar=make_bar)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # replaced by an object without isatty, or closed
        return False


@contextlib.contextmanager
def scope(progress: ProgressArg, total: int, desc: str, *, leave: bool = True) -> Iterator[Progress]:
    """The :class:`Progress` for one call's work of ``total`` bytes, from the caller's ``progress=``
    argument (see the module's docstring); closed at the end unless the caller passed its own.

    Raises:
        ConfigError: ``progress`` is none of the accepted kinds.
    """
    if isinstance(progress, Progress):
        progress.add_total(total)
        yield progress  # the caller's: it closes it
        return
    if progress is None or progress is False:
        made = Progress(total)
    elif progress is True:
        made = bar(desc, total, leave=leave)
    elif callable(progress):
        made = Progress(total, progress)
    else:
        raise ConfigError(
            f"progress must be True, False, None, a function (done_bytes, total_bytes) or a "
            f"ckptstore.progress.Progress, got a {type(progress).__name__}"
        )
    with made:
        yield made
