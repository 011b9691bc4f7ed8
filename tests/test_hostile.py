"""Crafted checkpoints: each fails with CorruptCheckpointError (or is ignored, for junk directory names),
in bounded memory, without running code; and nothing on any restore path unpickles."""

from __future__ import annotations

import glob
import os
import pickle
import struct
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedTypeError
from ckptstore.manifest import EXT_SCALAR, EXT_STATEFUL, EXT_TENSOR, EXT_TUPLE

Doc = dict[str, Any]


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[ckptstore.CheckpointStore, Path]:
    """A store holding step 1: two tensors in one file, plain values; and the step's directory."""
    store = ckptstore.CheckpointStore(tmp_path / "run")
    store.save(1, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64), "n": 3})
    return store, tmp_path / "run" / "step_00000001"


def tensor_file(d: Path) -> Path:
    (path,) = glob.glob(str(d / "*.safetensors"))
    return Path(path)


def read_doc(d: Path) -> Doc:
    raw = (d / "manifest.msgpack").read_bytes()
    return msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)  # type: ignore[no-any-return]


def write_doc(d: Path, doc: Any) -> None:
    (d / "manifest.msgpack").write_bytes(msgpack.packb(doc, use_bin_type=True))


def ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def nested_ext(depth: int) -> Any:
    x: Any = ext(EXT_TENSOR, 0)
    for _ in range(depth):
        x = ext(EXT_TUPLE, [x])
    return x


def nested_list(depth: int) -> Any:
    x: Any = ext(EXT_TENSOR, 0)
    for _ in range(depth):
        x = [x]
    return x


def all_restores_fail(store: ckptstore.CheckpointStore, d: Path, match: str | None = None) -> None:
    """Every way of reading step 1 raises CorruptCheckpointError (with ``match`` in the message)."""
    for read in (
        lambda: store.restore(1),
        lambda: store.restore(1, verify=False),
        lambda: store.verify(1),
        lambda: ckptstore.restore(d),
        lambda: store.restore(fallback=True),
    ):
        with pytest.raises(CorruptCheckpointError, match=match):
            read()


# --- manifests ---------------------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _pop(key: str) -> Callable[[Doc], None]:
    return lambda doc: doc.pop(key)


BAD_NAMES = [
    "../outside.safetensors",
    "../../etc/passwd",
    "/etc/passwd",
    "a\\..\\b.safetensors",
    "a/b.safetensors",
    "x\x00.safetensors",
    "x.safetensors\n",
    "s3://bucket/x.safetensors",
    "memory://x",
    "file::s3://bucket/x",
    "x::y",
    "..",
    ".",
    "",
    "manifest.msgpack",
    "x" * 300,
    7,
    None,
]

MANIFEST_EDITS: dict[str, Callable[[Doc], None]] = {
    **{f"file name {n!r}"[:60]: _set(("files", 0, "name"), n) for n in BAD_NAMES},
    "tensors overlap": lambda doc: doc["tensors"][1].update(offset=doc["tensors"][0]["offset"]),
    "offset past the file": lambda doc: doc["tensors"][0].update(offset=doc["files"][0]["size"]),
    "offset negative": _set(("tensors", 0, "offset"), -8),
    "offset 2**64": _set(("tensors", 0, "offset"), 2**64 - 1),
    "shape disagrees with nbytes": _set(("tensors", 0, "shape"), [1000]),
    "nbytes disagrees with shape": _set(("tensors", 0, "nbytes"), 4),
    "huge shape": _set(("tensors", 0, "shape"), [2**40, 2**40]),
    "negative dimension": _set(("tensors", 0, "shape"), [-3, -4]),
    "unknown dtype": _set(("tensors", 0, "dtype"), "F128"),
    "dtype not a string": _set(("tensors", 0, "dtype"), 4),
    "file index out of range": _set(("tensors", 0, "file"), 5),
    "file size a float": _set(("files", 0, "size"), 10.0),
    "file size a bool": _set(("files", 0, "size"), True),
    "file listed twice": lambda doc: doc["files"].append(dict(doc["files"][0])),
    "checksum a string": _set(("tensors", 0, "xxh3"), "abc"),
    "step a string": _set(("step",), "1"),
    "created a string": _set(("created",), "yesterday"),
    "created infinite": _set(("created",), float("inf")),
    "writer an int": _set(("writer",), 5),
    "metadata a list": _set(("metadata",), []),
    "files a dict": _set(("files",), {}),
    "tensors missing": _pop("tensors"),
    "tensor entry a list": _set(("tensors", 0), [1, 2]),
    "format missing": _pop("format"),
    "version a string": _set(("version",), "1"),
    "version 0": _set(("version",), 0),
    "tree refers to tensor #99": _set(("tree", "w"), ext(EXT_TENSOR, 99)),
    "tree refers to tensor #-1": _set(("tree", "w"), ext(EXT_TENSOR, -1)),
    "unknown extension type": _set(("tree", "n"), msgpack.ExtType(99, b"\x00")),
    "extension payload not msgpack": _set(("tree", "n"), msgpack.ExtType(EXT_TUPLE, b"\xc1")),
    "stateful record of 3 fields": _set(("tree", "n"), ext(EXT_STATEFUL, ["a", {}, 1])),
    "numpy scalar of unknown dtype": _set(("tree", "n"), ext(EXT_SCALAR, ["Q99", b"\x00" * 8])),
    "numpy scalar of the wrong length": _set(("tree", "n"), ext(EXT_SCALAR, ["F32", b"\x00" * 3])),
    "big int of 5000 digits": _set(("tree", "n"), msgpack.ExtType(6, b"9" * 5000)),
    "big int not a number": _set(("tree", "n"), msgpack.ExtType(6, b"1e5")),
    "lists nested 150 deep": _set(("tree", "n"), nested_list(150)),
    "tuples nested 40 deep": _set(("tree", "n"), nested_ext(40)),
    # Before the nesting limit this one killed the interpreter (C stack overflow inside msgpack).
    "tuples nested 400 deep": _set(("tree", "n"), nested_ext(400)),
    "metadata nested 150 deep": _set(("metadata",), {"m": nested_list(150)}),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_crafted_manifest_is_refused(ckpt: tuple[ckptstore.CheckpointStore, Path], case: str, record_property) -> None:
    store, d = ckpt
    doc = read_doc(d)
    MANIFEST_EDITS[case](doc)
    write_doc(d, doc)
    tracemalloc.start()
    try:
        all_restores_fail(store, d, match="manifest")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{case}: {peak} bytes"
    record_property("hostile_rejected", 1)


def test_unknown_format_version_names_the_version(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, d = ckpt
    doc = read_doc(d)
    doc["version"] = 99
    write_doc(d, doc)
    with pytest.raises(UnsupportedFormatError, match=r"version 99.*reads versions 1 to 2"):
        store.restore(1)
    with pytest.raises(UnsupportedFormatError, match="upgrade ckptstore"):
        store.verify(1)


RAW_MANIFESTS: dict[str, bytes] = {
    "empty": b"",
    "not msgpack": b"\xc1\xc1\xc1 hello",
    "a JSON document": b'{"format": "ckptstore", "version": 1}',
    "array32 declaring 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map32 declaring 2**32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "str32 declaring 4 GiB": b"\xdb\xff\xff\xff\xff" + b"x" * 10,
    "bin32 declaring 4 GiB": b"\xc6\xff\xff\xff\xff" + b"x" * 10,
    "ext32 declaring 4 GiB": b"\xc9\xff\xff\xff\xff\x01" + b"x" * 10,
    "arrays nested 100000 deep": b"\x91" * 100000 + b"\xc0",
    "a pickle": pickle.dumps({"format": "ckptstore"}),
    "an int": msgpack.packb(1),
}


@pytest.mark.parametrize("case", list(RAW_MANIFESTS))
def test_malformed_manifest_bytes_are_refused(
    ckpt: tuple[ckptstore.CheckpointStore, Path], case: str, record_property
) -> None:
    store, d = ckpt
    (d / "manifest.msgpack").write_bytes(RAW_MANIFESTS[case])
    tracemalloc.start()
    try:
        all_restores_fail(store, d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{case}: {peak} bytes"
    record_property("hostile_rejected", 1)


def test_truncated_manifest_is_refused_at_every_length(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, d = ckpt
    raw = (d / "manifest.msgpack").read_bytes()
    for n in range(len(raw)):
        (d / "manifest.msgpack").write_bytes(raw[:n])
        with pytest.raises(CorruptCheckpointError):
            store.restore(1)


def test_oversized_manifest_is_not_read(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, _ = ckpt
    with knobs.override(max_manifest_bytes=64), pytest.raises(CorruptCheckpointError, match="larger than 64"):
        store.restore(1)


# --- tensor files ------------------------------------------------------------------------------------


def _header_len(value: int) -> Callable[[bytes], bytes]:
    return lambda raw: struct.pack("<Q", value) + raw[8:]


def _header(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    """Rewrite the JSON header (keeping its length, so tensor offsets stay where the manifest says)."""
    import json

    def apply(raw: bytes) -> bytes:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > n:  # make room: the metadata entry is optional
            header.pop("__metadata__", None)
            text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n, "edited header grew"
        return raw[:8] + text.ljust(n) + raw[8 + n :]

    return apply


def _replace_header_text(text: bytes) -> Callable[[bytes], bytes]:
    def apply(raw: bytes) -> bytes:
        (n,) = struct.unpack("<Q", raw[:8])
        return raw[:8] + text[:n].ljust(n) + raw[8 + n :]

    return apply


# Header damage leaves the tensor bytes where the manifest says: restore (which reads by the manifest's
# offsets and checks checksums) may succeed; verify, which checks every byte, must not.
HEADER_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "header length 2**62": _header_len(2**62),
    "header length 2**64-1": _header_len(2**64 - 1),
    "header length past the file": lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
    "header not JSON": _replace_header_text(b"{not json"),
    "header a JSON list": _replace_header_text(b"[1, 2]"),
    "header nested JSON": _replace_header_text(b"[" * 5000),
    "header dtype differs": _header(lambda h: h["w"].update(dtype="I32")),
    "header shape differs": _header(lambda h: h["w"].update(shape=[4, 3])),
    "header offsets shifted": _header(lambda h: h["w"].update(data_offsets=[o + 1 for o in h["w"]["data_offsets"]])),
    "header offsets not ints": _header(lambda h: h["w"].update(data_offsets=["0", "48"])),
    "header misses a tensor": _header(lambda h: h.pop("b")),
    "header has another tensor": _header(lambda h: h.update(z=h.pop("w"))),
    "header entry not an object": _header(lambda h: h.update(w=5)),
}


@pytest.mark.parametrize("case", list(HEADER_EDITS))
def test_crafted_safetensors_header_fails_verify(
    ckpt: tuple[ckptstore.CheckpointStore, Path], case: str, record_property
) -> None:
    store, d = ckpt
    f = tensor_file(d)
    f.write_bytes(HEADER_EDITS[case](f.read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=f.name):
        store.verify(1)
    with pytest.raises(CorruptCheckpointError, match=f.name):
        store.verify()
    from ckptstore.cli import main

    assert main(["verify", str(d.parent)]) == 1
    try:  # restore reads by the manifest; it may succeed, but only with the right bytes
        state = store.restore(1)
        assert np.array_equal(state["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    except CorruptCheckpointError:
        pass
    record_property("hostile_rejected", 1)


def test_truncated_bitflipped_and_missing_files_name_the_file(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, d = ckpt
    f = tensor_file(d)
    good = f.read_bytes()
    f.write_bytes(good[:-3])
    all_restores_fail(store, d, match=f"{f.name}.*(truncated|bytes)")
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # in tensor "b"
    f.write_bytes(bytes(flipped))
    for read in (lambda: store.restore(1), store.verify, lambda: ckptstore.restore(d)):
        with pytest.raises(CorruptCheckpointError, match=f"{f.name}: tensor 'b' fails its checksum"):
            read()
    f.unlink()
    all_restores_fail(store, d, match=f"{f.name} is missing")


def test_symlinks_are_refused(ckpt: tuple[ckptstore.CheckpointStore, Path], tmp_path: Path) -> None:
    store, d = ckpt
    f = tensor_file(d)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(f.read_bytes())  # identical bytes: refused all the same, for where they live
    f.unlink()
    f.symlink_to(outside)
    all_restores_fail(store, d, match="symlink")
    f.unlink()
    outside.rename(f)
    m = d / "manifest.msgpack"
    elsewhere = tmp_path / "manifest.msgpack"
    m.rename(elsewhere)
    m.symlink_to(elsewhere)
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        store.restore(1)


def test_special_files_are_refused(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, d = ckpt
    f = tensor_file(d)
    f.unlink()
    os.mkfifo(f)  # a reader that opened it would wait forever
    all_restores_fail(store, d, match=f.name)
    f.unlink()
    f.mkdir()
    all_restores_fail(store, d, match=f.name)


# --- names in the store root -------------------------------------------------------------------------


def test_only_exact_step_names_are_listed(ckpt: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, d = ckpt
    root = d.parent
    for junk in [
        "step_10",
        "step_000000010",
        "step_00000010x",
        "step_-0000010",
        "Step_00000010",
        "step_0000001O",
        ".step_00000010",
        "step_00000010.bak",
        " step_00000010",
        "step_\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0660",  # Arabic-Indic digits: \d, not a step
        "junk",
    ]:
        (root / junk).mkdir()
        (root / junk / "manifest.msgpack").write_bytes((d / "manifest.msgpack").read_bytes())
    (root / "step_00000007").write_bytes(b"a file, not a directory")
    assert store.steps() == [1]
    store.save(99_999_999, {"x": 1})
    store.save(100_000_000, {"x": 2})  # 9 digits: sorts after 8 digits by number, not by name
    assert store.steps() == [1, 99_999_999, 100_000_000]
    assert store.latest_step() == 100_000_000
    assert store.restore()["x"] == 2


# --- no code execution -------------------------------------------------------------------------------


def test_stateful_type_names_are_never_imported(ckpt: tuple[ckptstore.CheckpointStore, Path], monkeypatch) -> None:
    store, d = ckpt
    doc = read_doc(d)
    doc["tree"]["n"] = ext(EXT_STATEFUL, ["os.system", {"cmd": "touch /tmp/pwned"}])
    doc["tree"]["m"] = ext(EXT_STATEFUL, ["evil_module_xyz.Payload", [1, 2]])
    write_doc(d, doc)
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system called"))
    state = store.restore(1)
    assert state["n"] == {"cmd": "touch /tmp/pwned"} and state["m"] == [1, 2]
    assert "evil_module_xyz" not in sys.modules


def test_nesting_limits_hold_on_save_too(tmp_path: Path) -> None:
    """What cannot be read back is refused when saved, so a save never produces an unrestorable checkpoint."""
    store = ckptstore.CheckpointStore(tmp_path / "run")
    ok: Any = np.arange(3)
    for _ in range(32):
        ok = (ok,)
    store.save(1, {"t": ok})
    restored = store.restore(1)["t"]
    for _ in range(32):
        restored = restored[0]
    assert np.array_equal(restored, np.arange(3))
    with pytest.raises(UnsupportedTypeError, match="nest deeper than 32"):
        store.save(2, {"t": (ok,)})
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(UnsupportedTypeError, match="nest deeper than 100"):
        store.save(3, {"d": deep})
    assert store.steps() == [1]


def test_no_restore_path_unpickles(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    store = ckptstore.CheckpointStore(tmp_path / "run", max_to_keep=3)
    for s in (1, 2):
        store.save(s, {"model": model, "opt": opt, "sched": sched, "step": s, "t": (1, 2.5)})
    ckptstore.save(tmp_path / "single", {"model": model, "step": 7})

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something unpickled")

    for target, name in [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (np, "load"),
    ]:
        monkeypatch.setattr(target, name, refuse)
    import _pickle

    monkeypatch.setattr(_pickle, "loads", refuse)
    monkeypatch.setattr(_pickle, "load", refuse)

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2)
    like = {"model": fresh, "opt": fresh_opt, "sched": fresh_sched, "step": 0, "t": (0, 0.0)}
    out = store.restore(like=like)
    assert out["step"] == 2 and out["t"] == (1, 2.5)
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert fresh_sched.last_epoch == sched.last_epoch
    store.restore(1, framework="torch")
    store.restore(verify=False)
    store.restore(fallback=True)
    store.verify()
    store.info(2)
    next(iter(store.iter_new(timeout=0)))
    ckptstore.restore(tmp_path / "single", framework="torch")
    from ckptstore.cli import main

    assert main(["show", str(tmp_path / "run")]) == 0
    assert main(["verify", str(tmp_path / "run")]) == 0
