"""Retries of whole remote operations after transient failures, with exponential backoff and jitter.

Two layers retry, on purpose:

* the client library retries each HTTP request (botocore: 5xx, ``SlowDown``, throttling, connection
  errors; s3fs adds its own loop for timeouts and truncated bodies). A part of a multipart upload is one
  request, so a failed part is re-sent alone, not the whole file;
* :func:`call` (this module) retries a whole operation of the store (the manifest PUT, a ranged read, a
  listing, a delete) when the failure still looks transient after the client's retries, e.g. a connection
  reset in the middle of reading a response body, which botocore does not retry.

What is transient is decided from the exception chain, without importing any client library: connection
errors, timeouts, HTTP 5xx, ``SlowDown``/throttling. A missing object, a failed precondition or a denied
permission is never retried. When the retries are used up, :class:`ckptstore.errors.StorageError` is raised
with the operation and the path in its message.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import knobs
from ..errors import CkptStoreError, StorageError
from . import _s3

T = TypeVar("T")

# Error codes that S3-compatible servers use for "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
# Class names of client-library exceptions that mean the connection failed, not the request.
_TRANSIENT_CLASSES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ClientOSError",
        "FSTimeoutError",
        "HTTPClientError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: HTTP 503 (SlowDown) and 409
        getattr(errno, "EREMOTEIO", 121),  # s3fs: HTTP 500
    }
)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _response_says_transient(e: BaseException) -> bool | None:
    """True/False from an HTTP error response attached to ``e`` (botocore's ClientError), None if none."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _TRANSIENT_CODES:
        return True
    if isinstance(status, int):
        return status >= 500 or status == 429
    return None


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is worth retrying: a failed connection, a timeout, HTTP 5xx or throttling."""
    if isinstance(e, CkptStoreError) and not isinstance(e, StorageError):
        return False
    for err in _chain(e):
        verdict = _response_says_transient(err)
        if verdict is not None:
            return verdict
        if is_precondition_failed(err):
            return False
        if any(c.__name__ in _TRANSIENT_CLASSES for c in type(err).__mro__):
            return True
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if isinstance(err, _PERMANENT):
            return False
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _answered(e: BaseException, code: str, status: int) -> bool:
    """Whether ``e`` (or its cause) carries an HTTP answer (botocore's ClientError) with this error code or
    status."""
    for err in _chain(e):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            if (response.get("Error") or {}).get("Code") == code:
                return True
            if (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == status:
                return True
    return False


def is_invalid_range(e: BaseException) -> bool:
    """Whether ``e`` is an HTTP 416 / ``InvalidRange`` answer: a ranged GET that starts at or past the end of
    the object (an empty object included), which a file read answers with no bytes."""
    return _answered(e, "InvalidRange", 416)


def is_precondition_failed(e: BaseException) -> bool:
    """Whether ``e`` (or its cause) is an HTTP 412 / ``PreconditionFailed`` answer: an exclusive create
    that found the object there. s3fs turns it into FileExistsError only when the server names the
    condition (AWS, moto); SeaweedFS does not, and s3fs raises a plain OSError then."""
    return any(isinstance(err, FileExistsError) for err in _chain(e)) or _answered(e, "PreconditionFailed", 412)


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): full jitter over an exponential cap."""
    cap = min(knobs.current.retry_max_s, knobs.current.retry_base_s * (2 ** (attempt - 1)))
    return random.uniform(0, cap)


def call(fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried up to ``knobs.retries`` times after transient failures.

    Non-transient errors pass through unchanged (a missing object stays FileNotFoundError). Transient ones
    that outlast the retries become :class:`StorageError` naming ``what`` (the operation and path).
    """
    attempts = max(1, knobs.current.retries + 1)
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            # An endpoint never connected to was tried knobs.connect_retries times already (storage/_s3.py).
            if _s3.is_unreachable(e) or not is_transient(e):
                raise
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {e!r}") from e
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")
