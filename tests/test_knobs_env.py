"""Knobs from the environment: an unknown ``CKPTSTORE_*`` variable is warned about once, with the closest
knob's name; an invalid value never fails ``import ckptstore`` but raises ``ConfigError`` (naming the variable
and its value) when that knob is read."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.cli import main
from ckptstore.errors import CkptStoreError, ConfigError


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with only these CKPTSTORE_* variables set."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CKPTSTORE_")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, check=False
    )


IMPORT_THEN_READ = """
import ckptstore
from ckptstore.errors import ConfigError, CkptStoreError
print("imported", ckptstore.knobs.current.chunk_bytes)
try:
    ckptstore.knobs.current.io_threads
except ConfigError as e:
    assert isinstance(e, CkptStoreError) and isinstance(e, ValueError)
    print("ConfigError:", e)
"""


def test_an_invalid_value_fails_when_read_not_at_import() -> None:
    done = python(IMPORT_THEN_READ, {"CKPTSTORE_IO_THREADS": "abc"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"imported {16 << 20}"  # the other knobs read as usual
    assert lines[1].startswith("ConfigError: ") and "CKPTSTORE_IO_THREADS" in lines[1] and "'abc'" in lines[1]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr  # a known name: no warning


def test_the_command_line_starts_with_an_invalid_value(tmp_path: pathlib.Path) -> None:
    ckptstore.CheckpointStore(tmp_path / "run").save(1, {"w": np.zeros(2)})
    env = {"CKPTSTORE_MAX_MANIFEST_BYTES": "lots"}  # read by ls for each manifest
    code = "import sys, ckptstore.cli; sys.exit(ckptstore.cli.main(sys.argv[1:]))"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CKPTSTORE_")}
    done = subprocess.run(
        [sys.executable, "-c", code, "ls", str(tmp_path / "run")],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # The setting is named as the problem; the checkpoint is not called damaged, and no traceback.
    assert done.returncode == 1 and "Traceback" not in done.stderr and "DAMAGED" not in done.stdout
    assert done.stderr.startswith("ckptstore ls: ") and "CKPTSTORE_MAX_MANIFEST_BYTES='lots'" in done.stderr


def test_an_unknown_variable_is_warned_about_once_with_the_closest_name() -> None:
    code = "import ckptstore\nfor _ in range(3):\n    ckptstore.knobs.current.io_threads\nprint('ok')"
    done = python(code, {"CKPTSTORE_IO_THREAD": "8", "CKPTSTORE_CHUNK_BYTES": "4096"})
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert done.stderr.count("UserWarning") == 1
    assert "CKPTSTORE_IO_THREAD:" in done.stderr and "did you mean CKPTSTORE_IO_THREADS?" in done.stderr


def test_unknown_variables_in_process() -> None:
    with pytest.warns(UserWarning, match=r"CKPTSTORE_LEASE_TTL: .*did you mean CKPTSTORE_LEASE_TTL_S\?"):
        k = knobs._from_env({"CKPTSTORE_LEASE_TTL": "5", "CKPTSTORE_POLL_INTERVAL_S": "0.5", "HOME": "/x"})
    assert k.poll_interval_s == 0.5 and k.lease_ttl_s == knobs.Knobs().lease_ttl_s  # the typo changed nothing
    with pytest.warns(UserWarning, match=r"did you mean CKPTSTORE_HUGEPAGES\?"):
        knobs._from_env({"CKPTSTORE_hugepages": "1"})  # another case: the name is suggested all the same
    with pytest.warns(UserWarning) as record:
        knobs._from_env({"CKPTSTORE_ZZZ": "1"})
    assert len(record) == 1 and "CKPTSTORE_ZZZ" in str(record[0].message)
    assert "did you mean" not in str(record[0].message)  # nothing like it: no suggestion
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knobs._from_env({"CKPTSTORE_CHUNK_BYTES": "1", "OTHER_THING": "x"})  # known names only: silent


@pytest.mark.parametrize(
    ("var", "raw", "name"),
    [
        ("CKPTSTORE_IO_THREADS", "abc", "io_threads"),
        ("CKPTSTORE_RETRY_BASE_S", "fast", "retry_base_s"),
        ("CKPTSTORE_HUGEPAGES", "maybe", "hugepages"),
    ],
)
def test_an_invalid_value_raises_config_error_when_read(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, name: str
) -> None:
    monkeypatch.setattr(knobs, "current", knobs._from_env({var: raw}))
    assert knobs.current.chunk_bytes == knobs.Knobs().chunk_bytes
    with pytest.raises(ConfigError) as info:
        getattr(knobs.current, name)
    assert var in str(info.value) and repr(raw) in str(info.value)
    assert isinstance(info.value, CkptStoreError) and isinstance(info.value, ValueError)
    assert var in repr(knobs.current)  # repr shows what is wrong instead of raising
    # override() replaces it for a block, and keeps it invalid otherwise.
    with knobs.override(**{name: knobs.Knobs().__dict__[name]}):
        getattr(knobs.current, name)
    with knobs.override(chunk_bytes=4096):
        assert knobs.current.chunk_bytes == 4096
        with pytest.raises(ConfigError):
            getattr(knobs.current, name)


def test_a_valid_environment_gives_plain_knobs() -> None:
    k = knobs._from_env({"CKPTSTORE_IO_THREADS": "7", "CKPTSTORE_HUGEPAGES": "on"})
    assert type(k) is knobs.Knobs and k.io_threads == 7 and k.hugepages is True


def test_a_library_call_names_the_bad_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(1, {"w": np.arange(3)})
    monkeypatch.setattr(knobs, "current", knobs._from_env({"CKPTSTORE_MAX_MANIFEST_BYTES": "1e9x"}))
    with pytest.raises(ConfigError, match=r"CKPTSTORE_MAX_MANIFEST_BYTES='1e9x'"):
        store.restore(1)


def test_the_command_line_reports_a_bad_setting_not_damage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckptstore.CheckpointStore(tmp_path / "run").save(1, {"w": np.arange(3)})
    monkeypatch.setattr(knobs, "current", knobs._from_env({"CKPTSTORE_MAX_MANIFEST_BYTES": "big"}))
    for argv in (["ls"], ["ls", "--json"], ["verify"], ["verify", "--step", "1"]):
        assert main([argv[0], str(tmp_path / "run"), *argv[1:]]) == 1, argv
        out, err = capsys.readouterr()
        assert "DAMAGED" not in out and '"damaged"' not in out, argv
        assert f"ckptstore {argv[0]}: CKPTSTORE_MAX_MANIFEST_BYTES='big'" in err, (argv, err)
