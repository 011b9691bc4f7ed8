"""Fault injection for the reliability tests: wrapper backends that fail, or lose power, at a chosen call.

* :class:`FaultPlan` counts the filesystem calls a save or a retention pass makes and fails the k-th one
  (before it happens, or after it, like a PUT whose response is lost), once or from then on.
* :class:`FaultyOps` puts a plan between :class:`~ckptstore.storage.LocalStorage` and the disk;
  :class:`FaultyFS` between :class:`~ckptstore.storage.FsspecStorage` and any fsspec filesystem.
* :class:`PowerLossOps` records what was made durable (file data by fsync, directory entries by fsync of
  the directory) and builds the directory a power cut at any point would leave behind, in the manner of
  LevelDB's fault_injection_test and SQLite's crash VFS: unsynced data dropped or torn, unsynced directory
  entries lost or kept, each independently.
* :func:`check_store` states what must hold afterwards; :func:`state_of` builds states whose bytes encode
  their step, so a mixed-up checkpoint cannot pass for another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import fsspec
import numpy as np

import ckptstore
from ckptstore.errors import CkptStoreError
from ckptstore.storage import TMP_PREFIX, TRASH_PREFIX, LocalOps, parse_step

# --- states whose content says which step they are ---------------------------------------------------


def state_of(step: int, nbytes: int = 4096) -> dict[str, Any]:
    """A small training-like state whose every array encodes ``step`` (several tensors, plain values)."""
    n = max(1, nbytes // 8)
    return {
        "model": {"w": np.full(n, step, dtype=np.int64), "b": np.arange(16, dtype=np.float32) + step},
        "opt": {"step": step, "lr": 0.1, "betas": (0.9, 0.999)},
        "rng": np.array([step, step * 7 + 1], dtype=np.uint64),
        "step": step,
    }


def check_state(step: int, state: Any) -> None:
    """Raise AssertionError unless ``state`` is exactly what :func:`state_of` gave for ``step``."""
    assert state["step"] == step, (state["step"], step)
    assert state["opt"]["step"] == step
    assert np.all(state["model"]["w"] == step), f"step {step}: model.w holds another step's bytes"
    assert np.array_equal(state["model"]["b"], np.arange(16, dtype=np.float32) + step)
    assert state["rng"].tolist() == [step, step * 7 + 1]


def leftovers(root: str) -> list[str]:
    """Names in a local store root that only a crashed or failed writer leaves: temp and trash
    directories, step directories without a manifest."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        half_deleted = parse_step(name) is not None and not os.path.exists(os.path.join(path, "manifest.msgpack"))
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)) or half_deleted:
            out.append(name)
    return out


def check_store(store: ckptstore.CheckpointStore, must_have: Iterable[int] = ()) -> list[int]:
    """Every listed step verifies byte by byte and restores to its own state; every step in ``must_have``
    is listed. Returns the listed steps."""
    steps = store.steps()
    missing = sorted(set(must_have) - set(steps))
    assert not missing, f"steps {missing} were committed and are gone (listed: {steps})"
    store.verify()
    for s in steps:
        check_state(s, store.restore(s))
    return steps


# --- which call fails ------------------------------------------------------------------------------


class InjectedFault(OSError):
    """Marks a failure the harness made (tests check that the library wraps or passes it on clearly)."""


def enospc(kind: str, path: str) -> OSError:
    return InjectedFault(errno.ENOSPC, f"No space left on device (injected at {kind})", path)


def eio(kind: str, path: str) -> OSError:
    return InjectedFault(errno.EIO, f"Input/output error (injected at {kind})", path)


@dataclasses.dataclass
class FaultPlan:
    """Counts filesystem calls; the ``fail_at``-th (1-based) fails.

    Args:
        fail_at: which call fails (None: none; the plan only counts and logs).
        error: builds the exception from the call's kind and path.
        after: the call takes effect, then fails (a lost response) instead of failing before.
        sticky: every later call fails too (a disk that stays full), until :meth:`heal`.
        kinds: only calls of these kinds are counted (None: all).
    """

    fail_at: int | None = None
    error: Callable[[str, str], BaseException] = enospc
    after: bool = False
    sticky: bool = False
    kinds: frozenset[str] | None = None
    count: int = 0
    fired: int = 0
    log: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    healed: bool = False

    #: Called before every counted call with its kind and path (PowerLossOps takes images there).
    hook: Callable[[str, str], None] | None = None

    def _count(self, kind: str, path: str) -> int:
        if self.kinds is not None and kind not in self.kinds:
            return 0
        with _COUNT_LOCK:  # writers may use threads; each call gets its own number
            self.count += 1
            self.log.append((kind, path))
            return self.count

    def _fire(self, n: int, kind: str, path: str, after: bool) -> None:
        if not n or after != self.after or self.healed or self.fail_at is None:
            return
        if n == self.fail_at or (self.sticky and n > self.fail_at):
            self.fired += 1
            raise self.error(kind, path)

    def heal(self) -> None:
        """No call fails from now on."""
        self.healed = True

    def run(self, kind: str, path: str, fn: Callable[[], Any]) -> Any:
        """Make one counted call ``fn`` of ``kind`` on ``path``, failing it if the plan says so."""
        n = self._count(kind, path)
        if n and self.hook is not None:
            self.hook(kind, path)
        self._fire(n, kind, path, after=False)
        out = fn()
        self._fire(n, kind, path, after=True)
        return out


_COUNT_LOCK = threading.Lock()


class _PlannedFile:
    """A file being written whose ``write`` calls count as filesystem calls of a plan."""

    def __init__(self, f: Any, plan: FaultPlan, path: str, close_kind: str | None = None) -> None:
        self._f, self._plan, self._path, self._close_kind = f, plan, path, close_kind

    def write(self, data: Any) -> int:
        return int(self._plan.run("write", self._path, lambda: self._f.write(data)))

    def close(self) -> None:
        if self._f.closed:
            return
        if self._close_kind is None:
            self._f.close()
        else:
            self._plan.run(self._close_kind, self._path, self._f.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _PlannedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyOps(LocalOps):
    """LocalStorage's filesystem calls, each counted by a :class:`FaultPlan` (which may fail it)."""

    def __init__(self, plan: FaultPlan | None = None, *, sync: bool = True) -> None:
        self.plan = plan or FaultPlan()
        #: False: fsync calls are counted but not made (tests whose disk is a model, or throwaway).
        self.sync = sync

    def mkdir(self, path: str) -> None:
        self.plan.run("mkdir", path, lambda: super(FaultyOps, self).mkdir(path))

    def create(self, path: str) -> BinaryIO:
        f = self.plan.run("create", path, lambda: super(FaultyOps, self).create(path))
        return _PlannedFile(f, self.plan, path)  # type: ignore[return-value]

    def fsync(self, f: BinaryIO) -> None:
        inner = f._f if isinstance(f, _PlannedFile) else f  # type: ignore[attr-defined]
        sync = super().fsync if self.sync else type(inner).flush
        self.plan.run("fsync", getattr(inner, "name", "?"), lambda: sync(inner))

    def fsync_dir(self, path: str) -> None:
        self.plan.run("fsync_dir", path, lambda: super(FaultyOps, self).fsync_dir(path) if self.sync else None)

    def rename(self, src: str, dst: str) -> None:
        self.plan.run("rename", f"{src} -> {dst}", lambda: super(FaultyOps, self).rename(src, dst))

    def unlink(self, path: str) -> None:
        self.plan.run("unlink", path, lambda: super(FaultyOps, self).unlink(path))

    def rmdir(self, path: str) -> None:
        self.plan.run("rmdir", path, lambda: os.rmdir(path))

    def rmtree(self, path: str) -> None:
        # One counted call per entry removed, best effort like shutil.rmtree(ignore_errors=True).
        if not os.path.lexists(path):
            return
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                with contextlib.suppress(OSError):
                    self.unlink(os.path.join(dirpath, name))
            with contextlib.suppress(OSError):
                self.rmdir(dirpath)


class FaultyFS:
    """An fsspec filesystem whose writes (``open(..., "wb")`` data and its PUT on close, ``pipe_file``) and
    deletions (``rm_file``, ``rm``) are counted by a :class:`FaultPlan`; every other call passes through."""

    def __init__(self, fs: fsspec.AbstractFileSystem, plan: FaultPlan | None = None) -> None:
        self._fs = fs
        self.plan = plan or FaultPlan()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" not in mode:
            return self._fs.open(path, mode, **kwargs)
        f = self.plan.run("open", path, lambda: self._fs.open(path, mode, **kwargs))
        return _PlannedFile(f, self.plan, path, close_kind="put")  # close() uploads, on an object store

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> Any:
        return self.plan.run("put", path, lambda: self._fs.pipe_file(path, value, **kwargs))

    def call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """s3fs's raw API calls (ckptstore's parallel uploads use them): uploads and deletions count."""
        kind = _S3_KINDS.get(method)
        if kind is None:
            return self._fs.call_s3(method, *args, **kwargs)
        path = f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"
        return self.plan.run(kind, path, lambda: self._fs.call_s3(method, *args, **kwargs))

    def rm_file(self, path: str) -> Any:
        return self.plan.run("delete", path, lambda: self._fs.rm_file(path))

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        paths = [path] if isinstance(path, str) else list(path)
        for p in paths:  # one call per object, as a client deleting a batch may fail part way
            self.plan.run("delete", p, lambda p=p: self._fs.rm(p, *args, **kwargs))


_S3_KINDS = {
    "put_object": "put",
    "create_multipart_upload": "put",
    "upload_part": "put",
    "complete_multipart_upload": "put",
    "delete_object": "delete",
    "delete_objects": "delete",
}


# --- power loss ------------------------------------------------------------------------------------


class PowerCut(BaseException):
    """Raised at a simulated power cut: nothing after it runs (``except Exception`` does not catch it)."""


class PowerLossOps(FaultyOps):
    """LocalOps that track what a power cut would keep, and can build that directory at any moment.

    A model of a POSIX filesystem after power loss: a file keeps the data it had at its last fsync; a
    directory keeps the entries it had at its last fsync. Anything newer may be lost, or (mode "random")
    survive, each file's data and each directory entry independently (so renames are not assumed atomic
    across directories, nor ordered with anything else). Objects are tracked by inode, since renames move
    directories with their contents.

    ``drop`` removes one kind of fsync from the library (as if that line were deleted) to show that the
    tests notice: a predicate over (kind, path, the name the last rename gave: which fsync of the root
    follows a commit, which a deletion).
    """

    def __init__(self, root: str, drop: Callable[[str, str, str], bool] | None = None) -> None:
        super().__init__(FaultPlan(), sync=False)  # the model decides what is durable, not the real disk
        self.root = os.path.abspath(root)
        self.drop = drop or (lambda kind, path, renamed: False)
        self.renamed = ""  # the basename the last rename gave
        self._next = 0
        self._ino: dict[int, int] = {}  # live inode -> object id
        self._kind: dict[int, str] = {}  # object id -> "f" | "d"
        self._data: dict[int, bytes] = {}  # file id -> durable bytes
        self._entries: dict[int, dict[str, int]] = {}  # dir id -> durable {name: object id}
        self._root_id = self._adopt_tree(self.root)

    # Bookkeeping.
    def _new(self, path: str, kind: str, durable: Any) -> int:
        oid = self._next
        self._next += 1
        self._ino[os.lstat(path).st_ino] = oid
        self._kind[oid] = kind
        (self._data if kind == "f" else self._entries)[oid] = durable
        return oid

    def _id(self, path: str) -> int:
        st = os.lstat(path)
        kind = "d" if os.path.isdir(path) and not os.path.islink(path) else "f"
        oid = self._ino.get(st.st_ino)
        if oid is None or self._kind[oid] != kind:  # made outside the wrapper (lock and liveness files)
            oid = self._new(path, kind, b"" if kind == "f" else {})
        return oid

    def _adopt_tree(self, path: str) -> int:
        """Everything already on disk when recording starts counts as durable."""
        if os.path.isdir(path) and not os.path.islink(path):
            entries = {name: self._adopt_tree(os.path.join(path, name)) for name in sorted(os.listdir(path))}
            return self._new(path, "d", entries)
        with open(path, "rb") as f:
            return self._new(path, "f", f.read())

    def _current_entries(self, path: str) -> dict[str, int]:
        return {name: self._id(os.path.join(path, name)) for name in sorted(os.listdir(path))}

    # The calls.
    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self._new(path, "d", {})

    def create(self, path: str) -> BinaryIO:
        f = super().create(path)
        self._new(path, "f", b"")
        return f

    def fsync(self, f: BinaryIO) -> None:
        inner = f._f if isinstance(f, _PlannedFile) else f  # type: ignore[attr-defined]
        path = inner.name
        if self.drop("fsync", path, self.renamed):
            inner.flush()
            return
        super().fsync(f)
        self._data[self._id(path)] = _read(path)

    def fsync_dir(self, path: str) -> None:
        if self.drop("fsync_dir", path, self.renamed):
            return
        super().fsync_dir(path)
        self._entries[self._id(path)] = self._current_entries(path)

    def _gone(self, path: str, remove: Callable[[str], None]) -> None:
        """Remove ``path``; then its inode number may be reused by a new object, so forget it (after the
        call: the image hook runs inside it and must still see the old object)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        remove(path)
        if st is not None and (st.st_nlink <= 1 or os.path.isdir(path)):
            self._ino.pop(st.st_ino, None)

    def unlink(self, path: str) -> None:
        self._gone(path, super().unlink)

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.renamed = os.path.basename(dst)

    def rmdir(self, path: str) -> None:
        self._gone(path, super().rmdir)

    # The image.
    def image(self, dst: str, mode: str = "strict", rng: random.Random | None = None) -> None:
        """Write to ``dst`` the store root as a power cut right now would leave it.

        mode "strict": only what was made durable survives. mode "random": each unsynced change (a file's
        newer data, in full or torn at a random length; a directory entry added, removed or replaced)
        survives or not at random (``rng``). mode "adversarial": file data as in "strict"; every unsynced
        directory change survives, except the removal of a manifest or of a step name (the worst order for
        a reader: a checkpoint still visible, its data gone).
        """
        rng = rng or random.Random(0)
        current = self._snapshot_current()
        done: set[int] = set()

        def build(oid: int, path: str) -> None:
            if oid in done:  # an entry that survived in two places (an unsynced rename): keep one
                return
            done.add(oid)
            if self._kind[oid] == "f":
                data = self._data[oid]
                now = current["data"].get(oid)
                if mode == "random" and now is not None and now != data and rng.random() < 0.5:
                    data = now if not now.startswith(data) else now[: rng.randint(len(data), len(now))]
                with open(path, "wb") as f:
                    f.write(data)
                return
            os.mkdir(path)
            entries = dict(self._entries[oid])
            if mode != "strict" and oid in current["entries"]:
                now = current["entries"][oid]
                for name in sorted(set(entries) | set(now)):  # sorted: the same choices on every run
                    if entries.get(name) == now.get(name):
                        continue
                    if mode == "adversarial":
                        # The worst case for a reader: whatever makes a checkpoint visible survives (its
                        # manifest, its step name) and every other change went through.
                        keep_now = not (name == "manifest.msgpack" or parse_step(name) is not None)
                        keep_now = keep_now or name not in entries
                    else:
                        keep_now = rng.random() < 0.5
                    if not keep_now:
                        continue
                    if name in now:
                        entries[name] = now[name]
                    else:
                        del entries[name]
            # A directory kept under two names (an unsynced rename) is built once, preferably under the
            # name that makes it visible: the worst case again.
            for name, child in sorted(entries.items(), key=lambda e: (parse_step(e[0]) is None, e[0])):
                build(child, os.path.join(path, name))

        build(self._root_id, dst)

    def _snapshot_current(self) -> dict[str, dict[int, Any]]:
        data: dict[int, bytes] = {}
        entries: dict[int, dict[str, int]] = {}
        for dirpath, _, filenames in os.walk(self.root):
            entries[self._id(dirpath)] = self._current_entries(dirpath)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    data[self._id(path)] = _read(path)
        return {"data": data, "entries": entries}


# --- processes --------------------------------------------------------------------------------------


def spawn(target: Callable[..., Any], *args: Any) -> Any:
    """Start ``target(*args)`` in a new process, forked from a server that has imported ckptstore and
    numpy once (fast, unlike a fresh interpreter; safe, unlike a fork of the threaded test process)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ckptstore", "numpy", "tests.faults", "s3fs"])  # imports only: no threads
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def pipe() -> tuple[Any, Any]:
    """A one-way (reader, writer) pipe between processes made by :func:`spawn`."""
    import multiprocessing

    return multiprocessing.get_context("forkserver").Pipe(duplex=False)  # type: ignore[no-any-return]


def barrier(parties: int) -> Any:
    """A barrier for processes made by :func:`spawn` (to start racing calls at the same moment)."""
    import multiprocessing

    return multiprocessing.get_context("forkserver").Barrier(parties)


def drain(reader: Any) -> list[Any]:
    """Every message a (possibly killed) process managed to send."""
    out = []
    with contextlib.suppress(EOFError, OSError):
        while reader.poll(0):
            out.append(reader.recv())
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fresh_dir(path: str) -> str:
    """An empty directory at ``path`` (removed first if it exists)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def is_named_error(e: BaseException) -> bool:
    """Whether ``e`` is an error ckptstore raises on purpose (what every failure must surface as)."""
    return isinstance(e, CkptStoreError)
