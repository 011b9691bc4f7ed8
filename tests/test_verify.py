"""Integrity: CheckpointStore.verify, ``ckptstore verify``, checksums on restore (the default) and
``restore(fallback=True)``, on local disk, memory:// and S3."""

from __future__ import annotations

import warnings

import fsspec
import numpy as np
import pytest

import ckptstore
from ckptstore.cli import main
from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError, CorruptCheckpointWarning
from tests.conftest import Location
from tests.faults import check_state, state_of


def _fs(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(location.url, **location.storage_options)  # type: ignore[no-any-return]


def tensor_path(location: Location, step: int) -> str:
    fs, root = _fs(location)
    (path,) = [p for p in fs.find(f"{root}/step_{step:08d}") if p.endswith(".safetensors")]
    return str(path)


def damage(location: Location, step: int, how: str, at: int = -40) -> str:
    """Damage step's tensor file: "flip" a bit of tensor model/b, "truncate" or "remove" it; return its name."""
    fs, _ = _fs(location)
    path = tensor_path(location, step)
    data = bytearray(fs.cat_file(path))
    fs.rm_file(path)
    if how == "flip":
        data[at] ^= 0x01  # -40: inside "model/b", whose 64 bytes come just before the last 16 ("rng")
        fs.pipe_file(path, bytes(data))
    elif how == "truncate":
        fs.pipe_file(path, bytes(data[:-7]))
    return path.rsplit("/", 1)[-1]


#: Local disk, memory:// and S3 (moto over HTTP).
LOCAL_MEMORY_S3 = pytest.mark.parametrize("location", ["local", "memory", "s3"], indirect=True)


@pytest.fixture
def store(location: Location) -> ckptstore.CheckpointStore:
    s = location.store()
    for step in (1, 2, 3):
        s.save(step, state_of(step))
    return s


@LOCAL_MEMORY_S3
def test_verify_intact(store: ckptstore.CheckpointStore) -> None:
    assert store.verify() == [1, 2, 3]
    assert store.verify(2) == [2]
    with pytest.raises(CheckpointNotFoundError):
        store.verify(7)


@pytest.mark.parametrize("how", ["flip", "truncate", "remove"])
@LOCAL_MEMORY_S3
def test_damage_is_named(location: Location, store: ckptstore.CheckpointStore, how: str, record_property) -> None:
    name = damage(location, 3, how)
    expected = {"flip": "tensor 'model/b' fails its checksum", "truncate": "truncated", "remove": "missing"}[how]
    for read in (lambda: store.verify(3), store.verify, lambda: store.restore(3)):
        with pytest.raises(CorruptCheckpointError, match=f"{name}.*{expected}"):
            read()
        record_property("corruptions_detected", 1)
    assert store.verify(2) == [2]


@LOCAL_MEMORY_S3
def test_verify_names_every_damaged_step(location: Location, store: ckptstore.CheckpointStore) -> None:
    a = damage(location, 1, "flip")
    b = damage(location, 3, "truncate")
    with pytest.raises(CorruptCheckpointError, match=f"2 damaged checkpoint.*{a}.*{b}"):
        store.verify()


@LOCAL_MEMORY_S3
def test_checksums_are_checked_on_restore_by_default(location: Location, store: ckptstore.CheckpointStore) -> None:
    damage(location, 3, "flip")
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.restore()
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        ckptstore.restore(store.info(3).path, storage_options=location.storage_options or None)
    state = store.restore(verify=False)  # skipping the check: the flipped bit comes back, silently
    assert not np.array_equal(state["model"]["b"], np.arange(16, dtype=np.float32) + 3)


@LOCAL_MEMORY_S3
def test_fallback_restores_the_newest_intact(location: Location, store: ckptstore.CheckpointStore) -> None:
    damage(location, 3, "flip")
    damage(location, 2, "remove")
    with pytest.warns(CorruptCheckpointWarning, match=r"restored step 1 .*step 3: .*checksum.*step 2: .*missing"):
        state = store.restore(fallback=True)
    check_state(1, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_state(1, store.restore(1, fallback=True))  # intact: no warning
    damage(location, 1, "truncate")
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint at or before step 3"):
        store.restore(fallback=True)


@LOCAL_MEMORY_S3
def test_fallback_leaves_like_untouched_by_damaged_checkpoints(
    location: Location, store: ckptstore.CheckpointStore
) -> None:
    torch = pytest.importorskip("torch")

    class Holder:
        """A stateful object that records what it was loaded with."""

        def __init__(self) -> None:
            self.loaded: list[int] = []

        def state_dict(self) -> dict[str, object]:
            return {"step": 0, "t": torch.zeros(2)}

        def load_state_dict(self, state: dict[str, object]) -> None:
            self.loaded.append(int(state["step"]))  # type: ignore[call-overload]

    for step in (4, 5):
        store.save(step, {"h": {"step": step, "t": np.full(2, step, np.float32)}, "x": np.arange(3)})
    damage(location, 5, "flip", at=-1)
    holder = Holder()
    with pytest.warns(CorruptCheckpointWarning):
        out = store.restore(like={"h": holder, "x": np.zeros(3)}, fallback=True)
    assert holder.loaded == [4] and out["h"] is holder  # loaded once, from the intact checkpoint


@LOCAL_MEMORY_S3
def test_cli_verify(location: Location, store: ckptstore.CheckpointStore, capsys: pytest.CaptureFixture[str]) -> None:
    opts = [a for k, v in location.storage_options.items() for a in ("-o", f"{k}={_json(v)}")]
    assert main(["verify", location.url, *opts]) == 0
    assert capsys.readouterr().out.count(" ok ") == 3
    name = damage(location, 2, "flip")
    assert main(["verify", location.url, *opts]) == 1
    out = capsys.readouterr()
    assert "step_00000002  DAMAGED" in out.out and name in out.out and "1 of 3" in out.err
    assert main(["verify", location.url, "--step", "3", *opts]) == 0
    assert main(["verify", location.url, "--step", "2", *opts]) == 1
    assert main(["verify", store.info(2).path, *opts]) == 1  # one checkpoint directory
    assert main(["verify", store.info(1).path, *opts]) == 0
    capsys.readouterr()
    assert main(["verify", location.url, "--step", "9", *opts]) == 1
    assert "step_00000009" in capsys.readouterr().out


def _json(v: object) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)


def test_cli_verify_of_an_empty_store_fails(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no committed checkpoint" in capsys.readouterr().err


def test_docs_example_runs(tmp_path) -> None:
    """The example in docs/reliability.md, as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    exec(compile(code, "docs/reliability.md", "exec"), {"root": str(tmp_path / "run")})
