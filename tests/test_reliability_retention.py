"""Reliability round 2 (issue 13), retention that cannot get stuck (class 3) and crashes on object storage
(class 8), shown through the public API on stores damaged as an attacker or a fault would leave them:

* a damaged manifest, or one whose creation time is absurd, with ``keep_every_n_hours``;
* foreign entries where leftovers live (a ``.tmp-…alive`` that is a directory, a FIFO or a symlink, files
  where directories belong, symlinks out of the root, unreadable entries), and in the lease directory;
* a disk out of inodes (a small tmpfs, or a model of one), a retention cut short by SIGKILL on it;
* deletion marks left by a killed retention;
* multipart uploads left open on S3 (moto) by a writer killed in the middle of one.

Rule: a damaged or foreign entry is skipped and reported once (logged), never blocks saves or retention;
retention catches up on the next save; a save that raises says truthfully whether it committed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import ckptstore
from ckptstore import knobs, leases
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError, StorageError
from ckptstore.storage import LocalStorage, step_name
from tests.conftest import Location
from tests.faults import check_state, drain, pipe, spawn, state_of

HOUR = 3600.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- helpers ----------------------------------------------------------------------------------------------


def attempt(store: ckptstore.CheckpointStore, step: int, **kw: Any) -> str | None:
    """Save ``step``; None if it returned, else the error's message, after checking that the message says
    truthfully whether the step is committed."""
    try:
        store.save(step, state_of(step, 256), **kw)
    except CkptStoreError as e:
        says_committed = "is committed" in str(e)  # "step N is committed, but ..." / "committed all the same"
        assert says_committed == (step in store.steps()), f"untruthful: {e} (steps {store.steps()})"
        return str(e)
    assert step in store.steps()
    return None


def reports(caplog: pytest.LogCaptureFixture, *words: str) -> list[str]:
    """The warnings logged so far that contain every one of ``words``."""
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [m for m in messages if all(w in m for w in words)]


def lease_names(store: ckptstore.CheckpointStore) -> list[str]:
    return sorted(leases.LeaseDir(store.storage).names())


def manifest_path(store: ckptstore.CheckpointStore, step: int) -> str:
    return os.path.join(store.url, step_name(step), "manifest.msgpack")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake wall clock (``time.time``), one hour further on each time the test says so."""
    now = [1_700_000_000.0]
    monkeypatch.setattr("time.time", lambda: now[0])
    return now


# --- (a) damaged manifests and keep_every_n_hours -----------------------------------------------------------


def _rewrite_manifest(path: str, **changes: Any) -> None:
    """Rewrite fields of a manifest (a valid msgpack document still, with the writer's other fields)."""
    import msgpack

    with open(path, "rb") as f:
        doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    doc.update(changes)
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(msgpack.packb(doc, use_bin_type=True))


def _replace(path: str, make: Callable[[str], None]) -> None:
    os.unlink(path)
    make(path)


def _write(data: bytes) -> Callable[[str], None]:
    def make(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    return make


def _truncated(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    _replace(path, _write(data[: len(data) // 2]))


#: How a manifest gets damaged, for good: each one makes reading the creation time of its step fail.
DAMAGES: dict[str, Callable[[str], None]] = {
    "garbage": lambda p: _replace(p, _write(b"\x00garbage\xff" * 10)),
    "truncated": _truncated,
    "empty": lambda p: _replace(p, _write(b"")),
    "not-msgpack-map": lambda p: _replace(p, _write(b"\x93\x01\x02\x03")),
    "newer-format": lambda p: _rewrite_manifest(p, version=99),
    "created-1e300": lambda p: _rewrite_manifest(p, created=1e300),
    "created-negative": lambda p: _rewrite_manifest(p, created=-5.0),
    "directory": lambda p: _replace(p, os.mkdir),
    "fifo": lambda p: _replace(p, os.mkfifo),
    "symlink": lambda p: _replace(p, lambda q: os.symlink("/etc/hostname", q)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_manifest_never_stops_saves_nor_hourly_retention(
    local_url: Location, clock: list[float], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's example: with keep_every_n_hours, one damaged old manifest made every later save raise
    CorruptCheckpointError (each committed all the same), and retention never ran again."""
    store = local_url.store(max_to_keep=1, keep_every_n_hours=2)
    for step in range(4):  # one save an hour: 0 and 2 kept by the hour, 3 the newest
        assert attempt(store, step) is None
        clock[0] += HOUR
    assert store.steps() == [0, 2, 3]
    DAMAGES[damage](manifest_path(store, 0))  # the oldest hourly checkpoint, the first the walk looks at
    again = local_url.store(max_to_keep=1, keep_every_n_hours=2)  # a new process: no creation time known
    for step in range(4, 9):
        assert attempt(again, step) is None, damage
        clock[0] += HOUR
    # Step 0 is left alone (neither counted nor deleted); the others are kept by the hour as if it were not
    # there: 2, then 4 and 6 (each 2 h after the one before), and the newest.
    assert again.steps() == [0, 2, 4, 6, 8]
    assert len(reports(caplog, "step 0", "left alone")) == 1  # reported once, not at every save
    for step in (2, 4, 6, 8):
        check_state(step, again.restore(step))


@pytest.mark.parametrize("location", ["local", "memory"], indirect=True)
def test_a_damaged_manifest_on_any_storage(
    location: Location, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    store = location.store(max_to_keep=2, keep_every_n_hours=3)
    for step in range(3):
        store.save(step, state_of(step, 256))
        clock[0] += HOUR
    fs, path = fsspec.core.url_to_fs(f"{location.join(step_name(1))}/manifest.msgpack")
    fs.pipe_file(path, b"\xc1 not a manifest")
    again = location.store(max_to_keep=2, keep_every_n_hours=3)
    for step in range(3, 7):
        assert attempt(again, step) is None
        clock[0] += HOUR
    assert again.steps() == [0, 1, 3, 5, 6]  # 1 left alone; 0 and 3 kept by the hour; 5 and 6 the newest
    assert len(reports(caplog, "step 1", "left alone")) == 1
    again.delete(1)  # what the report suggests: the user deletes it
    assert attempt(again, 7) is None
    assert again.steps() == [0, 3, 6, 7]


def test_a_step_whose_manifest_was_replaced_by_a_good_one_counts_again(
    local_url: Location, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    store = local_url.store(max_to_keep=1, keep_every_n_hours=2)
    for step in range(3):  # hours 0, 1, 2: 0 and 2 kept
        store.save(step, state_of(step, 256))
        clock[0] += HOUR
    DAMAGES["garbage"](manifest_path(store, 2))
    again = local_url.store(max_to_keep=1, keep_every_n_hours=2)
    assert attempt(again, 3) is None  # hour 3: 2 left alone; 0 and 3 kept
    assert again.steps() == [0, 2, 3] and len(reports(caplog, "step 2", "left alone")) == 1
    clock[0] += HOUR
    again.save(2, state_of(2, 256), overwrite=True)  # repaired, at hour 4: kept by the hour (4 h after 0)
    clock[0] += HOUR
    assert attempt(again, 4) is None  # hour 5: 3 is neither kept by the hour (after 2's hour 4) nor the newest
    assert again.steps() == [0, 2, 4]


# --- (b) foreign entries where leftovers live ---------------------------------------------------------------


def _outside_dir(base: Path) -> Path:
    """A directory outside the store holding a file that must survive whatever the store does."""
    d = base / f"outside-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    (d / "precious").write_bytes(b"keep me")
    (d / "manifest.msgpack.not").write_bytes(b"x")
    return d


def _dir(path: Path, base: Path) -> None:
    path.mkdir()


def _file(path: Path, base: Path) -> None:
    path.write_bytes(b"junk")


def _fifo(path: Path, base: Path) -> None:
    os.mkfifo(path)


def _link_to_dir(path: Path, base: Path) -> None:
    os.symlink(_outside_dir(base), path)


def _link_to_file(path: Path, base: Path) -> None:
    os.symlink(_outside_dir(base) / "precious", path)


def _dangling(path: Path, base: Path) -> None:
    os.symlink(base / "nowhere", path)


def _alive_dir_with_temp(path: Path, base: Path) -> None:
    path.mkdir()  # .tmp-X.alive as a directory, and a temp directory .tmp-X beside it
    (path.parent / path.name.removesuffix(".alive")).mkdir()


def _alive_fifo_with_temp(path: Path, base: Path) -> None:
    os.mkfifo(path)
    (path.parent / path.name.removesuffix(".alive")).mkdir()


def _alive_link_with_temp(path: Path, base: Path) -> None:
    os.symlink(_outside_dir(base) / "precious", path)
    (path.parent / path.name.removesuffix(".alive")).mkdir()


#: name -> how it is made: entries where a writer's leftovers live that no writer leaves.
FOREIGN: dict[str, Callable[[Path, Path], None]] = {
    ".tmp-junk.alive": _dir,  # the example
    ".tmp-x.alive": _alive_dir_with_temp,
    ".tmp-fifo.alive": _alive_fifo_with_temp,
    ".tmp-lnk.alive": _alive_link_with_temp,
    ".tmp-lone.alive": _fifo,
    ".tmp-file": _file,
    ".tmp-link": _link_to_dir,
    ".trash-file": _file,
    ".trash-fifo": _fifo,
    ".trash-link": _link_to_dir,
    ".trash-dangling": _dangling,
    "step_00000077": _file,
    "step_00000078": _fifo,
    "step_00000079": _link_to_dir,
    "step_00000080": _link_to_file,
    "step_00000081": _dangling,
}


def _dead_writers_leftovers(root: Path) -> list[str]:
    """What writers that died really leave: a temp directory with its (unlocked) liveness file, a trash
    directory, a step directory without its manifest."""
    tmp = root / ".tmp-step_00000050-0123456789abcdef"
    tmp.mkdir()
    (tmp / "tensors-0123456789abcdef-r00000-00000.safetensors").write_bytes(b"x" * 100)
    (root / ".tmp-step_00000050-0123456789abcdef.alive").write_bytes(b"")
    trash = root / ".trash-step_00000040-fedcba9876543210"
    trash.mkdir()
    (trash / "data").write_bytes(b"y")
    half = root / "step_00000045"
    half.mkdir()
    (half / "tensors-1.safetensors").write_bytes(b"z")
    return [tmp.name, tmp.name + ".alive", trash.name, half.name]


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_foreign_entry_where_leftovers_live_never_blocks_saves(
    local_url: Location, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = local_url.store(max_to_keep=2)
    store.save(0, state_of(0, 256))
    root = Path(store.url)
    FOREIGN[name](root / name, tmp_path)
    outside = {p: p.read_bytes() for p in tmp_path.glob("outside-*/*")}
    real = _dead_writers_leftovers(root)
    for step in range(1, 5):
        assert attempt(store, step) is None, name
    assert store.steps() == [3, 4]
    assert os.path.lexists(root / name), f"{name}: a foreign entry is left alone"
    assert not [n for n in real if os.path.lexists(root / n)], "the real leftovers are removed all the same"
    assert {p: p.read_bytes() for p in tmp_path.glob("outside-*/*")} == outside, "nothing outside the root changes"
    assert len(reports(caplog, name, "left alone")) == 1, caplog.text  # reported, once
    for step in (3, 4):
        check_state(step, store.restore(step))


def _as_nobody_save(url: str, steps: list[int], out: Any) -> None:
    """Child: drop root (uid/gid 65534) and save ``steps`` with max_to_keep=3; report each outcome and the
    warnings logged."""
    # Everything a save imports lazily, imported while still root: the checkout (and .venv) may lie in a
    # directory another user cannot enter (CI clones into a fresh 0700 directory).
    warm = tempfile.mkdtemp()
    with ckptstore.CheckpointStore(warm, max_to_keep=1) as warming:  # (closed: its retention pass is done)
        warming.save(0, state_of(0, 256))
    shutil.rmtree(warm, ignore_errors=True)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("ckptstore").addHandler(Keep(logging.WARNING))
    store = ckptstore.CheckpointStore(url, max_to_keep=3)
    outcomes = []
    for s in steps:
        try:
            store.save(s, state_of(s, 256))
            outcomes.append((s, None))
        except Exception as e:
            outcomes.append((s, f"{type(e).__name__}: {e}"))
    store.close()  # the retention pass after the last save, in the background, is done
    out.send({"outcomes": outcomes, "steps": store.steps(), "logged": records})


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that another user can reach (tmp_path's parents are root's alone)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ckptstore-shared-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for path, _, _ in os.walk(d):
            os.chmod(path, 0o755)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="needs root, to make entries another user cannot read")
def test_unreadable_entries_never_block_a_writer_without_root(shared_dir: Path) -> None:
    """A writer that is not root meets entries it cannot read or remove: a trash directory, a liveness file
    and a temp directory of mode 0, and a committed step directory of mode 0 in its own root. None of them
    stops a save or the deletion of the others. The step directory is deleted as the policy says (renamed
    away, which the writer may do in its own root), and what is left of it, which the writer cannot remove,
    is reported once and left as a trash directory."""
    store = ckptstore.CheckpointStore(shared_dir / "run")
    for s in range(3):
        store.save(s, state_of(s, 256))
    store.close()  # its clean-up after the last save (in the background) must not meet the entries below
    root = Path(store.url)
    locked_trash = root / ".trash-step_00000070-0011223344556677"
    locked_trash.mkdir()
    (locked_trash / "data").write_bytes(b"x")
    locked_tmp = root / ".tmp-step_00000071-8899aabbccddeeff"
    locked_tmp.mkdir()
    (root / (locked_tmp.name + ".alive")).write_bytes(b"")
    for path, _, files in os.walk(root):  # everything else belongs to the writer's user
        os.chown(path, 65534, 65534)
        for f in files:
            os.chown(os.path.join(path, f), 65534, 65534)
    for p in (locked_trash, locked_tmp, root / (locked_tmp.name + ".alive")):
        os.chown(p, 0, 0)
        os.chmod(p, 0)
    os.chown(locked_trash / "data", 0, 0)
    os.chmod(root / step_name(1), 0)  # committed, and unreadable to the writer: never deleted as a leftover
    os.chown(root / step_name(1), 0, 0)
    reader, sender = pipe()
    proc = spawn(_as_nobody_save, store.url, [5, 6, 7], sender)
    proc.join(60)
    assert proc.exitcode == 0
    (got,) = drain(reader)
    assert [e for _, e in got["outcomes"]] == [None, None, None], got
    assert locked_trash.exists() and locked_tmp.exists()
    assert got["steps"] == [5, 6, 7]  # as the policy says
    (step_1_trash,) = [p for p in root.iterdir() if p.name.startswith(f".trash-{step_name(1)}-")]
    os.chmod(step_1_trash, 0o755)
    assert (step_1_trash / "manifest.msgpack").exists()  # what the writer could not remove: left, reported
    for name in (locked_trash.name, locked_tmp.name + ".alive", step_1_trash.name):
        assert len([m for m in got["logged"] if name in m and "left alone" in m]) == 1, got["logged"]


# --- (b') foreign entries in the lease directory --------------------------------------------------------


def _lease_entry(kind: str) -> tuple[str, Callable[[str], None]]:
    expired = int((time.time() - 10 * 86400) * 1000)
    return {
        "mark-dir": (f"{step_name(2)}.junk.deleting", os.mkdir),
        "lease-dir": (f"{step_name(2)}.{expired}.junk.lease", os.mkdir),
        "mark-fifo": (f"{step_name(2)}.junk.deleting", os.mkfifo),
        "junk-file": ("junk", lambda p: Path(p).write_bytes(b"j")),
        "junk-dir": ("junkdir", os.mkdir),
    }[kind]


@pytest.mark.parametrize("kind", ["mark-dir", "lease-dir", "mark-fifo", "junk-file", "junk-dir"])
def test_junk_in_the_lease_directory_never_blocks_retention(
    local_url: Location, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = local_url.store(max_to_keep=2)
    for s in range(3):
        store.save(s, state_of(s, 256))
    name, make = _lease_entry(kind)
    os.makedirs(os.path.join(store.url, ".leases"), exist_ok=True)
    make(os.path.join(store.url, ".leases", name))
    for s in range(3, 7):
        assert attempt(store, s) is None, kind
    assert store.steps() == [5, 6]
    if kind.startswith("mark-") and kind != "mark-fifo":
        # A directory cannot be removed as a small file: left, and reported once.
        assert len(reports(caplog, name, "left alone")) == 1
    if kind == "mark-fifo":  # a stale mark (whatever its type) goes
        assert name not in lease_names(store)


def test_a_lease_directory_that_is_a_file_never_blocks_saves(
    local_url: Location, caplog: pytest.LogCaptureFixture
) -> None:
    store = local_url.store(max_to_keep=1)
    store.save(0, state_of(0, 256))
    Path(store.url, ".leases").write_bytes(b"not a directory")
    for s in range(1, 4):
        assert attempt(store, s) is None
    assert store.steps() == [0, 1, 2, 3]  # no mark can be written, so nothing is deleted: and said once
    assert len(reports(caplog, ".leases", "deletes none")) == 1
    os.unlink(os.path.join(store.url, ".leases"))
    assert attempt(store, 4) is None
    assert store.steps() == [4]  # and retention catches up at once


# --- (c) out of space, out of inodes -------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(base: Path, *, size: str = "4m", inodes: int) -> Iterator[Path]:
    """A tmpfs of ``inodes`` inodes (root alone may mount one; the test is skipped elsewhere)."""
    where = base / f"tmpfs-{inodes}-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("inodes", range(8, 17))
def test_a_disk_out_of_inodes_never_leaves_retention_stuck(tmp_path: Path, inodes: int) -> None:
    """The issue's example: a retention cut short for lack of inodes (its deletion mark could not be
    written), after which every save failed before its commit, so retention never ran again. Whatever the
    number of inodes: never more checkpoints than the policy keeps, every error truthful (nothing committed,
    the disk is full), and where the steady state fits (two checkpoints, the lock, the lease directory and
    retention's reserve of two inodes: 13 on tmpfs), every save succeeds."""
    history = []
    with small_tmpfs(tmp_path, inodes=inodes) as disk:
        store = ckptstore.CheckpointStore(disk / "run", max_to_keep=1)
        for s in range(10):
            error = attempt(store, s)  # (checks the error's truthfulness)
            history.append((s, error, store.steps()))
    for s, error, steps in history:
        assert len(steps) <= 1, f"{inodes} inodes, save {s}: {steps} kept ({error})"
        assert error is None or "nothing was committed" in error or "No space" in error, error
    if inodes >= 13:
        assert [e for _, e, _ in history] == [None] * 10, history


class _InodeBudget(LocalStorage):
    """A local store on a disk out of inodes: any new small file (a deletion mark, a lease) fails with ENOSPC
    until something is removed, as on a full tmpfs or ext4 (a model, for where no tmpfs can be mounted)."""

    full = False

    def put(self, rel: str, data: bytes = b"") -> None:
        if self.full and not os.path.exists(self.url_of(rel)):
            raise StorageError(errno.ENOSPC, f"writing {self.url_of(rel)}: No space left on device")
        super().put(rel, data)

    def remove(self, rel: str) -> None:
        existed = os.path.lexists(self.url_of(rel))
        super().remove(rel)
        self.full = self.full and not existed

    def delete(self, name: str) -> None:
        super().delete(name)
        self.full = False


def test_a_deletion_mark_fits_on_a_disk_out_of_inodes(tmp_path: Path) -> None:
    storage = _InodeBudget(tmp_path / "run")
    store = ckptstore.CheckpointStore(storage, max_to_keep=1)
    store.save(0, state_of(0, 256))
    for s in range(1, 5):
        storage.full = True  # the save filled the disk to the last inode
        store.save(s, state_of(s, 256))  # its retention still deletes the step before
        assert store.steps() == [s]
    assert lease_names(store) == []


def _retention_killed_after_marking(url: str, step: int, out: Any) -> None:
    """Child: save ``step`` with max_to_keep=1; its retention writes its deletion mark and is killed (the
    parent SIGKILLs it) before it deletes anything."""
    store = ckptstore.CheckpointStore(url, max_to_keep=1)

    def stuck(name: str) -> None:
        out.send("marked")
        time.sleep(600)

    store.storage.delete = stuck  # type: ignore[method-assign]
    store.save(step, state_of(step, 256))


def _kill_retention_after_marking(url: str, step: int) -> None:
    reader, sender = pipe()
    proc = spawn(_retention_killed_after_marking, url, step, sender)
    try:
        assert reader.poll(60) and reader.recv() == "marked"
    finally:
        proc.kill()
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.crash
@pytest.mark.multiprocess
@pytest.mark.parametrize("location", ["local", "memory"], indirect=True)
def test_a_deletion_mark_left_by_a_killed_retention_is_cleared(location: Location) -> None:
    """(d) A retention SIGKILLed between its mark and its delete left the mark: the step could no longer be
    pinned and the iterator skipped it, for good if no later retention deleted anything. (memory:// is
    per process: there the kill is played by a mark written by hand.)"""
    store = location.store()
    for s in (1, 2):
        store.save(s, state_of(s, 256))
    if location.kind == "local":
        _kill_retention_after_marking(location.url, 3)  # marks step 1 (max_to_keep=1), then dies
        marked = 1
    else:
        store.save(3, state_of(3, 256))
        leases.LeaseDir(store.storage).put(f"{step_name(2)}.{uuid.uuid4().hex[:16]}.deleting")
        marked = 2
    assert [n for n in lease_names(store) if n.endswith(".deleting")], "the kill left its mark"
    with pytest.raises(CheckpointNotFoundError, match="being deleted"):
        store.pin(marked)
    keeper = location.store(max_to_keep=10)  # a policy that deletes nothing: no deletion pass to clear it
    assert attempt(keeper, 4) is None
    assert lease_names(keeper) == []
    with keeper.pin(marked) as lease:
        assert lease.step == marked
    url, opts = location
    got = list(ckptstore.checkpoints_iterator(url, timeout=0.1, storage_options=opts or None, every_checkpoint=True))
    assert [keeper.info(s).path for s in keeper.steps()] == got


@pytest.mark.parametrize("location", ["local", "memory"], indirect=True)
def test_a_store_without_a_policy_clears_marks_and_expired_leases_too(location: Location) -> None:
    store = location.store()
    store.save(1, state_of(1, 256))
    files = leases.LeaseDir(store.storage)
    expired = int((time.time() - 10 * 86400) * 1000)
    files.put(f"{step_name(1)}.deadbeefdeadbeef.deleting")
    files.put(f"{step_name(1)}.{expired}.0123456789abcdef.lease")
    live = f"{step_name(1)}.{int((time.time() + 3600) * 1000)}.fedcba9876543210.lease"
    files.put(live)
    assert attempt(store, 2) is None
    assert lease_names(store) == [live]  # a live reader's lease stays


@pytest.mark.crash
@pytest.mark.multiprocess
def test_a_retention_killed_on_a_full_disk_catches_up_on_the_next_save(tmp_path: Path) -> None:
    """(c) A retention cut short (SIGKILL after its mark) on a disk that the two checkpoints fill: every later
    save fails before its commit, and retention, which ran only after a commit, never caught up. The next
    save runs the retention that was left undone first."""
    with small_tmpfs(tmp_path, inodes=13) as disk:
        url = str(disk / "run")
        ckptstore.CheckpointStore(url, max_to_keep=1).save(0, state_of(0, 256))
        _kill_retention_after_marking(url, 1)
        store = ckptstore.CheckpointStore(url, max_to_keep=1)
        assert store.steps() == [0, 1]
        outcomes = [attempt(store, s) for s in range(2, 5)]
        steps = store.steps()
    assert outcomes == [None, None, None] and steps == [4]


# --- (8) multipart uploads left open on S3 ------------------------------------------------------------------


def _s3_client(location: Location) -> Any:
    import boto3

    from tests import s3server

    return boto3.client(
        "s3",
        endpoint_url=location.storage_options["endpoint_url"],
        aws_access_key_id=s3server.ACCESS_KEY,
        aws_secret_access_key=s3server.SECRET_KEY,
        region_name=s3server.REGION,
    )


def _bucket_key(location: Location, rel: str = "") -> tuple[str, str]:
    bucket, _, key = location.url.removeprefix("s3://").partition("/")
    return bucket, f"{key}/{rel}" if rel else key


def _open_uploads(location: Location) -> list[str]:
    bucket, _ = _bucket_key(location)
    page = _s3_client(location).list_multipart_uploads(Bucket=bucket)
    return sorted(u["Key"] for u in page.get("Uploads", []))


def _begin_upload(location: Location, key: str) -> None:
    """An upload begun through botocore, one part sent, and left open (as by a writer that died)."""
    bucket, _ = _bucket_key(location)
    client = _s3_client(location)
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"p" * (5 << 20))


def test_stale_multipart_uploads_under_the_store_are_aborted_by_the_next_writer(s3_url: Location) -> None:
    _, run = _bucket_key(s3_url)
    ours = [f"{run}/{step_name(7)}/tensors-dead0000dead0000-r00000-00000.safetensors", f"{run}/{step_name(8)}/x"]
    others = [
        f"{run}-other/{step_name(7)}/tensors-x.safetensors",  # another store whose prefix starts alike
        f"{run}/not-a-step/file",  # not where a writer of this store uploads
        f"elsewhere/{step_name(7)}/file",
    ]
    for key in ours + others:
        _begin_upload(s3_url, key)
    store = s3_url.store(max_to_keep=1)
    store.save(1, state_of(1, 256))  # the default grace period: they may be live writers' uploads
    assert _open_uploads(s3_url) == sorted(ours + others)
    with knobs.override(stale_after_s=0):
        store.save(2, state_of(2, 256))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert _open_uploads(s3_url) == sorted(others)
    assert store.steps() == [2]
    check_state(2, store.restore())


def _writer_killed_mid_upload(url: str, opts: dict[str, Any], out: Any) -> None:
    """Child: save a state large enough for a multipart upload; once its first part is stored, say so and
    hang there (the parent SIGKILLs it)."""
    from ckptstore.storage import _multipart

    real = _multipart.ParallelUpload._upload_part

    def first_part_then_hang(self: Any, number: int, body: bytes) -> dict[str, Any]:
        done = real(self, number, body)
        out.send(self.key)
        time.sleep(600)
        return done

    _multipart.ParallelUpload._upload_part = first_part_then_hang  # type: ignore[method-assign]
    store = ckptstore.CheckpointStore(url, storage_options=opts)
    with knobs.override(upload_part_bytes=5 << 20, io_threads=1):
        store.save(1, {"big": np.ones(12 << 20, dtype=np.uint8)})


@pytest.mark.crash
@pytest.mark.multiprocess
def test_a_writer_killed_mid_upload_leaves_an_upload_the_next_writer_aborts(s3_url: Location) -> None:
    reader, sender = pipe()
    proc = spawn(_writer_killed_mid_upload, s3_url.url, s3_url.storage_options, sender)
    try:
        assert reader.poll(60), "the child never got to its upload"
        key = reader.recv()
    finally:
        proc.kill()
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert _open_uploads(s3_url) == [key]  # invisible, but stored (and billed)
    store = s3_url.store(max_to_keep=2)
    assert store.steps() == []
    store.save(2, state_of(2, 256))
    assert _open_uploads(s3_url) == [key]  # younger than the grace period: maybe a live writer's
    with knobs.override(stale_after_s=0):
        store.save(3, state_of(3, 256))
        store.wait_until_finished()  # its retention pass, in the background, under the override
    assert _open_uploads(s3_url) == []
    assert store.steps() == [2, 3]


def test_uploads_that_cannot_be_listed_never_block_a_save(
    s3_url: Location, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy without s3:ListBucketMultipartUploads (moto grants all: the refusal is played by the
    client): the save and its retention go on, and the refusal is reported once."""
    store = s3_url.store(max_to_keep=1)
    fs = store.storage.fs  # type: ignore[attr-defined]
    real = fs.call_s3

    def refuse(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "list_multipart_uploads":
            raise PermissionError(errno.EACCES, "Access Denied (ListBucketMultipartUploads)")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", refuse)
    with knobs.override(stale_after_s=0):
        for s in range(3):
            assert attempt(store, s) is None
    assert store.steps() == [2]
    assert len(reports(caplog, "multipart uploads could not be listed")) == 1
