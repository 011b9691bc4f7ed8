"""The storage contract: step directory names, :class:`Storage` and :class:`Staging`."""

from __future__ import annotations

import contextlib
import re
import uuid
from abc import ABC, abstractmethod
from typing import Any, BinaryIO

from ..errors import (
    CkptStoreError,
)
from ..tensorio import Readable

STEP_RE = re.compile(r"step_([0-9]{8,20})")
LOCK_NAME = ".ckptstore.lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def step_name(step: int) -> str:
    """The directory name of a step: ``step_`` and the step zero-padded to at least 8 digits."""
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a directory name, or None unless the name is exactly what :func:`step_name` gives."""
    m = STEP_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_name(step) == name else None


def new_token() -> str:
    """A writer token: unique per save, recorded in the manifest and in data file names."""
    return uuid.uuid4().hex[:16]


class Staging(ABC):
    """One save in progress: a place to write data files, then commit or abort."""

    #: Relative directory the data files go to (``open`` takes names inside it).
    dir: str

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A new data file; it is made durable by :meth:`close_file`."""

    @abstractmethod
    def close_file(self, f: BinaryIO) -> None:
        """Flush, make durable (fsync where the filesystem has it) and close a data file."""

    @abstractmethod
    def commit(self, manifest: bytes, *, overwrite: bool) -> None:
        """Publish the checkpoint atomically. Raises CheckpointExistsError if the step is taken."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever this save wrote (best effort; leftovers are cleaned by a later writer)."""

    def adopt(self, names: list[str]) -> None:  # noqa: B027 - optional hook; local staging needs nothing
        """Count data files that other processes wrote into :attr:`dir` (the other ranks of a distributed
        save) as this save's own: commit keeps them, abort removes them."""


class Storage(ABC):
    """A store root on some filesystem."""

    #: Whether a directory can be published by one atomic rename.
    atomic_rename: bool
    #: The root as the user should see it (path or URL).
    url: str

    @abstractmethod
    def url_of(self, rel: str) -> str:
        """Path or URL of something under the root, as a user would pass it back to ckptstore."""

    @abstractmethod
    def begin(self, name: str, token: str) -> Staging:
        """Start writing a checkpoint directory ``name`` (relative to the root)."""

    def join(self, name: str, token: str) -> Staging:
        """Write data files into the save that another process began with ``begin(name, token)`` (another
        rank of a distributed save). That process alone commits or aborts the checkpoint: this staging's
        ``commit`` is refused and its ``abort`` removes only the files it wrote."""
        raise CkptStoreError(f"{type(self).__name__} cannot take part in a save across processes")

    @abstractmethod
    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialise commits, deletions and clean-ups (between processes where the filesystem allows)."""

    @abstractmethod
    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists, ascending, listed fresh (no cached listing)."""

    @abstractmethod
    def read_bytes(self, rel: str, limit: int) -> bytes:
        """A whole small file (a manifest); raises CheckpointNotFoundError if it does not exist."""

    @abstractmethod
    def open_read(self, rel: str) -> Readable:
        """A file for ranged reads (``seek`` + ``readinto``); the caller closes it."""

    @abstractmethod
    def sizes(self, rel_dir: str) -> dict[str, int]:
        """Names and sizes of the files in a directory."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint directory: its manifest first, then its data. Call under
        :meth:`lock`. Deleting what does not exist does nothing."""

    @abstractmethod
    def is_committed(self, name: str) -> bool:
        """Whether the checkpoint directory ``name`` has its manifest."""

    @abstractmethod
    def clean_leftovers(self) -> list[str]:
        """Remove what crashed writers left (temp data, half-deleted steps); return what was removed.
        Call under :meth:`lock`."""
