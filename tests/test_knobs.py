"""Environment overrides of knobs (read once, at import)."""

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
    for env in ({"CKPTSTORE_CHUNK_BYTES": "lots"}, {"CKPTSTORE_ASYNC_KEEP_SNAPSHOT": "maybe"}):
        out = knob(env, "chunk_bytes")
        assert out.returncode != 0 and "CkptStoreError" in out.stderr and next(iter(env)) in out.stderr
