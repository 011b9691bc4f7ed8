"""Every error ckptstore raises on purpose.

One base class, :class:`CkptStoreError`. Where a builtin exception fits, an error inherits it as well, so
callers may catch either (``except FileNotFoundError`` still catches :class:`CheckpointNotFoundError`).
Messages name the step, key path or file concerned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = [
    "AccessDeniedError",
    "ArrayDeletedError",
    "AsyncSaveError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CkptStoreError",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "DistributedError",
    "EndpointUnreachableError",
    "MissingCredentialsError",
    "PartialRestoreWarning",
    "ShardingError",
    "StorageError",
    "StructureMismatchError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
]


class CkptStoreError(Exception):
    """Base class of every error raised by ckptstore."""


class ConfigError(CkptStoreError, ValueError):
    """A setting is invalid: a ``CKPTSTORE_*`` environment variable whose value does not parse (raised when
    that knob is first read, never at import); the message names the variable and its value."""


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


class PartialRestoreWarning(UserWarning):
    """``restore(strict=False)`` left key paths unmatched. ``missing``: paths of ``like`` that the checkpoint
    lacks (kept as they are in ``like``); ``unexpected``: paths of the checkpoint that ``like`` lacks
    (dropped). Both are lists of rendered paths (``"state['sched']"``); the message names them too."""

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing: list[str] = list(missing or [])
        self.unexpected: list[str] = list(unexpected or [])


class UnsupportedFormatError(CorruptCheckpointError):
    """The checkpoint was written in a format version this ckptstore cannot read."""


class StorageError(CkptStoreError, OSError):
    """The filesystem failed (after retries, where the filesystem is remote)."""


class MissingCredentialsError(StorageError, PermissionError):
    """No usable credentials were found for a remote store (errno EACCES); nothing was sent."""


class AccessDeniedError(StorageError, PermissionError):
    """The server refused the request: unknown key, wrong secret, expired token or missing permission
    (errno EACCES). A PermissionError as well, as the error it replaces was."""


class EndpointUnreachableError(StorageError, ConnectionError):
    """The endpoint could not be connected to at all (errno ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH or
    ENETUNREACH)."""

    def __init__(
        self, message: str, *, code: int | None = None, endpoint: str | None = None, attempts: int | None = None
    ) -> None:
        super().__init__(message)
        self.errno = code
        #: ``scheme://host:port`` that could not be connected to, where known.
        self.endpoint = endpoint
        #: Connection attempts made (by the fail-fast session), where known.
        self.attempts = attempts


class AsyncSaveError(CkptStoreError):
    """A background save failed; raised by the store's next save, ``wait_until_finished`` or ``close``
    (the original error is its ``__cause__``, and its handle's ``result()`` raises it as is)."""


class ArrayDeletedError(CkptStoreError, RuntimeError):
    """An array a background save was writing without a snapshot copy (a JAX array on the CPU, immutable)
    was deleted, or donated to a computation, before its bytes were written; the save is not committed."""


class ShardingError(CkptStoreError, ValueError):
    """Shards of an array do not fit its global shape: a block reaches outside it, blocks overlap or leave
    a gap, or the ranks disagree about the array; the message names the key path."""


class WorldSizeError(ShardingError):
    """Per-rank state (``ckptstore.PerRank``) saved by one number of ranks is restored on another, and
    ``like`` gives no ``reshard`` function for it; the message names the key path and both numbers."""


class DistributedError(CkptStoreError, RuntimeError):
    """A save or restore across ranks failed: another rank failed, died or timed out (nothing was
    committed); the message names the rank where it is known."""


def short_repr(x: object) -> str:
    """``repr(x)`` for an error message: at most 80 characters, and never raising."""
    try:
        text = repr(x)
    except Exception:
        text = f"<a {type(x).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


# --- the storage boundary ---------------------------------------------------------------------------


def storage_error(e: BaseException, what: str) -> StorageError:
    """``e``, a failure of the filesystem or its client library, as a :class:`StorageError` whose message
    names ``what`` (the operation and its path or URL) and which keeps ``e``'s errno, so that
    ``err.errno == errno.ENOSPC`` still works."""
    code = e.errno if isinstance(e, OSError) else None
    detail = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
    message = f"{what}: {detail}{where}"
    return StorageError(code, message) if code is not None else StorageError(message)


#: ``describe(error, what)``: a more telling StorageError for a known kind of failure (missing
#: credentials, denied access, an unreachable endpoint), or None.
Describe = Callable[[BaseException, str], "StorageError | None"]


@contextlib.contextmanager
def storage_errors(
    what: str,
    *,
    catch: type[BaseException] | tuple[type[BaseException], ...] = OSError,
    describe: Describe | None = None,
) -> Iterator[None]:
    """The one wrapper at the storage boundary: inside the block, a failure of type ``catch`` (OSError;
    remote backends pass Exception, since client libraries raise their own types) is raised as a
    :class:`StorageError` naming ``what``; ckptstore's own errors pass unchanged.

    Example::

        with storage_errors(f"listing {url}"):
            entries = os.listdir(path)
    """
    try:
        yield
    except CkptStoreError:
        raise
    except catch as e:
        named = describe(e, what) if describe is not None else None
        raise (named or storage_error(e, what)) from e
