"""Environment overrides of knobs (read once, at import; bad values and unknown names: test_knobs_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def knob(env: dict[str, str], name: str) -> subprocess.CompletedProcess[str]:
    code = f"import ckptstore; print(repr(ckptstore.knobs.current.{name}))"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(("raw", "expected"), [("0", "False"), ("off", "False"), ("TRUE", "True"), ("1", "True")])
def test_boolean_override(raw: str, expected: str) -> None:
    out = knob({"CKPTSTORE_ASYNC_KEEP_SNAPSHOT": raw}, "async_keep_snapshot")
    assert out.returncode == 0 and out.stdout.strip() == expected


def test_numeric_override_and_bad_values() -> None:
    assert knob({"CKPTSTORE_CHUNK_BYTES": "4096"}, "chunk_bytes").stdout.strip() == "4096"
    for env, name in (
        ({"CKPTSTORE_CHUNK_BYTES": "lots"}, "chunk_bytes"),
        ({"CKPTSTORE_ASYNC_KEEP_SNAPSHOT": "maybe"}, "async_keep_snapshot"),
    ):
        # The import succeeds; reading the knob fails, naming the variable (tests/test_knobs_env.py).
        out = knob(env, name)
        assert out.returncode != 0 and "ConfigError" in out.stderr and next(iter(env)) in out.stderr
