"""Reliability round 2, paths and listings (docs/reliability.md): nothing is deleted or written outside the
store root through a symlink; listings never come back empty while a checkpoint is committed, the latest step
never goes backwards, fallback never fails while an intact checkpoint exists, the watcher never sleeps a poll
interval because of a torn listing; unreadable step directories and roots raise named errors, and fallback
skips them with a warning.

Each test plays the attacker or the fault through files (symlinks, modes) or a real concurrent writer; the
torn listings of the store-level tests are given by a storage whose next listings are chosen, and the one of
the storage-level test by a directory read that a commit and a deletion land behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import ckptstore
from ckptstore import knobs
from ckptstore.errors import (
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    StorageError,
)
from ckptstore.storage import FsspecStorage, LocalOps, LocalStorage, step_name
from tests import faults


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(8, step, dtype=np.int64), "step": step}


def save_now(store: ckptstore.CheckpointStore, step: int) -> None:
    """Save ``step`` and wait for the retention pass after it (which runs in the background)."""
    store.save(step, state(step))
    store.wait_until_finished()


def files_under(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> content): what an attack must leave unchanged."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = Path(dirpath, n)
            out[str(p.relative_to(path))] = b"<link>" if p.is_symlink() else p.read_bytes()
    return out


@pytest.fixture
def victim(tmp_path: Path) -> tuple[ckptstore.CheckpointStore, Path]:
    """Another store, with a committed checkpoint (step 5) that an attack must not touch."""
    store = ckptstore.CheckpointStore(tmp_path / "victim")
    store.save(5, state(5))
    return store, tmp_path / "victim" / step_name(5)


def assert_victim_intact(victim: tuple[ckptstore.CheckpointStore, Path]) -> None:
    store, _ = victim
    assert store.steps() == [5]
    assert store.verify() == [5]
    assert store.restore()["step"] == 5


# --- 1. nothing deleted or written outside the root ----------------------------------------------------

#: The store's own protocol on a local directory, and the manifest-last one of any fsspec filesystem on
#: fsspec's local filesystem (which has symlinks too).
KINDS = ["local", "fsspec-local"]


def make(kind: str, root: Path, **kwargs: Any) -> ckptstore.CheckpointStore:
    if kind == "local":
        return ckptstore.CheckpointStore(root, **kwargs)
    return ckptstore.CheckpointStore(FsspecStorage(fsspec.filesystem("file", auto_mkdir=True), str(root)), **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_retention_never_deletes_another_stores_checkpoint_through_a_step_symlink(
    kind: str, tmp_path: Path, victim: tuple[ckptstore.CheckpointStore, Path]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / step_name(1)).symlink_to(victim[1])  # an old-looking step: the first one retention drops
    store = make(kind, root, max_to_keep=1)
    for s in (2, 3, 4):
        store.save(s, state(s))
        assert store.steps() == [s]  # never listed as one of this store's checkpoints
    assert_victim_intact(victim)
    assert (root / step_name(1)).is_symlink()  # not this store's to delete either


@pytest.mark.parametrize("kind", KINDS)
def test_a_symlinked_step_is_not_a_checkpoint_of_the_store(
    kind: str, tmp_path: Path, victim: tuple[ckptstore.CheckpointStore, Path]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / step_name(9)).symlink_to(victim[1])
    store = make(kind, root, max_to_keep=1)
    assert store.steps() == [] and store.latest_step() is None
    with pytest.raises(CheckpointNotFoundError):
        store.restore()
    with pytest.raises(CheckpointNotFoundError):
        store.restore(fallback=True)
    assert store.verify() == []
    store.save(1, state(1))
    assert store.steps() == [1] and store.restore()["step"] == 1
    assert_victim_intact(victim)


@pytest.mark.parametrize("kind", KINDS)
def test_store_delete_of_a_symlinked_step_removes_the_link_not_its_target(
    kind: str, tmp_path: Path, victim: tuple[ckptstore.CheckpointStore, Path]
) -> None:
    root = tmp_path / "run"
    store = make(kind, root)
    store.save(1, state(1))
    (root / step_name(5)).symlink_to(victim[1])
    with contextlib.suppress(CheckpointNotFoundError):  # either answer is fine; the target must survive
        store.delete(5)
    assert not os.path.lexists(root / step_name(5)) or (root / step_name(5)).is_symlink()
    assert_victim_intact(victim)
    assert store.steps() == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_save_over_a_symlinked_step_replaces_the_link_not_its_target(
    kind: str, tmp_path: Path, victim: tuple[ckptstore.CheckpointStore, Path]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / step_name(5)).symlink_to(victim[1])
    store = make(kind, root)
    store.save(5, state(50), overwrite=True)
    assert not (root / step_name(5)).is_symlink()
    assert store.steps() == [5] and store.restore(5)["w"][0] == 50
    assert_victim_intact(victim)


def test_save_over_a_symlink_to_a_directory_without_manifest_leaves_the_directory(tmp_path: Path) -> None:
    """A step name linked to some directory (a half-deleted step, as the store sees it): the commit
    replaces the link and the clean-up removes it, never the directory's files."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"keep me")
    (precious / "sub").mkdir()
    (precious / "sub" / "more.bin").write_bytes(b"and me")
    before = files_under(precious)
    root = tmp_path / "run"
    root.mkdir()
    (root / step_name(3)).symlink_to(precious)
    (root / step_name(7)).symlink_to(precious)
    store = ckptstore.CheckpointStore(root, max_to_keep=2)
    store.save(3, state(3))  # the commit replaces the link at step 3; retention's clean-up meets step 7's
    store.save(4, state(4))
    assert files_under(precious) == before
    assert store.steps() == [3, 4]
    assert not (root / step_name(3)).is_symlink()
    # The link at step 7 is left alone (or removed): never renamed into a .trash- entry that stays forever.
    assert not [n for n in os.listdir(root) if n.startswith(".trash-")]


def test_symlinked_trash_and_temp_entries_are_never_followed(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "manifest.msgpack").write_bytes(b"not yours")
    (precious / "x.safetensors").write_bytes(b"keep")
    before = files_under(precious)
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root, max_to_keep=1)
    store.save(1, state(1))
    (root / ".trash-step_00000001-0123456789abcdef").symlink_to(precious)
    (root / ".tmp-step_00000002-0123456789abcdef").symlink_to(precious)
    (root / ".tmp-step_00000002-0123456789abcdef.alive").symlink_to(precious / "x.safetensors")
    store.save(2, state(2))  # retention cleans leftovers first
    store.save(3, state(3))
    assert files_under(precious) == before
    assert store.steps() == [3]
    assert store.restore()["step"] == 3


class _SwapBeforeFirstCall(LocalOps):
    """Filesystem calls that, at the first one on a step directory (or inside it), first swap that directory
    for a symlink to another store's step: the worst moment for a deletion that looked at the entry just
    before."""

    def __init__(self, step_dir: Path, target: Path) -> None:
        self.step_dir, self.target, self.swapped = str(step_dir), target, False

    def _swap(self, path: str) -> None:
        if not self.swapped and (path == self.step_dir or path.startswith(self.step_dir + "/")):
            self.swapped = True
            shutil.rmtree(self.step_dir)
            os.symlink(self.target, self.step_dir)

    def rename(self, src: str, dst: str) -> None:
        self._swap(src)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._swap(path)
        super().unlink(path)


@pytest.mark.parametrize("how", ["delete", "retention"])
def test_a_step_swapped_for_a_symlink_during_its_deletion_is_not_followed(
    tmp_path: Path, victim: tuple[ckptstore.CheckpointStore, Path], how: str
) -> None:
    """Before: a deletion looked at the entry (a directory), then unlinked <step>/manifest.msgpack by path,
    through the link swapped in between, and so deleted the other store's manifest."""
    root = tmp_path / "run"
    ckptstore.CheckpointStore(root).save(1, state(1))
    ops = _SwapBeforeFirstCall(root / step_name(1), victim[1])
    store = ckptstore.CheckpointStore(LocalStorage(root, ops=ops), max_to_keep=1)
    if how == "delete":
        store.delete(1)
    else:
        save_now(store, 2)
    assert ops.swapped
    assert_victim_intact(victim)
    assert not os.path.lexists(root / step_name(1))
    assert store.steps() == ([] if how == "delete" else [2])


def test_a_writer_never_holds_the_lock_of_a_liveness_file_a_cleaner_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner may lock and remove a writer's liveness file between the writer's create and its lock. The
    writer must then not go on holding a lock on a removed file (the next cleaner would find no liveness
    file, take the writer for dead and remove its temp directory mid-save): it creates the file again."""
    from ckptstore.storage import _local

    real = _local._flock
    raced = []

    def cleaner_first(fd: int, flags: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".alive") and not raced:  # a cleaner gets there first: locks, finds it free, removes it
            raced.append(path)
            os.unlink(path)
        real(fd, flags)

    monkeypatch.setattr(_local, "_flock", cleaner_first)
    storage = LocalStorage(tmp_path / "run")
    staging = storage.begin(step_name(1), "0123456789abcdef")
    try:
        assert raced and os.path.exists(raced[0])  # created again, and that one is held
        assert LocalStorage._writer_dead(staging.path) is False  # a cleaner sees a live writer
        assert storage.clean_leftovers() == [] and os.path.isdir(staging.path)
    finally:
        staging.abort()


def test_removing_a_tree_never_opens_a_fifo(tmp_path: Path) -> None:
    """shutil.rmtree opens what it is given: a FIFO would block it for as long as no writer comes."""
    fifo = tmp_path / ".trash-step_00000001-0123456789abcdef"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(LocalOps().rmtree(str(fifo))), daemon=True)
    t.start()
    t.join(10)
    assert done == [None] and not os.path.lexists(fifo)


@pytest.mark.parametrize("kind", KINDS)
def test_a_symlinked_lease_directory_is_never_written_listed_or_emptied(kind: str, tmp_path: Path) -> None:
    """A `.leases` link to a directory elsewhere: retention would have removed what looks like stale marks
    and expired leases there and written its own marks; readers' pins would have gone there too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000001.0123456789abcdef.deleting").write_bytes(b"looks like a stale mark")
    (elsewhere / "step_00000001.1000.0123456789abcdef.lease").write_bytes(b"looks like an expired lease")
    (elsewhere / "notes.txt").write_bytes(b"keep")
    before = files_under(elsewhere)
    root = tmp_path / "run"
    store = make(kind, root, max_to_keep=1)
    store.save(1, state(1))
    (root / ".leases").symlink_to(elsewhere)
    try:
        store.save(2, state(2))  # retention, which cannot know the pins, deletes nothing
    except StorageError as e:  # or says why, truthfully
        assert "step 2 is committed" in str(e) and "symlink" in str(e)
    with pytest.raises(StorageError, match="symlink"):
        store.pin(2)
    with pytest.raises(StorageError, match="symlink"):
        next(store.iter_new(timeout=0))
    with pytest.raises(StorageError, match="symlink"):
        ckptstore.pin(store.info(2).path)
    assert files_under(elsewhere) == before
    assert store.steps() == [1, 2]  # nothing deleted while the pins cannot be known
    assert [p for p in store.iter_new(timeout=0, pin=False)] == [store.info(2)]  # readers that do not pin


def test_a_lease_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root, max_to_keep=1)
    store.save(1, state(1))
    (root / ".leases").write_bytes(b"")
    with pytest.raises(StorageError, match="not a directory"):
        store.pin(1)
    assert (root / ".leases").read_bytes() == b""


def test_a_symlinked_lock_file_is_not_written_through(tmp_path: Path) -> None:
    precious = tmp_path / "precious.cfg"
    precious.write_bytes(b"do not truncate me")
    precious.chmod(0o600)
    root = tmp_path / "run"
    root.mkdir()
    (root / ".ckptstore.lock").symlink_to(precious)
    store = ckptstore.CheckpointStore(root, max_to_keep=1)
    with pytest.raises(StorageError, match="symlink"):
        store.save(1, state(1))
    assert precious.read_bytes() == b"do not truncate me"
    assert stat.S_IMODE(precious.stat().st_mode) == 0o600
    assert store.steps() == []
    assert faults.leftovers(str(root)) == []  # the save was rolled back


def test_the_lock_is_exclusive_between_processes_and_reentrant(tmp_path: Path) -> None:
    """The store lock without filelock: an flock on the lock file, re-entrant within a thread."""
    root = tmp_path / "run"
    storage = LocalStorage(root)
    with storage.lock(), storage.lock():
        code = textwrap.dedent(
            f"""
            import fcntl, os, sys
            fd = os.open({str(root / ".ckptstore.lock")!r}, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(3)
            """
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_path_the_user_names_through_their_own_link_still_restores(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = ckptstore.CheckpointStore(root, max_to_keep=2)
    for s in (1, 2, 3):
        store.save(s, state(s))
    store.wait_until_finished()
    (root / "latest").symlink_to(step_name(3))  # relative, as `ln -s` and Lightning's save_last="link" make
    (tmp_path / "last.ckpt").symlink_to(root / step_name(3))
    for path in (root / "latest", tmp_path / "last.ckpt"):
        assert ckptstore.restore(path)["step"] == 3
        assert ckptstore.restore(path, mmap=True)["step"] == 3
    # A store whose root is a link (the user's) works as any other.
    (tmp_path / "run-link").symlink_to(root)
    linked = ckptstore.CheckpointStore(tmp_path / "run-link", max_to_keep=2)
    assert linked.steps() == [2, 3]
    linked.save(4, state(4))
    assert linked.steps() == [3, 4] == store.steps()
    assert (root / "latest").is_symlink()  # retention leaves names that are not steps alone


# --- 2. listings that never lie under load ------------------------------------------------------------


class TornListing(LocalStorage):
    """LocalStorage whose next listings are the answers given (listings torn by a race), then true."""

    def __init__(self, root: str | os.PathLike[str], answers: list[list[int]] | None = None) -> None:
        super().__init__(root)
        self.answers = list(answers or [])
        self.listings = 0

    def committed_steps(self) -> list[int]:
        self.listings += 1
        if self.answers:
            return self.answers.pop(0)
        return super().committed_steps()


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_read_torn_by_a_commit_and_a_deletion_is_read_again(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself, made certain: the root is read while only step 1 is there; a trainer at max_to_keep=1
    then commits step 2 and deletes step 1 before step 1's manifest is looked at."""
    root = tmp_path / "run"
    trainer = ckptstore.CheckpointStore(root, max_to_keep=1)
    save_now(trainer, 1)
    real_scandir = os.scandir
    armed = [True]

    class Scan:
        def __init__(self, entries: list[os.DirEntry[str]]) -> None:
            self.entries = entries

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(self.entries)

        def __enter__(self) -> Scan:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir(path: Any = ".") -> Any:
        entries = list(real_scandir(path))
        if armed[0] and os.fspath(path) == str(root):
            armed[0] = False
            save_now(trainer, 2)  # lands after the read of the root, before the manifests are looked at
        return Scan(entries)

    monkeypatch.setattr(os, "scandir", scandir)  # (fsspec's local find walks with it too)
    reader = make(kind, root).storage
    assert reader.committed_steps() == [2]
    assert not armed[0]


def test_latest_step_never_goes_backwards_within_a_process(tmp_path: Path) -> None:
    root = tmp_path / "run"
    writer = ckptstore.CheckpointStore(root)
    writer.save(1, state(1))
    writer.save(2, state(2))
    torn = TornListing(root)
    store = ckptstore.CheckpointStore(torn)
    assert store.latest_step() == 2
    torn.answers = [[], [1], [1]]
    assert store.latest_step() == 2  # an empty listing
    assert store.latest_step() == 2  # one that ran before step 2's commit, or raced with retention
    assert store.steps() == [1, 2]
    assert store.restore()["step"] == 2
    # Another store object of this process saw what this one did not: neither goes back.
    other = ckptstore.CheckpointStore(TornListing(root, [[1]]))
    assert other.latest_step() == 2
    # An explicit delete lets it go back; so does a deletion this process did not make.
    store.delete(2)
    assert store.latest_step() == 1
    writer.save(3, state(3))
    assert store.latest_step() == 3
    shutil.rmtree(root / step_name(3))  # as another process's delete would
    assert store.latest_step() == 1


def test_fallback_lists_again_when_the_checkpoint_it_tried_vanished(tmp_path: Path) -> None:
    """max_to_keep=1: the reader lists [1], the trainer commits 2 and deletes 1 while the reader reads it."""
    root = tmp_path / "run"
    trainer = ckptstore.CheckpointStore(root, max_to_keep=1)
    trainer.save(1, state(1))
    storage = OnRead(root, {1: lambda: save_now(trainer, 2)})
    reader = ckptstore.CheckpointStore(storage)
    with pytest.warns(CorruptCheckpointWarning, match=r"restored step 2 .*step 1:"):
        restored = reader.restore(fallback=True)
    assert restored["step"] == 2 and np.all(restored["w"] == 2)


def test_fallback_pins_what_it_tries_after_a_relisting(tmp_path: Path) -> None:
    """Once a checkpoint vanished under it, fallback pins the next one it tries: the trainer's retention
    then leaves it alone, so fallback cannot be starved by a trainer that saves faster than it reads."""
    root = tmp_path / "run"
    trainer = ckptstore.CheckpointStore(root, max_to_keep=1)
    trainer.save(1, state(1))
    storage = OnRead(root, {1: lambda: save_now(trainer, 2), 2: lambda: save_now(trainer, 3)})
    reader = ckptstore.CheckpointStore(storage)
    with pytest.warns(CorruptCheckpointWarning, match="restored step 2"):
        assert reader.restore(fallback=True)["step"] == 2
    assert trainer.steps() == [2, 3]  # step 2 was pinned while it was read
    trainer.save(4, state(4))
    assert trainer.steps() == [4]  # and the pin was released


def test_fallback_to_an_explicit_step_never_goes_past_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    trainer = ckptstore.CheckpointStore(root, max_to_keep=1)
    trainer.save(1, state(1))
    reader = ckptstore.CheckpointStore(OnRead(root, {1: lambda: save_now(trainer, 2)}))
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint at or before step 1"):
        reader.restore(1, fallback=True)


class OnRead(LocalStorage):
    """LocalStorage that runs ``hooks[step]`` (once) when a reader first lists that step's files: a
    trainer acting while the reader works."""

    def __init__(self, root: str | os.PathLike[str], hooks: dict[int, Callable[[], object]]) -> None:
        super().__init__(root)
        self.hooks = dict(hooks)

    def sizes(self, rel_dir: str) -> dict[str, int]:
        for step, hook in list(self.hooks.items()):
            if rel_dir == step_name(step):
                del self.hooks[step]
                hook()
        return super().sizes(rel_dir)


def test_the_iterator_does_not_wait_a_poll_interval_for_a_torn_empty_listing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckptstore.CheckpointStore(root).save(1, state(1))
    torn = TornListing(root, [[]])
    with knobs.override(poll_interval_s=5.0):
        t0 = time.monotonic()
        infos = ckptstore.CheckpointStore(torn).iter_new(timeout=8)
        assert next(infos).step == 1
        assert time.monotonic() - t0 < 2.0
        infos.close()
        paths = ckptstore.checkpoints_iterator(TornListing(root, [[]]), timeout=8)  # type: ignore[arg-type]
        t0 = time.monotonic()
        assert next(paths) == str(root / step_name(1))
        assert time.monotonic() - t0 < 2.0
        paths.close()
        t0 = time.monotonic()
        found = ckptstore.wait_for_new_checkpoint(TornListing(root, [[]]), seconds_to_sleep=5, timeout=8)  # type: ignore[arg-type]
        assert found == str(root / step_name(1)) and time.monotonic() - t0 < 2.0


def test_steps_never_go_back_when_the_newest_seen_was_deleted_by_a_newer_commit(tmp_path: Path) -> None:
    """The race that made the listing test above fail once on a loaded machine: a reader saw step 2; a
    listing torn by the trainer (max_to_keep=1) shows only step 1, not yet deleted, and misses step 3; by the
    time step 2 is looked up by name, retention has deleted it. The store lists again and finds step 3."""
    root = tmp_path / "run"
    trainer = ckptstore.CheckpointStore(root)
    for step in (1, 2, 3):
        trainer.save(step, state(step))
    trainer.delete(2)
    # This process saw step 2 last; step 3 came from another process (the trainer here shares the record).
    ckptstore.store._newest_seen[trainer.url] = 2
    torn = TornListing(root, [[1]])  # a listing from before step 3's commit and step 1's deletion
    assert ckptstore.CheckpointStore(torn).latest_step() == 3
    assert torn.listings == 2
    # Deleted outright, nothing newer: the listing is right, and the step seen is forgotten.
    trainer.delete(3)
    assert ckptstore.CheckpointStore(TornListing(root)).latest_step() == 1


@pytest.mark.parametrize("answers", [[[1]], [[1], [1]], [[1], []]])
def test_the_iterator_never_yields_an_older_checkpoint_from_a_listing_behind(
    tmp_path: Path, answers: list[list[int]]
) -> None:
    root = tmp_path / "run"
    writer = ckptstore.CheckpointStore(root)
    writer.save(1, state(1))
    writer.save(2, state(2))
    torn = TornListing(root)
    yielded = []
    with knobs.override(poll_interval_s=0.05):
        for info in ckptstore.CheckpointStore(torn).iter_new(timeout=0.3):
            yielded.append(info.step)
            if len(yielded) == 1:
                torn.answers = [list(a) for a in answers]  # the next look is torn
            if len(yielded) > 3:
                break
    assert yielded == [2]
    last = str(root / step_name(2))
    found = ckptstore.wait_for_new_checkpoint(TornListing(root, answers), last, seconds_to_sleep=0.05, timeout=0.3)  # type: ignore[arg-type]
    assert found is None


def _trainer(root: str, stop: str, steps_file: str) -> None:
    """A trainer process saving with max_to_keep=1 as fast as it can, until ``stop`` exists."""
    store = ckptstore.CheckpointStore(root, max_to_keep=1)
    s = 1
    while not os.path.exists(stop):
        store.save(s, faults.state_of(s, 512))
        s += 1
    Path(steps_file).write_text(str(s - 1))


@pytest.mark.multiprocess
def test_listings_and_fallback_never_lie_while_a_trainer_saves_with_max_to_keep_1(tmp_path: Path) -> None:
    """A trainer process saves with max_to_keep=1 in a loop; this process lists, asks for the latest step
    and restores with fallback in a loop. Before the fix: about 2 empty listings a second, and 1 fallback
    restore in 80 failing with "no intact checkpoint"."""
    root = str(tmp_path / "run")
    ckptstore.CheckpointStore(root, max_to_keep=1).save(0, faults.state_of(0, 512))  # committed at every instant
    stop, steps_file = str(tmp_path / "stop"), str(tmp_path / "steps")
    proc = faults.spawn(_trainer, root, stop, steps_file)
    store = ckptstore.CheckpointStore(root)
    storage = LocalStorage(root)
    scans = empty_raw = empty = backwards = restores = 0
    failures: list[str] = []
    newest = -1
    try:
        warm_up = time.monotonic() + 30
        while newest < 2 and proc.is_alive() and time.monotonic() < warm_up:  # until the trainer is under way
            time.sleep(0.01)
            newest = max([newest, *storage.committed_steps()])
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            scans += 1
            empty_raw += not storage.committed_steps()
            empty += not store.steps()
            latest = store.latest_step()
            if latest is None or latest < newest:
                backwards += 1
            newest = max(newest, latest or -1)
            if scans % 10 == 0:
                restores += 1
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", CorruptCheckpointWarning)
                        got = store.restore(fallback=True)
                    faults.check_state(got["step"], got)
                except CkptStoreError as e:
                    failures.append(str(e))
    finally:
        Path(stop).touch()
        proc.join(20)
    saved = int(Path(steps_file).read_text())
    assert saved > 20, f"the trainer saved only {saved} checkpoints"
    report = (
        f"{scans} scans: {empty_raw} empty storage listings, {empty} empty steps(), {backwards} latest_step() "
        f"going back; {len(failures)} of {restores} fallback restores failed; {saved} saves"
    )
    assert (empty_raw, empty, backwards, failures) == (0, 0, 0, []), report


# --- 6 (part). unreadable step directories and roots ----------------------------------------------------

#: Run as another user (root ignores modes): the store's calls, each outcome as JSON.
_AS_READER = textwrap.dedent(
    """
    import json, sys, warnings
    import ckptstore
    store = ckptstore.CheckpointStore(sys.argv[1])
    out = {}
    calls = {
        "steps": store.steps,
        "restore": lambda: store.restore()["step"],
        "restore2": lambda: store.restore(2)["step"],
        "fallback": lambda: store.restore(fallback=True)["step"],
        "verify": store.verify,
        "verify3": lambda: store.verify(3),
        "info": lambda: store.info(3).step,
    }
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = call()
                out[name] = {"ok": value, "warnings": [str(w.message) for w in caught]}
            except BaseException as e:
                out[name] = {"error": [c.__name__ for c in type(e).__mro__], "message": str(e)}
    print(json.dumps(out))
    """
)


def _as_reader(root: Path) -> dict[str, Any]:
    """The outcomes of :data:`_AS_READER` on ``root``, run by a user without root's override of modes."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop root's override of file modes")
        # Root without the capabilities that override file modes (as `capsh --drop=...` would): the modes
        # apply to it as to any owner, and the checkout stays importable wherever CI cloned it (a directory
        # of mode 0700 is out of reach for another user).
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable]
    else:
        cmd = [sys.executable]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    r = subprocess.run([*cmd, "-c", _AS_READER, str(root)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def shared_store() -> Iterator[Path]:
    """A store of steps 1, 2, 3 that another user can read (under a world-readable directory)."""
    base = Path(tempfile.mkdtemp(prefix="ckptstore-perm-"))
    base.chmod(0o755)
    root = base / "run"
    store = ckptstore.CheckpointStore(root)
    for s in (1, 2, 3):
        store.save(s, state(s))
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    root.chmod(0o755)
    try:
        yield root
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o755)
        root.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def assert_named_denied(outcome: dict[str, Any], path: Path) -> None:
    assert "error" in outcome, outcome
    assert {"AccessDeniedError", "PermissionError", "CkptStoreError"} <= set(outcome["error"]), outcome
    assert str(path) in outcome["message"] and "permission denied" in outcome["message"], outcome


def assert_fallback_skipped(outcome: dict[str, Any], skipped: Path) -> None:
    assert outcome.get("ok") == 2, outcome
    assert len(outcome["warnings"]) == 1 and str(skipped) in outcome["warnings"][0], outcome
    assert "permission denied" in outcome["warnings"][0]


@pytest.mark.parametrize("mode", [0o311, 0o000])
def test_an_unreadable_step_directory_is_named_and_skipped_by_fallback(shared_store: Path, mode: int) -> None:
    step3 = shared_store / step_name(3)
    step3.chmod(mode)
    out = _as_reader(shared_store)
    assert out["steps"] == {"ok": [1, 2, 3], "warnings": []}  # listed, not silently hidden
    assert_named_denied(out["restore"], step3)
    assert out["restore2"]["ok"] == 2
    assert_fallback_skipped(out["fallback"], step3)
    assert_named_denied(out["verify3"], step3)
    assert {"CorruptCheckpointError", "CkptStoreError"} <= set(out["verify"]["error"])  # after checking 1 and 2
    assert str(step3) in out["verify"]["message"] and "1 damaged" in out["verify"]["message"]
    if mode == 0o000:
        assert_named_denied(out["info"], step3)
    else:
        assert out["info"]["ok"] == 3  # its manifest can be opened through the directory


@pytest.mark.parametrize("mode", [0o311, 0o000])
def test_an_unreadable_root_is_named(shared_store: Path, mode: int) -> None:
    shared_store.chmod(mode)
    out = _as_reader(shared_store)
    for call in ("steps", "restore", "fallback", "verify"):
        assert_named_denied(out[call], shared_store)
    if mode == 0o311:  # a step named explicitly is reachable without listing the root
        assert out["restore2"]["ok"] == 2 and out["verify3"]["ok"] == [3]
    else:
        assert_named_denied(out["restore2"], shared_store / step_name(2))


@pytest.mark.parametrize("which", ["manifest.msgpack", "tensors"])
def test_an_unreadable_file_of_the_latest_step_is_named_and_skipped_by_fallback(shared_store: Path, which: str) -> None:
    step3 = shared_store / step_name(3)
    target = step3 / which if which == "manifest.msgpack" else next(step3.glob("*.safetensors"))
    target.chmod(0o000)
    out = _as_reader(shared_store)
    assert out["steps"]["ok"] == [1, 2, 3]
    assert_named_denied(out["restore"], target)
    assert_fallback_skipped(out["fallback"], target)
    assert str(target) in out["verify"]["message"]
