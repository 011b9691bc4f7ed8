"""The ``ckptstore`` command, what a user meets first: ``python -m ckptstore``, ``--version``, examples in
``--help``, ``--json`` for ``ls`` and ``show`` (on intact, damaged and hostile stores), ``rm`` and ``prune``
honouring readers' pins, ``ls`` of a path that does not exist, ``verify`` of a step that is not there."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

import ckptstore
from ckptstore import leases
from ckptstore.cli import _COMMANDS, build_parser, main
from ckptstore.manifest import EXT_BIGINT, EXT_TUPLE
from tests.conftest import Location


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str) -> Any:
    """``text`` parsed as strict JSON: NaN and Infinity (which json.dumps writes by default) are refused."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m ckptstore ARGV`` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTSTORE_")}
    return subprocess.run(
        [sys.executable, "-m", "ckptstore", *argv], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture
def store_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root)
    for step in range(1, 7):
        store.save(step, {"w": np.full(4, step, np.float32), "n": step}, metadata={"loss": 1 / step, "k": [step]})
    return root


def steps(root: pathlib.Path | str) -> list[int]:
    return ckptstore.CheckpointStore(root).steps()


def edit_manifest(step_dir: pathlib.Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = step_dir / "manifest.msgpack"
    doc = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    change(doc)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))


def ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


# --- python -m ckptstore, --version, --help ------------------------------------------------------------


def test_python_m_ckptstore(store_dir: pathlib.Path) -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ckptstore {ckptstore.__version__}", done.stderr
    assert ckptstore.__version__ == importlib.metadata.version("ckptstore")  # the code and its metadata agree
    done = cli("ls", str(store_dir))
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["1", "2", "3", "4", "5", "6"]
    done = cli("ls", str(store_dir / "nothing"), "--json")
    assert done.returncode == 1 and done.stdout == "" and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = cli()
    assert done.returncode == 2 and "usage: ckptstore" in done.stderr  # the program's name, not __main__.py


def test_help_has_examples_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out
    for name in ("ls", "show", "verify", "watch", "rm", "prune", "export"):
        assert f"ckptstore {name} " in out, name  # the top-level examples show every subcommand
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subcommands) == set(_COMMANDS) == {"ls", "show", "verify", "watch", "rm", "prune", "export"}
    for name in subcommands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0, name
        examples = out[out.index("examples:") :]
        # Examples are kept as written (RawDescriptionHelpFormatter): each on its own line.
        assert f"\n  ckptstore {name} ckpts/run1" in examples or f"\n  ckptstore {name} s3://" in examples, name


# --- ls and show --json ---------------------------------------------------------------------------------


def test_ls_json(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    code, out, err = run(capsys, "ls", str(store_dir), "--json")
    assert code == 0 and err == ""
    records = strict_json(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    store = ckptstore.CheckpointStore(store_dir)
    for r in records:
        info = store.info(r["step"])
        assert r["path"] == info.path and r["created"] == info.created and r["bytes"] == info.nbytes > 0
        assert r["metadata"] == {"loss": 1 / r["step"], "k": [r["step"]]}
        assert r["state"] == "ok" and r["problems"] == []
        iso = datetime.datetime.fromisoformat(r["created_iso"])
        assert iso.tzinfo is not None and iso.timestamp() == pytest.approx(info.created, abs=1)
    code, out, _ = run(capsys, "ls", str(store_dir.parent / "empty-but-there"), "--json")
    assert code == 1  # nothing there
    (store_dir.parent / "empty-but-there").mkdir()
    code, out, _ = run(capsys, "ls", str(store_dir.parent / "empty-but-there"), "--json")
    assert code == 0 and strict_json(out) == []


HOSTILE_METADATA = {
    b"raw": b"\x00\xff",  # a bytes key and value
    ext(EXT_TUPLE, [1, 2]): "tuple key",
    1.5: "float key",
    None: "None key",
    "nan": float("nan"),
    "inf": float("-inf"),
    "big": msgpack.ExtType(EXT_BIGINT, str(2**70).encode()),  # payload: the decimal digits
    "huge": msgpack.ExtType(EXT_BIGINT, b"9" * 400),
    "esc\x1b[2J": "\x1b]0;pwned\x07",
    1: "int key",
    "1": "str key with the same text",
}


def test_ls_and_show_json_of_hostile_values(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    edit_manifest(store_dir / "step_00000002", lambda d: d.update(metadata=HOSTILE_METADATA, created=1e300))
    year_10000 = 253402300800.0 + 86400
    edit_manifest(store_dir / "step_00000003", lambda d: d.update(created=year_10000))
    (store_dir / "step_00000004" / "manifest.msgpack").write_bytes(b"\xc1garbage")
    code, out, err = run(capsys, "ls", str(store_dir), "--json")
    assert code == 1 and "Traceback" not in err and "\x1b" not in out
    records = {r["step"]: r for r in strict_json(out)}
    assert list(records) == [1, 2, 3, 4, 5, 6]  # every step listed
    assert {s for s, r in records.items() if r["state"] == "damaged"} == {2, 3, 4}
    meta = records[2]["metadata"]
    assert meta["b'raw'"] == "b'\\x00\\xff'" and meta["(1, 2)"] == "tuple key" and meta["1.5"] == "float key"
    assert meta["null"] == "None key" and meta["nan"] == "nan" and meta["inf"] == "-inf"
    assert meta["big"] == str(2**70) and meta["huge"] == "9" * 400  # past 64 bits: text, every digit
    assert meta["esc\x1b[2J"] == "\x1b]0;pwned\x07"  # kept, escaped in the JSON text
    assert meta["1"] == "str key with the same text" and meta["1 (int)"] == "int key"  # no key lost
    assert records[2]["created"] == 1e300 and records[2]["created_iso"] is None
    assert any("creation time" in p for p in records[2]["problems"])
    assert records[3]["created"] == year_10000 and records[3]["created_iso"] is None
    assert records[4]["created"] is None and "manifest.msgpack" in records[4]["problems"][0]
    assert records[1]["state"] == "ok" and records[1]["metadata"] == {"loss": 1.0, "k": [1]}

    code, out, err = run(capsys, "show", str(store_dir), "--step", "2", "--json")
    assert code == 1 and "Traceback" not in err and "\x1b" not in out
    doc = strict_json(out)
    assert doc["step"] == 2 and doc["state"] == "damaged" and doc["metadata"]["big"] == str(2**70)
    assert {leaf["path"]: leaf for leaf in doc["leaves"]} == {
        "state['w']": {"path": "state['w']", "kind": "tensor", "dtype": "F32", "shape": [4]},
        "state['n']": {"path": "state['n']", "kind": "value", "value": 2},
    }
    code, out, err = run(capsys, "show", str(store_dir), "--step", "4", "--json")
    assert code == 1 and out == "" and "manifest.msgpack" in err and "Traceback" not in err


def test_show_json(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    store = ckptstore.CheckpointStore(tmp_path / "run")
    state = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "x": np.float32(1.5), "t": (1, "b"), "e": []}
    info = store.save(9, state, metadata={"note": "hi"})
    code, out, err = run(capsys, "show", str(tmp_path / "run"), "--json")
    assert code == 0 and err == ""
    doc = strict_json(out)
    assert doc["path"] == info.path and doc["step"] == 9 and doc["created"] == info.created
    assert doc["metadata"] == {"note": "hi"} and doc["state"] == "ok" and doc["problems"] == []
    assert doc["files"] == 1 and doc["tensors"] == 1 and doc["bytes"] == info.nbytes
    leaves = {leaf["path"]: leaf for leaf in doc["leaves"]}
    assert leaves["state['a']"] == {"path": "state['a']", "kind": "tensor", "dtype": "I16", "shape": [2, 3]}
    assert leaves["state['x']"]["kind"] == "scalar" and "1.5" in leaves["state['x']"]["value"]
    assert leaves["state['t'][0]"]["value"] == 1 and leaves["state['t'][1]"]["value"] == "b"
    assert leaves["state['e']"] == {"path": "state['e']", "kind": "value", "value": []}


# --- ls of nothing, verify of a missing step --------------------------------------------------------------


def test_ls_of_a_path_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, memory_url: Location
) -> None:
    for url in (str(tmp_path / "nothing"), memory_url.url):
        code, out, err = run(capsys, "ls", url)
        assert code == 1 and out == "" and "does not exist" in err and "Traceback" not in err, url
    assert not (tmp_path / "nothing").exists()
    memory_url.store().save(1, {"a": np.ones(2)})
    code, out, _ = run(capsys, "ls", memory_url.url, "--json")
    assert code == 0 and [r["step"] for r in strict_json(out)] == [1]


def test_verify_of_a_missing_step(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    code, out, err = run(capsys, "verify", str(store_dir), "--step", "99")
    assert code == 1 and "DAMAGED" not in out + err
    assert out.split()[:2] == ["step_00000099", "missing"] and "1 of 1 checkpoint(s) missing" in err
    code, out, _ = run(capsys, "verify", str(store_dir), "--step", "3")
    assert code == 0 and out.split()[:2] == ["step_00000003", "ok"]
    (store_dir / "step_00000003" / "manifest.msgpack").write_bytes(b"\xc1")
    code, out, _ = run(capsys, "verify", str(store_dir), "--step", "3")
    assert code == 1 and out.split()[:2] == ["step_00000003", "DAMAGED"]  # damaged is still damaged


# --- rm ----------------------------------------------------------------------------------------------------


def test_rm_deletes_and_refuses_a_pinned_step(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    reader = ckptstore.CheckpointStore(store_dir)
    with reader.pin(2):
        code, out, err = run(capsys, "rm", str(store_dir), "1", "2", "3")
        assert code == 1
        assert out.splitlines() == [f"deleted {store_dir / 'step_00000001'}", f"deleted {store_dir / 'step_00000003'}"]
        assert f"not deleting {store_dir / 'step_00000002'}: a reader pins it" in err and "--force" in err
        assert steps(store_dir) == [2, 4, 5, 6]
        assert reader.restore(2)["n"] == 2  # the reader's checkpoint is whole
    code, out, err = run(capsys, "rm", str(store_dir), "2")  # released: deleted
    assert code == 0 and out == f"deleted {store_dir / 'step_00000002'}\n" and err == ""
    assert steps(store_dir) == [4, 5, 6]
    assert [n for n in leases.LeaseDir(reader.storage).names() if not n.endswith(".lease")] == []  # no mark left


def test_rm_dry_run_force_and_missing(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    reader = ckptstore.CheckpointStore(store_dir)
    with reader.pin(5):
        code, out, err = run(capsys, "rm", str(store_dir), "4", "5", "--dry-run")
        assert code == 1 and out == f"would delete {store_dir / 'step_00000004'}\n"
        assert "would not delete" in err and "step_00000005" in err
        assert steps(store_dir) == [1, 2, 3, 4, 5, 6]  # nothing deleted
        code, out, err = run(capsys, "rm", str(store_dir), "5", "--dry-run", "--force")
        assert code == 0 and out.startswith(f"would delete {store_dir / 'step_00000005'}") and "pinned" in out
        assert steps(store_dir) == [1, 2, 3, 4, 5, 6]
        code, out, err = run(capsys, "rm", str(store_dir), "5", "--force")  # CheckpointStore.delete: pins ignored
        assert code == 0 and out.startswith(f"deleted {store_dir / 'step_00000005'}") and err == ""
        assert steps(store_dir) == [1, 2, 3, 4, 6]
    code, out, err = run(capsys, "rm", str(store_dir), "77", "6", "6")
    assert code == 1 and out == f"deleted {store_dir / 'step_00000006'}\n"  # the others still go, once
    assert f"no committed checkpoint at {store_dir / 'step_00000077'}" in err
    assert steps(store_dir) == [1, 2, 3, 4]
    code, _, err = run(capsys, "rm", str(store_dir), "-3")
    assert code == 1 and "not a step" in err
    code, _, err = run(capsys, "rm", str(store_dir / "nothing"), "1")
    assert code == 1 and "no committed checkpoint" in err and not (store_dir / "nothing").exists()
    with pytest.raises(SystemExit) as e:
        main(["rm", str(store_dir)])  # no step
    assert e.value.code == 2


def test_rm_refuses_a_step_pinned_by_another_process(store_dir: pathlib.Path) -> None:
    with ckptstore.pin(store_dir / "step_00000003"):  # this process pins; the command runs in another
        done = cli("rm", str(store_dir), "3", "4")
    assert done.returncode == 1 and "a reader pins it" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == f"deleted {store_dir / 'step_00000004'}\n"
    assert steps(store_dir) == [1, 2, 3, 5, 6]


# --- prune ---------------------------------------------------------------------------------------------------


def test_prune_honours_pins_and_policies(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    reader = ckptstore.CheckpointStore(store_dir)
    with reader.pin(2):
        code, out, err = run(
            capsys, "prune", str(store_dir), "--keep-last", "2", "--keep-every-n-steps", "3", "--dry-run"
        )
        assert code == 0 and err == ""
        assert out.splitlines()[0] == f"would delete {store_dir / 'step_00000001'}"
        assert out.splitlines()[1].startswith(f"would keep {store_dir / 'step_00000002'}: a reader pins it")
        assert out.splitlines()[2:] == [f"would delete {store_dir / 'step_00000004'}"]
        assert steps(store_dir) == [1, 2, 3, 4, 5, 6]  # a dry run deletes nothing

        code, out, err = run(capsys, "prune", str(store_dir), "--keep-last", "2", "--keep-every-n-steps", "3")
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert (
            lines[0] == f"deleted {store_dir / 'step_00000001'}"
            and lines[2] == f"deleted {store_dir / 'step_00000004'}"
        )
        assert lines[1].startswith(f"kept {store_dir / 'step_00000002'}: a reader pins it") and len(lines) == 3
        assert steps(store_dir) == [2, 3, 5, 6]  # 3 and 6: every third step; 5 and 6: the last two; 2: pinned
    code, out, _ = run(capsys, "prune", str(store_dir), "--keep-last", "1")
    assert code == 0 and steps(store_dir) == [6]
    assert out.splitlines() == [f"deleted {store_dir / f'step_{s:08d}'}" for s in (2, 3, 5)]
    code, out, _ = run(capsys, "prune", str(store_dir), "--keep-last", "1")
    assert code == 0 and out == ""  # nothing left to delete


def test_prune_of_nothing_and_bad_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, memory_url: Location
) -> None:
    code, out, err = run(capsys, "prune", str(tmp_path / "nothing"), "--keep-last", "1")
    assert code == 1 and out == "" and "does not exist" in err
    assert not (tmp_path / "nothing").exists()  # not created by the store lock
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "prune", str(tmp_path / "empty"), "--keep-last", "1")
    assert code == 0 and out == "" and err == ""
    for argv in (
        ["--keep-last", "0"],
        ["--keep-last", "x"],
        ["--keep-last", "1", "--keep-every-n-hours", "nan"],
        ["--keep-last", "1", "--keep-every-n-steps", "-2"],
    ):
        with pytest.raises(SystemExit) as e:
            main(["prune", str(tmp_path / "empty"), *argv])
        assert e.value.code == 2, argv
    capsys.readouterr()
    for argv in ([], ["--keep-best", "2"], ["--keep-last", "1", "--best-metric", "loss"]):  # nothing, or half
        code, out, err = run(capsys, "prune", str(tmp_path / "empty"), *argv)
        assert code == 2 and out == "" and "ckptstore prune:" in err, argv
    store = memory_url.store()  # an object store's protocol (no store-wide lock, manifest-last)
    for s in (1, 2, 3):
        store.save(s, {"a": np.full(2, s)})
    with store.pin(1):
        code, out, _ = run(capsys, "prune", memory_url.url, "--keep-last", "1")
    assert code == 0 and store.steps() == [1, 3] and out.splitlines()[0].startswith(f"kept {store.info(1).path}: ")


def test_prune_keep_every_n_hours(capsys: pytest.CaptureFixture[str], store_dir: pathlib.Path) -> None:
    # Saved within a second: one per hour keeps the oldest; the newest by --keep-last.
    argv = ["prune", str(store_dir), "--keep-last", "1", "--keep-every-n-hours", "1"]
    code, out, _ = run(capsys, *argv, "--dry-run")
    assert code == 0 and out.splitlines() == [f"would delete {store_dir / f'step_{s:08d}'}" for s in (2, 3, 4, 5)]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.splitlines() == [f"deleted {store_dir / f'step_{s:08d}'}" for s in (2, 3, 4, 5)]
    assert steps(store_dir) == [1, 6]


def test_prune_keep_best(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    """The issue's table: max_to_keep=2, keep_best=2 (min) over these losses keeps [2, 4, 7, 8]."""
    store = ckptstore.CheckpointStore(tmp_path / "run")
    losses = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.95, 8: 0.85}
    for step, loss in losses.items():
        store.save(step, {"a": np.full(2, step)}, metadata={"val_loss": loss})
    argv = ["prune", str(tmp_path / "run"), "--keep-last", "2", "--keep-best", "2", "--best-metric", "val_loss"]
    code, out, _ = run(capsys, *argv, "--dry-run")
    assert code == 0 and out.count("would delete") == 4 and store.steps() == list(losses)
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.count("deleted") == 4
    assert store.steps() == [2, 4, 7, 8]
    code, out, _ = run(capsys, "prune", str(tmp_path / "run"), "--keep-best", "1", "--best-metric", "val_loss")
    assert code == 0 and store.steps() == [4, 8]  # the best and the newest
