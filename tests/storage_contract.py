"""The storage contract as a test suite: written once against :class:`ckptstore.storage.Storage` and
:class:`~ckptstore.storage.Staging`, run by every backend (the pattern of zarr's ``StoreTests`` and fsspec's
abstract test classes).

A new backend: subclass :class:`StorageContract`, provide the fixture ``make_storage``, and it runs every
case below::

    class TestMyBackend(StorageContract):
        @pytest.fixture
        def make_storage(self, tmp_path: Path) -> MakeStorage:
            # plan=None: the backend as it is; a FaultPlan: its filesystem calls go through the plan
            # (tests/faults.py: FaultyOps for LocalStorage, FaultyFS for an fsspec filesystem).
            return lambda plan=None: MyStorage(tmp_path / "root", fs=FaultyFS(my_fs, plan) if plan else my_fs)

``make_storage(plan=None)`` returns a new Storage object on one root that is fresh and empty for each test.
It is called several times in a test: each object stands for another process's view of the same root (they
share nothing but the filesystem). A backend on a slow filesystem (a server over HTTP) makes the loops
smaller with the class attributes ``race_rounds``, ``commits_listed`` and ``writer_races``. Backends on an
fsspec filesystem get their factory from :func:`fsspec_storages`.

The cases: begin/write/commit and every read of what was committed (read_bytes, sizes, open_read,
read_range, map_file where ``supports_mmap``); an aborted save leaves nothing; commits are conditional
(CheckpointExistsError, the first checkpoint intact; overwrite=True replaces it); an error of ``fill`` passes
through unchanged; delete removes the manifest first, a delete cut short is never listed and is cleaned up;
missing things raise the documented errors; the small-file primitives of leases; a fault at every counted
filesystem call of a whole save surfaces as a named error (never a raw OSError), errno kept; and, with
threads, a delete racing readers (right bytes or a named error, never wrong bytes), listings racing commits
(ascending, fresh, never losing a step) and two writers racing for one step (exactly one wins).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import random
import threading
import traceback
from typing import Any, ClassVar, Protocol

import pytest

from ckptstore import knobs
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    StorageError,
)
from ckptstore.manifest import MANIFEST_NAME
from ckptstore.storage import LOCK_NAME, FsspecStorage, Storage, new_token, open_storage, parse_step, step_name
from ckptstore.storage._base import _MAX_UNSYNCED
from tests.faults import FaultPlan, FaultyFS, InjectedFault

__all__ = ["MakeStorage", "StorageContract", "fsspec_storages"]


class MakeStorage(Protocol):
    """A new Storage object on the test's root; with ``plan``, its filesystem calls go through the plan."""

    def __call__(self, plan: FaultPlan | None = None) -> Storage: ...


def fsspec_storages(url: str, storage_options: dict[str, Any] | None = None, *, fs: Any = None) -> MakeStorage:
    """``make_storage`` for a backend on an fsspec filesystem: the storage of ``url`` (through
    :func:`ckptstore.storage.open_storage`, or :class:`FsspecStorage` on ``fs`` where given), faults
    injected by wrapping its filesystem in :class:`tests.faults.FaultyFS`.

    Each plain call opens the URL anew (with ``skip_instance_cache`` in the options: its own client and
    listing cache, as in another process). To keep S3 quick, the clients share one botocore session (its
    parsed service models: a new session costs 0.2 s), and storages with a plan share one client."""
    shared: list[FsspecStorage] = []
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")) and "session" not in opts:
        from aiobotocore.session import AioSession

        opts["session"] = AioSession()

    def open_one() -> FsspecStorage:
        storage = FsspecStorage(fs, url) if fs is not None else open_storage(url, opts or None)
        assert isinstance(storage, FsspecStorage), storage
        return storage

    def make(plan: FaultPlan | None = None) -> Storage:
        if plan is None:
            return open_one()
        if not shared:
            shared.append(open_one())
        return FsspecStorage(FaultyFS(shared[0].fs, plan), shared[0].root)  # type: ignore[arg-type]

    return make


# --- a save, described before it is written ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Save:
    """One checkpoint: its directory, writer token, data files (named with the token, as ckptstore names
    them, so two writers of one step never share a file) and manifest bytes."""

    step: int
    token: str
    files: dict[str, bytes]
    manifest: bytes

    @property
    def name(self) -> str:
        return step_name(self.step)

    @property
    def manifest_rel(self) -> str:
        return f"{self.name}/{MANIFEST_NAME}"

    def rel(self, file: str) -> str:
        return f"{self.name}/{file}"

    @property
    def sizes(self) -> dict[str, int]:
        """What ``Storage.sizes`` of the committed directory must give."""
        return {MANIFEST_NAME: len(self.manifest), **{f: len(d) for f, d in self.files.items()}}


def new_save(step: int, *, seed: int = 0, nfiles: int = 2, nbytes: int = 3000) -> Save:
    """A save whose bytes are its own: random per (step, seed), so another save's bytes never pass."""
    token = new_token()
    rng = random.Random(f"{step}-{seed}-{token}")
    files = {f"data-{token}-{i}.bin": rng.randbytes(nbytes + i) for i in range(nfiles)}
    return Save(step, token, files, f"manifest of step {step} by {token}".encode() + rng.randbytes(32))


def write(storage: Storage, save: Save, *, overwrite: bool = False) -> None:
    """begin, write every file (in two chunks, together: ``write_all``, as a save does), commit; abort and
    re-raise if anything fails."""
    staging = storage.begin(save.name, save.token)
    try:
        fills = [
            (file, lambda f, data=data: f.write(data[:100]) + f.write(data[100:])) for file, data in save.files.items()
        ]
        got = staging.write_all(fills)
        assert got == [len(data) for data in save.files.values()], "write_all must return what each fill returned"
        staging.commit(save.manifest, overwrite=overwrite)
    except BaseException:
        staging.abort()
        raise


def files_under(storage: Storage, rel: str = "", *, phantoms: bool = False) -> list[str]:
    """Every file under ``rel``, relative to the root, found through the contract (listdir and sizes);
    the local lock file aside. ``phantoms``: ignore emptied directories listed as files (see
    :meth:`StorageContract.sizes`)."""
    sizes = drop_phantom(storage.sizes(rel), rel, phantoms)
    out = [f"{rel}/{n}" if rel else n for n in sizes if not (rel == "" and n == LOCK_NAME)]
    for name in drop_phantom(storage.listdir(rel), rel, phantoms):
        if name not in sizes:
            out += files_under(storage, f"{rel}/{name}" if rel else name, phantoms=phantoms)
    return sorted(out)


def drop_phantom(found: Any, rel: str, phantoms: bool) -> Any:
    """``found`` (names, or names and sizes) without the entry some S3 servers list for an emptied
    directory: its own name, zero bytes (SeaweedFS). Only where ``phantoms``."""
    own = rel.rsplit("/", 1)[-1]
    if not phantoms or own not in found:
        return found
    if isinstance(found, dict):
        return {n: v for n, v in found.items() if not (n == own and v == 0)} if found[own] == 0 else found
    return [n for n in found if n != own]


def check_reads(storage: Storage, rel: str, data: bytes) -> None:
    """Every way of reading a file gives its bytes: open_read with seek/readinto/read/readinto_at,
    read_range."""
    n = len(data)
    f = storage.open_read(rel)
    try:
        f.seek(3)
        buf = bytearray(200)
        got = f.readinto(buf)
        assert got and bytes(buf[:got]) == data[3 : 3 + got], "readinto after seek"
        f.seek(n - 10)
        assert f.read() == data[-10:], "read to the end"
        f.seek(0)
        assert f.read(5) == data[:5]
        # Positional scatter reads: into several buffers (one empty), and short at the end of the file.
        bufs = [bytearray(7), bytearray(0), bytearray(300)]
        assert f.readinto_at([memoryview(b) for b in bufs], 20) == 307
        assert b"".join(bufs) == data[20:327], "readinto_at fills the buffers in order"
        tail = bytearray(50)
        assert f.readinto_at([memoryview(tail)], n - 30) == 30, "readinto_at at the end reads fewer bytes"
        assert bytes(tail[:30]) == data[-30:]
    finally:
        f.close()
    assert storage.read_range(rel, 10, 500) == data[10:500]
    assert storage.read_range(rel, n - 7, n + 100) == data[-7:], "read_range at the end gives fewer bytes"
    assert storage.read_range(rel, 0, n) == data


def named_chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


class Boom(Exception):
    """An error of the caller's own ``fill``."""


# --- the suite -----------------------------------------------------------------------------------------


class StorageContract:
    """The contract every :class:`~ckptstore.storage.Storage` keeps. Subclass it and provide
    ``make_storage`` (see the module docstring)."""

    #: Rounds of a delete racing a reader.
    race_rounds: ClassVar[int] = 200
    #: Steps committed while another thread lists.
    commits_listed: ClassVar[int] = 40
    #: Rounds of two writers racing for one step.
    writer_races: ClassVar[int] = 10

    #: Cases this backend is known to fail (test name -> why). They run as strict xfails, so a fix is
    #: noticed (an unexpected pass fails): report each, and remove it once ckptstore is fixed.
    known_deviations: ClassVar[dict[str, str]] = {}

    @pytest.fixture
    def make_storage(self) -> MakeStorage:
        """A backend's test class provides this: see :class:`MakeStorage`."""
        raise NotImplementedError(f"{type(self).__name__} must provide the make_storage fixture")

    @pytest.fixture(autouse=True)
    def _known_deviation(self, request: pytest.FixtureRequest) -> None:
        reason = self.known_deviations.get(request.node.originalname)
        if reason is not None:
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    @property
    def phantoms(self) -> bool:
        """Whether this backend lists an emptied directory as a file (a known deviation): the other cases
        then ignore such entries, and test_an_emptied_directory_lists_nothing states the contract."""
        return "test_an_emptied_directory_lists_nothing" in self.known_deviations

    def sizes(self, storage: Storage, rel: str) -> dict[str, int]:
        """``storage.sizes(rel)``, less a known phantom entry."""
        return drop_phantom(storage.sizes(rel), rel, self.phantoms)  # type: ignore[no-any-return]

    def names(self, storage: Storage, rel: str) -> list[str]:
        """``storage.listdir(rel)``, less a known phantom entry."""
        return drop_phantom(storage.listdir(rel), rel, self.phantoms)  # type: ignore[no-any-return]

    def files_under(self, storage: Storage) -> list[str]:
        return files_under(storage, phantoms=self.phantoms)

    # --- an empty root, writing, reading -----------------------------------------------------------------

    def test_an_empty_root_has_nothing(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        name = step_name(1)
        assert s.committed_steps() == []
        assert not s.is_committed(name)
        assert self.sizes(s, name) == {}
        assert self.names(s, "") == [] and self.names(s, name) == []
        with pytest.raises(CheckpointNotFoundError):
            s.read_bytes(f"{name}/{MANIFEST_NAME}", 1 << 20)
        with pytest.raises(CorruptCheckpointError):
            s.open_read(f"{name}/data.bin")
        with pytest.raises(CorruptCheckpointError):
            s.read_range(f"{name}/data.bin", 0, 10)

    def test_write_commit_and_read_back(self, make_storage: MakeStorage) -> None:
        writer = make_storage()
        save = new_save(7)
        staging = writer.begin(save.name, save.token)
        for file, data in save.files.items():
            assert staging.write(file, lambda f, data=data: (f.write(data), "filled")[1]) == "filled"
        assert writer.committed_steps() == [] and not make_storage().is_committed(save.name)
        staging.commit(save.manifest, overwrite=False)
        for s in (writer, make_storage()):  # the writer's view, and another process's
            assert s.committed_steps() == [7]
            assert s.is_committed(save.name) and not s.is_committed(step_name(8))
            assert s.read_bytes(save.manifest_rel, len(save.manifest)) == save.manifest
            with pytest.raises(CorruptCheckpointError):
                s.read_bytes(save.manifest_rel, len(save.manifest) - 1)
            assert self.sizes(s, save.name) == save.sizes
            for file, data in save.files.items():
                check_reads(s, save.rel(file), data)

    def test_map_file_iff_supports_mmap(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        save = new_save(1)
        write(s, save)
        file, data = next(iter(save.files.items()))
        if not s.supports_mmap:
            with pytest.raises(CkptStoreError):
                s.map_file(save.rel(file))
            return
        mapped = s.map_file(save.rel(file))
        assert bytes(mapped[:]) == data
        mapped[0:4] = b"\0\0\0\0"  # private, copy-on-write: the file keeps its bytes
        assert s.read_range(save.rel(file), 0, 4) == data[:4]

    def test_an_empty_file_reads_back_empty(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        save = dataclasses.replace(new_save(1), files={"empty.bin": b"", "data.bin": b"x"})
        write(s, save)
        assert self.sizes(s, save.name) == save.sizes
        assert s.read_range(save.rel("empty.bin"), 0, 10) == b""
        s.put("leases/empty")
        assert s.read_bytes("leases/empty", 10) == b""

    def test_empty_ranges_read_nothing(self, make_storage: MakeStorage) -> None:
        """``read_range(start, end)`` is bytes [start, end) "fewer at its end": none at or past the end,
        none for start == end."""
        s = make_storage()
        save = new_save(1)
        write(s, save)
        file, data = next(iter(save.files.items()))
        n = len(data)
        assert s.read_range(save.rel(file), 5, 5) == b""
        assert s.read_range(save.rel(file), n, n + 10) == b""
        assert s.read_range(save.rel(file), n + 5, n + 10) == b""

    def test_an_emptied_directory_lists_nothing(self, make_storage: MakeStorage) -> None:
        """A directory whose files are all gone is, for sizes and listdir, a directory that does not exist."""
        s = make_storage()
        save = new_save(1)
        write(s, save)
        s.put("leases/step_00000001/a", b"1")
        with s.lock():
            s.delete(save.name)
        s.remove("leases/step_00000001/a")
        assert s.sizes(save.name) == {} and s.listdir(save.name) == []
        assert s.sizes("leases/step_00000001") == {} and s.listdir("leases/step_00000001") == []

    # --- aborted, refused and failed saves ---------------------------------------------------------------

    def test_an_aborted_save_leaves_nothing(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        save = new_save(1)
        staging = s.begin(save.name, save.token)
        for file, data in save.files.items():
            staging.write(file, lambda f, data=data: f.write(data))
        staging.abort()
        other = make_storage()
        assert other.committed_steps() == [] and not other.is_committed(save.name)
        assert self.sizes(other, save.name) == {}
        with knobs.override(stale_after_s=0), s.lock():
            s.clean_leftovers()
        assert self.files_under(other) == []
        write(s, save)  # the step is free
        assert other.committed_steps() == [1]

    def test_a_save_in_progress_is_never_listed(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        save = new_save(2)
        staging = s.begin(save.name, save.token)
        for file, data in save.files.items():
            staging.write(file, lambda f, data=data: f.write(data))
        other = make_storage()
        assert other.committed_steps() == [] and not other.is_committed(save.name)
        with pytest.raises(CheckpointNotFoundError):
            other.read_bytes(save.manifest_rel, 1 << 20)
        with knobs.override(stale_after_s=3600), other.lock():
            other.clean_leftovers()  # a live writer's files are not leftovers
        staging.commit(save.manifest, overwrite=False)
        assert other.committed_steps() == [2] and self.sizes(other, save.name) == save.sizes

    def test_commit_is_conditional_and_overwrite_replaces(self, make_storage: MakeStorage) -> None:
        a, b = make_storage(), make_storage()
        first = new_save(3, seed=1)
        write(a, first)
        second = new_save(3, seed=2)
        staging = b.begin(second.name, second.token)
        for file, data in second.files.items():
            staging.write(file, lambda f, data=data: f.write(data))
        with pytest.raises(CheckpointExistsError):
            staging.commit(second.manifest, overwrite=False)
        staging.abort()
        for s in (a, b):  # the first commit is intact, and the loser's files are gone
            assert s.committed_steps() == [3]
            assert s.read_bytes(first.manifest_rel, 1 << 20) == first.manifest
            assert self.sizes(s, first.name) == first.sizes
            for file, data in first.files.items():
                assert s.read_range(first.rel(file), 0, len(data)) == data
        third = new_save(3, seed=3)
        write(b, third, overwrite=True)
        assert a.committed_steps() == [3]
        assert a.read_bytes(third.manifest_rel, 1 << 20) == third.manifest
        assert self.sizes(a, third.name) == third.sizes  # the replaced checkpoint's data is gone
        for file in first.files:
            with pytest.raises(CorruptCheckpointError):
                a.read_range(first.rel(file), 0, 10)

    @pytest.mark.parametrize("kind", ["its-own-error", "its-own-oserror"])
    def test_an_error_of_fill_passes_through_unchanged(self, make_storage: MakeStorage, kind: str) -> None:
        """The caller's error comes out as it is. An OSError may come out named instead (a StorageError,
        errno kept, caused by it): a backend that hands ``fill`` its raw file cannot tell the caller's
        OSError from the file's own; never a raw OSError other than the caller's."""
        error = Boom("fill failed") if kind == "its-own-error" else OSError(errno.EIO, "the caller's own")
        s = make_storage()
        save = new_save(4)
        staging = s.begin(save.name, save.token)
        file, data = next(iter(save.files.items()))
        staging.write(file, lambda f: f.write(data))

        def fill(f: Any) -> None:
            f.write(b"partial" * 100)
            raise error

        with pytest.raises(type(error)) as caught:
            staging.write(f"data-{save.token}-failed.bin", fill)
        got = caught.value
        if isinstance(error, OSError) and got is not error:
            assert isinstance(got, StorageError) and got.__cause__ is error and got.errno == error.errno, got
        else:
            assert got is error, "the caller's error must not be wrapped"
        staging.abort()
        assert self.sizes(s, staging.dir) == {} and self.sizes(s, save.name) == {}
        assert make_storage().committed_steps() == []
        assert self.files_under(s) == []

    def test_write_all_failing_part_way_passes_the_error_and_abort_leaves_nothing(
        self, make_storage: MakeStorage
    ) -> None:
        """Files filled before the failing one may not be durable yet (they are made durable together at
        the end): they are closed, not leaked, and ``abort`` removes them with the rest."""
        s = make_storage()
        save = new_save(5, nfiles=3)
        staging = s.begin(save.name, save.token)
        files = list(save.files.items())

        def fill(f: Any) -> None:
            f.write(b"partial" * 100)
            raise Boom("the third file fails")

        opened: list[Any] = []
        real_open = staging._open
        staging._open = lambda name: opened.append(real_open(name)) or opened[-1]  # type: ignore[method-assign]
        fills = [(file, lambda f, data=data: f.write(data)) for file, data in files[:2]] + [(files[2][0], fill)]
        with pytest.raises(Boom):
            staging.write_all(fills)
        assert len(opened) == 3
        if staging.sync_together:  # (fsspec's memory files stay open after close, to be read)
            assert opened[0].closed and opened[1].closed, "the files filled before the failure must be closed"
        staging.abort()
        assert self.sizes(s, staging.dir) == {} and make_storage().committed_steps() == []
        assert self.files_under(s) == []

    def test_write_all_of_many_files_commits_them_all(self, make_storage: MakeStorage) -> None:
        """More files than are kept open at once: each comes back whole, in order."""
        s = make_storage()
        save = new_save(6, nfiles=_MAX_UNSYNCED + 3, nbytes=200)
        write(s, save)
        reader = make_storage()
        assert reader.committed_steps() == [6] and self.sizes(reader, save.name) == save.sizes
        for file, data in save.files.items():
            assert reader.read_range(save.rel(file), 0, len(data)) == data

    # --- deleting, and what is missing -------------------------------------------------------------------

    def test_delete_makes_the_checkpoint_vanish_first(self, make_storage: MakeStorage) -> None:
        """The first removal is the manifest's (object stores), or a rename of the whole step directory out
        of the way (local disk): either way no reader lists or opens the checkpoint before its data goes."""
        s = make_storage()
        gone, kept = new_save(1), new_save(2)
        write(s, gone)
        write(s, kept)
        plan = FaultPlan()  # counts and logs the calls, fails none
        deleter = make_storage(plan)
        with deleter.lock():
            deleter.delete(gone.name)
        assert plan.count > 0, "make_storage(plan) must route the backend's calls through the plan"
        removals = [(kind, path) for kind, path in plan.log if kind in DELETE_KINDS]
        assert removals, plan.log
        kind, path = removals[0]
        if kind == "rename":
            src, _, dst = path.partition(" -> ")
            assert src.rstrip("/").endswith(gone.name) and parse_step(dst.rstrip("/").rsplit("/", 1)[-1]) is None
        else:
            assert path.endswith(MANIFEST_NAME), plan.log
        reader = make_storage()
        assert reader.committed_steps() == [2] and not reader.is_committed(gone.name)
        assert self.sizes(reader, gone.name) == {}
        with pytest.raises(CheckpointNotFoundError):
            reader.read_bytes(gone.manifest_rel, 1 << 20)
        file = next(iter(gone.files))
        with pytest.raises(CorruptCheckpointError):
            reader.open_read(gone.rel(file))
        with pytest.raises(CorruptCheckpointError):
            reader.read_range(gone.rel(file), 0, 10)
        with s.lock():
            s.delete(gone.name)  # again: nothing there, no error
            s.delete(step_name(99))
        assert reader.committed_steps() == [2]
        for file, data in kept.files.items():
            assert reader.read_range(kept.rel(file), 0, len(data)) == data

    def test_a_delete_cut_short_is_never_listed_and_is_cleaned_up(self, make_storage: MakeStorage) -> None:
        s = make_storage()
        save = new_save(1)
        write(s, save)
        # The manifest goes (or the directory is renamed away), then the next removal fails: an error, or
        # (local disk, where the renamed tree is removed best effort) a leftover for the next clean-up.
        plan = FaultPlan(fail_at=2, kinds=DELETE_KINDS)
        deleter = make_storage(plan)
        try:
            with deleter.lock():
                deleter.delete(save.name)
        except StorageError as e:
            assert e.errno == errno.ENOSPC
        assert plan.fired == 1
        assert s.committed_steps() == [] and not s.is_committed(save.name)
        with pytest.raises(CheckpointNotFoundError):
            s.read_bytes(save.manifest_rel, 1 << 20)
        with knobs.override(stale_after_s=0), s.lock():
            assert any(save.name in name for name in s.clean_leftovers())
        assert self.files_under(s) == []

    # --- small files beside the checkpoints (leases) -----------------------------------------------------

    def test_put_listdir_remove(self, make_storage: MakeStorage) -> None:
        s, other = make_storage(), make_storage()
        assert self.names(s, "leases") == [] and self.names(s, "leases/step_00000001") == []
        s.remove("leases/step_00000001/nobody")  # missing: no error
        s.put("leases/step_00000001/a", b"1")
        s.put("leases/step_00000001/b")
        assert sorted(self.names(other, "leases/step_00000001")) == ["a", "b"]
        assert self.names(other, "leases") == ["step_00000001"]
        assert other.read_bytes("leases/step_00000001/a", 10) == b"1"
        assert self.sizes(other, "leases/step_00000001") == {"a": 1, "b": 0}
        s.put("leases/step_00000001/a", b"22")  # replaced
        assert other.read_bytes("leases/step_00000001/a", 10) == b"22"
        other.remove("leases/step_00000001/a")
        other.remove("leases/step_00000001/a")
        assert self.names(s, "leases/step_00000001") == ["b"]
        s.remove("leases/step_00000001/b")
        assert self.names(s, "leases/step_00000001") == []
        assert s.committed_steps() == []  # small files are not checkpoints

    # --- every failure named at the boundary -------------------------------------------------------------

    @pytest.mark.parametrize("after", [False, True], ids=["fails", "takes-effect-then-fails"])
    def test_a_fault_at_any_call_is_a_named_error(self, make_storage: MakeStorage, after: bool) -> None:
        """The k-th counted filesystem call of a whole save (write, commit, reads, leases, delete, clean-up)
        fails, for every k: whatever a Storage or Staging method raises is a CkptStoreError (StorageError,
        errno kept, for the injected OSError); a listed checkpoint is whole; what is left can be removed."""
        view = make_storage()
        named = 0
        kinds = set()
        for k in itertools.count(1):
            plan = FaultPlan(fail_at=k, after=after)
            save = new_save(k, nfiles=1, nbytes=300)
            error = lifecycle(make_storage(plan), save)
            if plan.count < k:  # the whole lifecycle made fewer than k calls
                assert error is None, _describe(error)
                break
            if not plan.fired:  # call k failed by itself (a probe the backend expects to fail), handled
                continue
            where = f"fault at call {k} ({plan.log[k - 1][0]} {plan.log[k - 1][1]})"
            kinds.add(plan.log[k - 1][0])
            if error is not None:
                assert isinstance(error, CkptStoreError), f"{where}: {_describe(error)}"
                injected = next((e for e in named_chain(error) if isinstance(e, InjectedFault)), None)
                if injected is not None:
                    named += 1
                    assert isinstance(error, StorageError), f"{where}: {_describe(error)}"
                    assert error.errno == injected.errno, f"{where}: errno {error.errno}: {_describe(error)}"
            listed = view.committed_steps()
            assert listed in ([], [k]), f"{where}: {listed}"
            if listed:  # committed after all (a lost response): the checkpoint is whole
                assert view.read_bytes(save.manifest_rel, 1 << 20) == save.manifest, where
                assert self.sizes(view, save.name) == save.sizes, where
            with view.lock():
                view.delete(save.name)
            view.remove(LEASE)
            with knobs.override(stale_after_s=0), view.lock():
                view.clean_leftovers()
            assert self.files_under(view) == [], f"{where}: left behind"
        assert k > 3, "make_storage(plan) must route the backend's calls through the plan"
        assert named > 0 and len(kinds) >= 2, (named, kinds)

    # --- several threads (a second Storage object stands for another process) ---------------------------

    def test_a_delete_racing_readers_gives_right_bytes_or_a_named_error(self, make_storage: MakeStorage) -> None:
        writer, reader = make_storage(), make_storage()
        for r in range(self.race_rounds):
            save = new_save(1, seed=r, nfiles=2, nbytes=4000)  # the same step, a new checkpoint each round
            write(writer, save)
            assert reader.read_bytes(save.manifest_rel, 1 << 20) == save.manifest  # opened before the delete
            go = threading.Barrier(2)
            got: list[str] = []
            thread = threading.Thread(target=read_until_gone, args=(reader, save, go, got, self.phantoms))
            thread.start()
            go.wait()
            with writer.lock():
                writer.delete(save.name)
            thread.join()
            bad = [o for o in got if not o.startswith(("ok", "named"))]
            assert got[0] == "ok" and not bad, f"round {r}: {got}"
            with pytest.raises(CorruptCheckpointError):  # once deleted, every read is a named error
                reader.read_range(save.rel(next(iter(save.files))), 0, 10)

    def test_listings_racing_commits_are_ascending_fresh_and_never_lose_a_step(self, make_storage: MakeStorage) -> None:
        writer, lister = make_storage(), make_storage()
        steps = list(range(1, self.commits_listed + 1))
        random.Random(0).shuffle(steps)  # committed out of order: listings must still be ascending
        begun: set[int] = set()
        done: set[int] = set()
        guard = threading.Lock()
        stop = threading.Event()
        problems: list[str] = []
        listings = [0]

        def list_loop() -> None:
            seen: set[int] = set()
            while True:
                last = stop.is_set()
                with guard:
                    done_before = set(done)
                listing = lister.committed_steps()
                with guard:
                    begun_after = set(begun)
                listings[0] += 1
                if listing != sorted(set(listing)):
                    problems.append(f"not ascending: {listing}")
                if not set(listing) <= begun_after:
                    problems.append(f"never committed: {sorted(set(listing) - begun_after)}")
                if not done_before <= set(listing):
                    problems.append(f"committed but not listed: {sorted(done_before - set(listing))}")
                if not seen <= set(listing):
                    problems.append(f"seen, then lost: {sorted(seen - set(listing))}")
                seen = set(listing)
                if last or len(problems) > 10:
                    return

        thread = threading.Thread(target=list_loop)
        thread.start()
        try:
            for step in steps:
                with guard:
                    begun.add(step)
                write(writer, new_save(step, nfiles=1, nbytes=100))
                with guard:
                    done.add(step)
        finally:
            stop.set()
            thread.join()
        assert not problems, problems[:10]
        assert listings[0] >= 2
        assert lister.committed_steps() == sorted(steps)

    def test_two_writers_racing_for_one_step_exactly_one_wins(self, make_storage: MakeStorage) -> None:
        a, b = make_storage(), make_storage()
        for r in range(1, self.writer_races + 1):
            saves = [new_save(r, seed=0), new_save(r, seed=1)]
            go = threading.Barrier(2)
            results: list[BaseException | None] = [None, None]

            def run(i: int, storage: Storage, go: Any = go, saves: Any = saves, results: Any = results) -> None:
                go.wait()
                try:
                    write(storage, saves[i])
                except BaseException as e:
                    results[i] = e

            threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate((a, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i in (0, 1) if results[i] is None]
            assert len(winners) == 1, f"round {r}: {results}"
            assert isinstance(results[1 - winners[0]], CheckpointExistsError), results
            won = saves[winners[0]]
            assert a.read_bytes(won.manifest_rel, 1 << 20) == won.manifest
            assert self.sizes(b, won.name) == won.sizes  # the loser's files are gone
        assert a.committed_steps() == list(range(1, self.writer_races + 1))


#: Kinds of counted calls that remove something (tests/faults.py: FaultyOps and FaultyFS).
DELETE_KINDS = frozenset({"unlink", "rename", "rmdir", "delete"})
LEASE = "leases/step_00000001/reader"


def lifecycle(s: Storage, save: Save) -> BaseException | None:
    """A whole save and what follows it, on ``s``: write and commit, every read, a lease, delete and
    clean-up. Returns the first exception a Storage or Staging method raised, or None."""
    try:
        write(s, save)
        s.committed_steps()
        s.is_committed(save.name)
        s.read_bytes(save.manifest_rel, 1 << 20)
        s.sizes(save.name)
        file = next(iter(save.files))
        s.read_range(save.rel(file), 0, 100)
        f = s.open_read(save.rel(file))
        try:
            f.seek(10)
            f.readinto(bytearray(50))
        finally:
            f.close()
        s.put(LEASE, b"1")
        s.listdir("leases/step_00000001")
        s.remove(LEASE)
        with s.lock():
            s.delete(save.name)
        with knobs.override(stale_after_s=0), s.lock():
            s.clean_leftovers()
    except Exception as e:
        return e
    return None


def read_until_gone(reader: Storage, save: Save, go: threading.Barrier, out: list[str], phantoms: bool) -> None:
    """Read every file of ``save`` (sizes, open_read, read_range) once, then over and over while it is
    deleted; record "ok", "named: ..." (a CkptStoreError, which ends the reading), "WRONG: ..." or
    "UNNAMED: ..." for each pass."""
    try:
        read_pass(reader, save, out, phantoms)  # before the delete: must be "ok"
    finally:
        go.wait()
    for _ in range(20):
        if not read_pass(reader, save, out, phantoms):
            return


def read_pass(reader: Storage, save: Save, out: list[str], phantoms: bool) -> bool:
    """One read of every file of ``save``; record its outcome; False once reading failed."""
    for file, data in save.files.items():
        rel = save.rel(file)
        try:
            sizes = drop_phantom(reader.sizes(save.name), save.name, phantoms)
            wrong = {n: v for n, v in sizes.items() if save.sizes.get(n) != v}
            if wrong:
                out.append(f"WRONG: sizes {wrong}")
            f = reader.open_read(rel)
            try:
                f.seek(100)
                buf = bytearray(1000)
                n = f.readinto(buf) or 0
            finally:
                f.close()
            if bytes(buf[:n]) != data[100 : 100 + n]:
                out.append(f"WRONG: open_read of {rel}")
            if reader.read_range(rel, 50, 2000) != data[50:2000]:
                out.append(f"WRONG: read_range of {rel}")
        except CkptStoreError as e:
            out.append(f"named: {type(e).__name__}")
            return False
        except BaseException as e:
            out.append(f"UNNAMED: {_describe(e)}")
            return False
    out.append("ok")
    return True


def _describe(e: BaseException | None) -> str:
    return "".join(traceback.format_exception(e)) if e is not None else "no error"
