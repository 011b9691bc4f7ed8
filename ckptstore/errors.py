"""Every error ckptstore raises on purpose.

One base class, :class:`CkptStoreError`. Where a builtin exception fits, an error inherits it as well, so
callers may catch either (``except FileNotFoundError`` still catches :class:`CheckpointNotFoundError`).
Messages name the step, key path or file concerned.
"""

from __future__ import annotations

__all__ = [
    "AsyncSaveError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CkptStoreError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "DistributedError",
    "ShardingError",
    "StorageError",
    "StructureMismatchError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
]


class CkptStoreError(Exception):
    """Base class of every error raised by ckptstore."""


class CheckpointNotFoundError(CkptStoreError, FileNotFoundError):
    """No committed checkpoint at the step or path asked for."""


class CheckpointExistsError(CkptStoreError, FileExistsError):
    """A committed checkpoint already holds this step (pass ``overwrite=True`` to replace it)."""


class UnsupportedTypeError(CkptStoreError, TypeError):
    """A leaf of the state cannot be saved; the message names its key path."""


class StructureMismatchError(CkptStoreError, ValueError):
    """The checkpoint's tree does not fit the ``like`` template; the message names the key path."""


class CorruptCheckpointError(CkptStoreError, ValueError):
    """A manifest or tensor file is unreadable, inconsistent, truncated or fails its checksum."""


class CorruptCheckpointWarning(UserWarning):
    """``restore(fallback=True)`` skipped damaged checkpoints; the message names each one and why."""


class UnsupportedFormatError(CorruptCheckpointError):
    """The checkpoint was written in a format version this ckptstore cannot read."""


class StorageError(CkptStoreError, OSError):
    """The filesystem failed (after retries, where the filesystem is remote)."""


class AsyncSaveError(CkptStoreError):
    """A background save failed; raised by the store's next save, ``wait_until_finished`` or ``close``
    (the original error is its ``__cause__``, and its handle's ``result()`` raises it as is)."""


class ShardingError(CkptStoreError, ValueError):
    """Shards of an array do not fit its global shape: a block reaches outside it, blocks overlap or leave
    a gap, or the ranks disagree about the array; the message names the key path."""


class DistributedError(CkptStoreError, RuntimeError):
    """A save or restore across ranks failed: another rank failed, died or timed out (nothing was
    committed); the message names the rank where it is known."""
