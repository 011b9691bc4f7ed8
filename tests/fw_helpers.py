"""Helpers for the framework tests: a fixed framework environment and fresh Python processes.

Keras runs on its default backend (TensorFlow) whatever the user's ``KERAS_BACKEND`` says, and
TensorFlow's C++ logging is quiet. Importing this module sets both for this process (before any test
imports Keras) and for the processes :func:`run_python` starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

FRAMEWORK_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
os.environ.update(FRAMEWORK_ENV)

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 300, expect_rc: int = 0) -> str:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = ``args``); return its stdout.

    Fails the test, showing stderr, when the process exits with another status than ``expect_rc``
    (``-9``: it killed itself with SIGKILL, as an interrupted training job).
    """
    full_env = {**os.environ, **FRAMEWORK_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"subprocess exited with {proc.returncode}, expected {expect_rc}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc.stdout


def assert_kept_after_kill(got: list[int], newest: list[int]) -> None:
    """The steps of a store whose writer (``max_to_keep=len(newest)``) was SIGKILLed: ``newest`` are
    committed, and anything older is what the retention pass after the last commit had still to delete
    when the kill came (it runs in the background; the next save's pass deletes it): never a newer step."""
    assert got[len(got) - len(newest) :] == newest, (got, newest)
    assert all(s < newest[0] for s in got[: len(got) - len(newest)]), (got, newest)
