"""S3 through s3fs: client options that make an unreachable endpoint fail fast, and named errors for the
three ways a new setup usually fails (no credentials; wrong keys or missing permissions; a wrong endpoint or
no network).

Nothing here imports botocore, aiobotocore or s3fs at module level: errors are classified by class names and
attributes along the ``__cause__``/``__context__`` chain, as the retry module does.

**Why an HTTP session class.** botocore retries "could not connect" with the same budget as HTTP 5xx and
``SlowDown`` (legacy mode: 5 attempts, up to 15 s of backoff), s3fs adds nothing for these errors, and
ckptstore's own retries multiplied the whole again: a refused connection failed after 30 to 60 s, a connect
that hangs after about two minutes. botocore's ``retries`` config cannot tell the two kinds of error apart,
and lowering ``max_attempts`` would cut the retries of a reachable but struggling service too. So
:func:`client_options` sets aiobotocore's ``http_session_cls`` to a session that retries a connection that
never came up ``knobs.connect_retries`` times itself, each attempt bounded by ``knobs.connect_timeout_s``,
and then raises :class:`NeverConnectedError`, which neither botocore nor s3fs retries. Whatever got an
answer, or lost its connection mid-request, still goes through botocore's retries unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
from typing import Any
from urllib.parse import urlsplit

from .. import knobs
from ..errors import AccessDeniedError, EndpointUnreachableError, MissingCredentialsError, StorageError

__all__ = [
    "S3_PROTOCOLS",
    "NeverConnectedError",
    "client_options",
    "describe",
    "is_unreachable",
]

#: fsspec protocols served by s3fs.
S3_PROTOCOLS = frozenset({"s3", "s3a"})


class NeverConnectedError(ConnectionError):
    """Raised by the fail-fast HTTP session once its connection attempts are used up: botocore and s3fs do
    not retry it (it is none of their types). Not a ckptstore error, on purpose: the storage boundary names
    it with :func:`describe`, which knows the URL."""

    def __init__(self, message: str, *, code: int, endpoint: str | None, attempts: int) -> None:
        super().__init__(message)
        self.errno = code
        self.endpoint = endpoint
        self.attempts = attempts


# Class names (anywhere in an exception's MRO) that mean: a connection was never established.
_NEVER_CONNECTED = frozenset(
    {
        "NeverConnectedError",  # ours: the session below gave up
        "EndpointUnreachableError",  # ours: named by describe()
        "ConnectTimeoutError",  # botocore, urllib3: the TCP connect timed out
        "ConnectionTimeoutError",  # aiohttp: the same
        "ClientConnectorError",  # aiohttp: refused, no route, DNS (ClientConnectorDNSError)
        "NewConnectionError",  # urllib3 (plain botocore)
        "ConnectionRefusedError",
        "gaierror",  # DNS
    }
)
_DNS = frozenset({"gaierror", "ClientConnectorDNSError", "NameResolutionError"})
_TIMEOUT = frozenset({"ConnectTimeoutError", "ConnectionTimeoutError"})
# TLS failures happen on a connection that did come up: not "unreachable" (and not worth retrying either).
_SSL = frozenset({"SSLError", "ClientSSLError", "SSLCertVerificationError"})
_NEVER_CONNECTED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})

# botocore errors raised before anything is sent: no credentials, or a credential source that failed.
_CREDENTIALS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "ProfileNotFound",
        "NoAuthTokenError",
        "SSOTokenLoadError",
        "UnauthorizedSSOTokenError",
        "TokenRetrievalError",
    }
)
# S3 error codes of a refused request, with what they mean.
_DENIED_CODES = {
    "InvalidAccessKeyId": "the server does not know this access key ID",
    "SignatureDoesNotMatch": "the secret key does not match the access key ID",
    "InvalidClientTokenId": "the server does not know this access key ID",
    "ExpiredToken": "the session token has expired: refresh the credentials",
    "TokenRefreshRequired": "the session token has expired: refresh the credentials",
    "InvalidToken": "the session token is invalid",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the server's: fix the system time",
    "AccessDenied": "the credentials lack a permission this operation needs",
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "AccountProblem": "the account has a problem that prevents this operation",
    "NotSignedUp": "the account is not signed up for S3",
    "InvalidSecurity": "the security credentials are invalid",
}


# --- classification ---------------------------------------------------------------------------------------


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and what caused it: ``__cause__``/``__context__``, and the ``error`` a botocore exception wraps."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [e]
    while todo and len(seen) < 16:
        cur = todo.pop(0)
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        for nxt in (cur.__cause__ or cur.__context__, _kwarg(cur, "error")):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _response(e: BaseException) -> tuple[str, int | None] | None:
    """(error code, HTTP status) of an HTTP answer attached to ``e`` (botocore's ClientError), or None."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def _server_message(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Message") or "")
    return ""


def is_unreachable(e: BaseException) -> bool:
    """Whether ``e`` means the endpoint could not be connected to at all: connection refused, the connect
    timed out, no route to the host, or its name does not resolve. False for everything that happened on a
    connection that did come up (an HTTP answer of any status, a reset or timeout mid-request, TLS errors).

    Retrying such an error at the operation level only repeats the wait: the HTTP session installed by
    :func:`client_options` has already tried ``knobs.connect_retries + 1`` times."""
    chain = _chain(e)
    for err in chain:
        if _response(err) is not None:
            return False  # an answer came back
        names = _names(err)
        if names & _SSL:
            return False
        if names & _NEVER_CONNECTED:
            return True
        if isinstance(err, OSError) and err.errno in _NEVER_CONNECTED_ERRNOS:
            return True
    # Plain botocore raises EndpointConnectionError only when it never connected; aiobotocore also for a
    # connection lost mid-request, but then with the aiohttp error attached (and walked above).
    return len(chain) == 1 and "EndpointConnectionError" in _names(e)


# --- fail fast: an HTTP session that retries only connection attempts --------------------------------------

_SESSION_CLS_NAME = "FailFastHTTPSession"
_session_cls: type[Any] | None = None
_session_cls_tried = False


def _endpoint_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else str(url)


def _unreachable_error(e: BaseException, endpoint: str | None, attempts: int) -> NeverConnectedError:
    code, why = _unreachable_reason(e)
    return NeverConnectedError(
        f"cannot connect to {endpoint or 'the endpoint'}: {why} {_tries(attempts)}",
        code=code,
        endpoint=endpoint,
        attempts=attempts,
    )


def _tries(attempts: int | None) -> str:
    timeout = f"{knobs.current.connect_timeout_s:g} s connect timeout"
    if attempts is None:
        return f"({timeout})"
    return f"({attempts} attempt{'s' if attempts != 1 else ''}, {timeout} each)"


def _unreachable_reason(e: BaseException) -> tuple[int, str]:
    chain = _chain(e)
    for err in chain:
        if isinstance(err, EndpointUnreachableError | NeverConnectedError) and err.errno is not None:
            return err.errno, _REASONS.get(err.errno, "the connection failed")
    names = set().union(*(_names(err) for err in chain))
    if names & _DNS:
        return errno.EHOSTUNREACH, "the host name does not resolve"
    if names & _TIMEOUT:
        return errno.ETIMEDOUT, "the connect timed out"
    for err in chain:
        if isinstance(err, OSError) and err.errno in _NEVER_CONNECTED_ERRNOS:
            return err.errno, _REASONS[err.errno]
    return errno.ECONNREFUSED, _REASONS[errno.ECONNREFUSED]


_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "the connect timed out",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
}


def _build_session_cls() -> type[Any] | None:
    try:
        from aiobotocore.config import AioConfig
        from aiobotocore.httpsession import AIOHTTPSession
    except ImportError:
        return None
    if "http_session_cls" not in inspect.signature(AioConfig.__init__).parameters:
        return None  # an aiobotocore too old to take a session class: botocore's retries apply

    class FailFastHTTPSession(AIOHTTPSession):
        """aiobotocore's aiohttp session, retrying a connection that never came up ``knobs.connect_retries``
        times, then raising :class:`NeverConnectedError` (which botocore does not retry)."""

        async def send(self, request: Any) -> Any:
            attempt = 1
            while True:
                try:
                    return await super().send(request)
                except Exception as e:
                    if not is_unreachable(e):
                        raise
                    if attempt > knobs.current.connect_retries:
                        raise _unreachable_error(e, _endpoint_of(getattr(request, "url", None)), attempt) from e
                    try:
                        request.reset_stream()  # nothing was sent; a seekable body starts again anyway
                    except Exception:
                        raise _unreachable_error(e, _endpoint_of(getattr(request, "url", None)), attempt) from e
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))
                attempt += 1

    # Picklable by reference (an S3FileSystem pickles its storage options): module attribute, see __getattr__.
    FailFastHTTPSession.__module__ = __name__
    FailFastHTTPSession.__qualname__ = _SESSION_CLS_NAME
    return FailFastHTTPSession


def _http_session_cls() -> type[Any] | None:
    global _session_cls, _session_cls_tried
    if not _session_cls_tried:
        _session_cls = _build_session_cls()
        _session_cls_tried = True
    return _session_cls


def __getattr__(name: str) -> Any:
    if name == _SESSION_CLS_NAME and (cls := _http_session_cls()) is not None:
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def client_options(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options to give fsspec for ``protocol``: a new dict, the caller's is not changed.

    For s3/s3a, ``config_kwargs`` (botocore's client config) gets, unless the user set them:
    ``connect_timeout`` = ``knobs.connect_timeout_s``, and ``http_session_cls`` = a session that gives up on
    an endpoint it cannot connect to after ``knobs.connect_retries`` more attempts. botocore's ``retries``
    (5xx, SlowDown, resets) are left as they are. Other protocols: the options unchanged."""
    opts = dict(storage_options or {})
    if protocol not in S3_PROTOCOLS:
        return opts
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("connect_timeout", knobs.current.connect_timeout_s)
    if "http_session_cls" not in config and (cls := _http_session_cls()) is not None:
        config["http_session_cls"] = cls
    opts["config_kwargs"] = config
    return opts


# --- named errors ----------------------------------------------------------------------------------------


def describe(e: BaseException, url: str, what: str) -> StorageError | None:
    """The named error for ``e``, raised while doing ``what`` (a verb phrase: "listing", "writing", ...; it
    may already contain ``url``) on ``url``; None when ``e`` is not one of these (name it generically then):

    * :class:`MissingCredentialsError`: no credentials (botocore found none, or a profile/SSO source failed);
    * :class:`AccessDeniedError`: HTTP 403 / AccessDenied, unknown access key, wrong secret, expired token;
    * :class:`EndpointUnreachableError`: connection refused, connect timeout, no route, unresolvable host.

    Each is a StorageError (an OSError) with an errno: EACCES for the first two, ECONNREFUSED, ETIMEDOUT,
    EHOSTUNREACH or ENETUNREACH for the third. Raise it ``from e``."""
    if isinstance(e, StorageError) and getattr(e, "_described", False):
        return e  # named already, by an inner layer
    named = _describe(e, url, what)
    if named is not None:
        named._described = True  # type: ignore[attr-defined]
    return named


def _describe(e: BaseException, url: str, what: str) -> StorageError | None:
    subject = what if url in what else f"{what} {url}".strip()
    s3 = urlsplit(url).scheme in S3_PROTOCOLS
    chain = _chain(e)

    creds = next((err for err in chain if _names(err) & _CREDENTIALS), None)
    if creds is not None:
        err = MissingCredentialsError(
            f"{subject}: no usable credentials ({type(creds).__name__}: {creds}). "
            + (
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile (AWS_PROFILE, or "
                "storage_options={'profile': ...}), or pass storage_options={'key': ..., 'secret': ...}; "
                "for a public bucket pass storage_options={'anon': True}."
                if s3
                else "Pass credentials in storage_options, or anonymous access for a public location."
            )
        )
        err.errno = errno.EACCES
        return err

    answer = next(((err, r) for err in chain if (r := _response(err)) is not None), None)
    if answer is not None:
        err_with_answer, (code, status) = answer
        if code in _DENIED_CODES or status == 403 or code == "403":
            meaning = _DENIED_CODES.get(code, "the server refused the request (HTTP 403 Forbidden)")
            server = _server_message(err_with_answer)
            named = AccessDeniedError(
                f"{subject}: access denied ({code or status}"
                + (f": {server.rstrip('.')}" if server and server != code else "")
                + f"): {meaning}. "
                + (
                    "Check the keys (storage_options key/secret, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                    "profile) and the bucket's permissions (bucket policy, IAM policy) for this operation."
                    if s3
                    else "Check the credentials and the permissions on this location."
                )
            )
            named.errno = errno.EACCES
            return named
    elif any(isinstance(err, PermissionError) for err in chain):
        named = AccessDeniedError(
            f"{subject}: permission denied ({e}). "
            + (
                "Check the keys (storage_options key/secret, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                "profile) and the bucket's permissions for this operation."
                if s3
                else "Check the credentials and the permissions on this location."
            )
        )
        named.errno = errno.EACCES
        return named

    if is_unreachable(e):
        code_, why = _unreachable_reason(e)
        endpoint = next(
            (
                ep
                for err in chain
                if (ep := getattr(err, "endpoint", None) or _endpoint_of(_kwarg(err, "endpoint_url")))
            ),
            None,
        )
        attempts = next(
            (err.attempts for err in chain if isinstance(err, EndpointUnreachableError | NeverConnectedError)), None
        )
        advice = (
            "Check endpoint_url in storage_options (scheme, host, port; without it, AWS's endpoint is used) "
            "and the network (firewall, proxy, VPN)"
            if s3
            else "Check the endpoint in storage_options and the network (firewall, proxy, VPN)"
        )
        return EndpointUnreachableError(
            f"{subject}: cannot connect to {endpoint or 'the endpoint'}: {why} {_tries(attempts)}. {advice}; "
            "how long to try: knobs connect_timeout_s, connect_retries (CKPTSTORE_CONNECT_TIMEOUT_S, "
            "CKPTSTORE_CONNECT_RETRIES).",
            code=code_,
            endpoint=endpoint,
            attempts=attempts,
        )
    return None


def _kwarg(e: BaseException, key: str) -> Any:
    kwargs = getattr(e, "kwargs", None)
    return kwargs.get(key) if isinstance(kwargs, dict) else None
