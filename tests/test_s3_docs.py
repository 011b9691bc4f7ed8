"""The S3-compatible example of docs/storage.md runs as written against the test S3 server."""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import numpy as np

import ckptstore
from tests import s3server
from tests.conftest import Location

DOC = Path(__file__).resolve().parent.parent / "docs" / "storage.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_s3_compatible_example_runs(s3_url: Location, s3_server: s3server.Server, capsys) -> None:  # type: ignore[no-untyped-def]
    code = next(b for b in blocks() if "endpoint_url" in b)
    code = "\n".join(line for line in code.splitlines() if "AWS:" not in line)  # no real AWS in tests
    bucket = s3_url.url.split("/")[2]
    env = {"ckptstore": ckptstore, "np": np, "bucket": bucket, "endpoint": s3_server.endpoint}
    env.update(key=s3server.ACCESS_KEY, secret=s3server.SECRET_KEY)
    exec(compile(code, str(DOC), "exec"), env)
    assert env["store"].steps() == [1]  # type: ignore[attr-defined]
    assert "'w': array([0., 1., 2., 3.])" in capsys.readouterr().out


def test_fsspec_storage_example_runs(tmp_path: Path) -> None:
    code = next(b for b in blocks() if "FsspecStorage(" in b)
    env = {"ckptstore": ckptstore, "fsspec": fsspec, "path": tmp_path / "run"}
    exec(compile(code, str(DOC), "exec"), env)
    store = env["store"]
    store.save(1, {"w": np.arange(3)})  # type: ignore[attr-defined]
    assert store.steps() == [1]  # type: ignore[attr-defined]
    assert (tmp_path / "run" / "step_00000001" / "manifest.msgpack").exists()
