"""The ``ckptstore`` command: ``ls`` and ``show`` (in process through ``main``, and the installed console
script once)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.cli import main
from tests.conftest import Location


class Pair(NamedTuple):
    a: int
    b: float


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root)
    state = {
        "w": np.zeros((2, 3), np.float32),
        "model": torch.nn.Linear(2, 1),
        "x": np.float32(1.5),
        "t": (1, "a"),
        "p": Pair(1, 2.0),
        "empty": [],
        "nested": {"bf": torch.zeros(4, dtype=torch.bfloat16), "n": None},
    }
    store.save(3, state, metadata={"loss": 0.5, "tag": "warmup"})
    store.save(10, {"z": 1}, metadata={"loss": 0.25})
    store.save(7, {"big": np.ones(2048, np.float64)})
    return root


def test_ls(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    code, out, err = run(capsys, "ls", str(store_dir))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "CREATED", "SIZE", "METADATA"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["3", "7", "10"]  # ascending steps
    by_step = {line.split()[0]: line for line in lines[1:]}
    assert json.loads(by_step["3"][by_step["3"].index("{") :]) == {"loss": 0.5, "tag": "warmup"}
    assert json.loads(by_step["10"][by_step["10"].index("{") :]) == {"loss": 0.25}
    assert "16.0 KiB" in by_step["7"] or "16.1 KiB" in by_step["7"]  # 2048 float64 plus a header
    created = ckptstore.CheckpointStore(store_dir).info(3).created
    import datetime

    assert datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S") in by_step["3"]


def test_ls_lists_committed_only(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    (store_dir / "step_00000099").mkdir()  # no manifest
    ckptstore.CheckpointStore(store_dir).delete(7)
    code, out, _ = run(capsys, "ls", str(store_dir))
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["3", "10"]


def test_ls_empty_and_missing_store(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    code, out, err = run(capsys, "ls", str(tmp_path / "nothing"))
    assert code == 1 and out == "" and "does not exist" in err and str(tmp_path / "nothing") in err
    assert not (tmp_path / "nothing").exists()  # a reader never creates the store
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "ls", str(tmp_path / "empty"))
    assert code == 0 and out.splitlines() == ["STEP  CREATED  SIZE  METADATA"] and err == ""


def test_show_latest_and_step(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    code, out, _ = run(capsys, "show", str(store_dir))
    assert code == 0
    assert "step 10" in out.splitlines()[0] and "state['z']  1" in out
    code, out, _ = run(capsys, "show", str(store_dir), "--step", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"# {store_dir / 'step_00000003'}") and "step 3" in lines[0]
    assert json.loads(lines[1].removeprefix("# metadata ")) == {"loss": 0.5, "tag": "warmup"}
    body = set(lines[2:])
    for expected in [
        "state['w']  F32 [2, 3]",
        "state['model']  <torch.nn.modules.linear.Linear>",
        "state['model']['weight']  F32 [1, 2]",
        "state['model']['bias']  F32 [1]",
        "state['x']  np.float32(1.5)",
        "state['t'][0]  1",
        "state['t'][1]  'a'",
        "state['p']['a']  1",
        "state['p']['b']  2.0",
        "state['empty']  []",
        "state['nested']['bf']  BF16 [4]",
        "state['nested']['n']  None",
    ]:
        assert expected in body, (expected, body)


def test_show_reads_no_tensor(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    for f in (store_dir / "step_00000003").glob("*.safetensors"):
        f.unlink()
    code, out, _ = run(capsys, "show", str(store_dir), "--step", "3")
    assert code == 0 and "state['w']  F32 [2, 3]" in out


def test_show_one_checkpoint_directory(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    ckptstore.save(tmp_path / "final", {"a": np.arange(5, dtype=np.int16)}, metadata={"note": "x"})
    code, out, _ = run(capsys, "show", str(tmp_path / "final"))
    assert code == 0
    assert "state['a']  I16 [5]" in out and '"note": "x"' in out


def test_show_errors(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    code, out, err = run(capsys, "show", str(store_dir), "--step", "4")
    assert code == 1 and out == ""
    assert err.startswith("ckptstore show: ") and "step_00000004" in err and "Traceback" not in err
    code, _, err = run(capsys, "show", str(tmp_path / "empty"))
    assert code == 1 and "no committed checkpoint" in err
    (store_dir / "step_00000010" / "manifest.msgpack").write_bytes(b"\x00garbage")
    code, _, err = run(capsys, "show", str(store_dir), "--step", "10")
    assert code == 1 and "manifest.msgpack" in err
    code, out, err = run(capsys, "ls", str(store_dir))
    # ls marks the damaged checkpoint, names its manifest, and still lists the others; exit status 1
    damaged = [line for line in out.splitlines() if "DAMAGED" in line]
    assert code == 1 and len(damaged) == 1 and damaged[0].split()[0] == "10" and "manifest.msgpack" in damaged[0]
    assert len(out.splitlines()) > 2 and "Traceback" not in err


def test_bad_arguments(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["show", str(store_dir), "--step", "three"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main([])
    code, _, err = run(capsys, "ls", str(store_dir), "-o", "novalue")
    assert code == 1 and "key=value" in err


def test_memory_url(capsys: pytest.CaptureFixture[str], memory_url: Location) -> None:
    store = memory_url.store()
    store.save(1, {"a": np.ones(3, np.float16)}, metadata={"k": 1})
    code, out, _ = run(capsys, "ls", memory_url.url)
    assert code == 0 and out.splitlines()[1].split()[0] == "1"
    code, out, _ = run(capsys, "show", memory_url.url)
    assert code == 0 and "state['a']  F16 [3]" in out


def test_console_script(store_dir: pathlib.Path) -> None:
    script = pathlib.Path(sys.executable).parent / "ckptstore"
    assert script.exists(), "the console script is installed with the package"
    done = subprocess.run([str(script), "ls", str(store_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["3", "7", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli", "show", str(store_dir), "--step", "99"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
