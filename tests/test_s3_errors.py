"""What a new S3 user runs into, against real servers on 127.0.0.1: no credentials, wrong keys, an endpoint
that refuses or never completes a connection. Each becomes a named StorageError with an errno and a message
that names the URL and what to check; an unreachable endpoint fails within a bounded, configurable time,
while a reachable service's 5xx answers and mid-request resets keep botocore's retries.

Until FsspecStorage is wired to ckptstore.storage._s3, the tests do what the wiring will do (``open_fs`` and
``attempt`` below): build the filesystem from ``client_options`` and name the error with ``describe``.
Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pytest

import ckptstore
from ckptstore import errors, knobs
from ckptstore.errors import CkptStoreError, StorageError
from ckptstore.storage import _s3
from tests import s3server
from tests.s3proxy import FaultProxy

pytest.importorskip("s3fs")


def open_fs(endpoint: str, **extra: Any) -> fsspec.AbstractFileSystem:
    """The s3fs filesystem as ckptstore will make it: storage options through ``client_options``."""
    opts: dict[str, Any] = {
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": s3server.REGION},
        "skip_instance_cache": True,
        **extra,
    }
    return fsspec.filesystem("s3", **_s3.client_options("s3", opts))


class Failure(NamedTuple):
    raw: BaseException  # what s3fs raised
    named: StorageError | None  # what describe() made of it
    elapsed: float


def attempt(fn: Callable[[], object], url: str, what: str) -> Failure:
    """Run ``fn``, which must fail; the error as the storage boundary will name it."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:
        return Failure(e, _s3.describe(e, url, what), time.monotonic() - t0)
    raise AssertionError(f"{what} {url} did not fail")


def assert_named(f: Failure, cls: type[StorageError], code: int, url: str, *hints: str) -> StorageError:
    err = f.named
    assert isinstance(err, cls), f"{f.raw!r} was named {err!r}"
    assert isinstance(err, StorageError) and isinstance(err, OSError)
    assert err.errno == code, (err.errno, str(err))
    message = str(err)
    assert url in message, message
    for hint in hints:
        assert hint in message, f"{hint!r} not in {message!r}"
    assert _s3.describe(err, url, "again") is err  # naming twice changes nothing
    return err


# --- client_options -----------------------------------------------------------------------------------


def test_client_options_adds_fail_fast_defaults_and_leaves_the_callers_dict_alone() -> None:
    user = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"mode": "standard"}}}
    opts = _s3.client_options("s3", user)
    assert user == {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"mode": "standard"}}}
    config = opts["config_kwargs"]
    assert config["connect_timeout"] == knobs.current.connect_timeout_s == 5.0
    assert config["retries"] == {"mode": "standard"}  # botocore's retries (5xx, SlowDown) are not touched
    assert config["http_session_cls"].__name__ == "FailFastHTTPSession"
    assert _s3.client_options("s3a", None)["config_kwargs"]["connect_timeout"] == 5.0
    with knobs.override(connect_timeout_s=0.5):
        assert _s3.client_options("s3", {})["config_kwargs"]["connect_timeout"] == 0.5


def test_client_options_never_overwrite_what_the_user_set() -> None:
    class MySession:
        pass

    user = {"config_kwargs": {"connect_timeout": 60, "http_session_cls": MySession}}
    config = _s3.client_options("s3", user)["config_kwargs"]
    assert config == {"connect_timeout": 60, "http_session_cls": MySession}


@pytest.mark.parametrize("protocol", ["memory", "file", "gs"])
def test_client_options_of_other_protocols_are_a_copy(protocol: str) -> None:
    user = {"project": "p", "token": "anon"}
    opts = _s3.client_options(protocol, user)
    assert opts == user and opts is not user
    assert _s3.client_options(protocol, None) == {}


def test_a_filesystem_with_these_options_still_pickles() -> None:
    fs = open_fs("http://127.0.0.1:9", key="k", secret="s")
    again = pickle.loads(pickle.dumps(fs))
    assert again.config_kwargs["http_session_cls"] is fs.config_kwargs["http_session_cls"]


# --- classification -------------------------------------------------------------------------------------


def _raised(outer: Callable[[], BaseException], inner: BaseException) -> BaseException:
    """``outer()`` raised while handling ``inner``, as aiobotocore does (``__context__`` is set)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer()  # noqa: B904 - the implicit context is the point
    except BaseException as e:
        return e


def test_is_unreachable_tells_never_connected_from_lost_mid_request() -> None:
    import aiohttp
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        SSLError,
    )

    url = "http://127.0.0.1:9/bucket?list-type=2"
    refused = _raised(
        lambda: EndpointConnectionError(endpoint_url=url), ConnectionRefusedError(errno.ECONNREFUSED, "x")
    )
    reset = _raised(
        lambda: EndpointConnectionError(endpoint_url=url), aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer")
    )
    answer_503 = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get")
    assert _s3.is_unreachable(refused)
    assert _s3.is_unreachable(ConnectTimeoutError(endpoint_url=url))
    assert _s3.is_unreachable(EndpointConnectionError(endpoint_url=url))  # plain botocore: never connected
    assert _s3.is_unreachable(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not _s3.is_unreachable(reset)
    assert not _s3.is_unreachable(ReadTimeoutError(endpoint_url=url))
    assert not _s3.is_unreachable(answer_503)
    assert not _s3.is_unreachable(SSLError(endpoint_url=url, error="bad certificate"))
    assert not _s3.is_unreachable(ConnectionResetError(errno.ECONNRESET, "reset"))
    # A wrapper (retry.call's StorageError, s3fs's OSError) is looked through.
    wrapped = _raised(lambda: StorageError("listing s3://b/run failed after 4 attempts"), refused)
    assert _s3.is_unreachable(wrapped)


def test_describe_leaves_other_errors_to_the_caller() -> None:
    from botocore.exceptions import ClientError

    answer_500 = ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "Get")
    for e in (FileNotFoundError("s3://b/run/x"), ValueError("x"), answer_500, TimeoutError("read timed out")):
        assert _s3.describe(e, "s3://b/run", "reading") is None


# --- no credentials -------------------------------------------------------------------------------------


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials anywhere botocore looks: environment, shared files, boto2 config, instance metadata."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "FSSPEC_S3")):
            monkeypatch.delenv(k)
    empty = tmp_path / "empty"
    empty.write_text("")
    for k in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(k, str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)


@pytest.mark.parametrize("op", ["list", "write"])
def test_no_credentials_is_named(s3_server: s3server.Server, no_credentials: None, op: str) -> None:
    fs = open_fs(s3_server.endpoint)  # 127.0.0.1: should a credential turn up after all, nothing leaves
    url = "s3://ckpt-nocreds/run"
    if op == "list":
        f = attempt(lambda: fs.ls("ckpt-nocreds/run"), url, "listing")
    else:
        f = attempt(lambda: fs.pipe_file("ckpt-nocreds/run/x", b"1"), f"{url}/x", "writing")
    assert "NoCredentialsError" in {c.__name__ for c in type(f.raw).__mro__}
    err = assert_named(
        f, errors.MissingCredentialsError, errno.EACCES, url, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "profile"
    )
    assert "'key'" in str(err) and "'anon': True" in str(err)
    assert isinstance(err, PermissionError)
    assert f.elapsed < 10  # nothing to retry: fails before any request


# --- wrong keys (moto with its authentication on) ----------------------------------------------------------


class AuthServer(NamedTuple):
    endpoint: str
    bucket: str
    key: str  # a valid access key of a user without any policy
    secret: str


@contextlib.contextmanager
def moto_with_auth(log: Path, free_actions: int) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port that checks signatures after its first ``free_actions``
    requests (moto's INITIAL_NO_AUTH_ACTION_COUNT). Readiness is polled over TCP, so that no HTTP request
    uses up a free action."""
    port = s3server.free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(s3server._BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **s3server.credentials_env(), "INITIAL_NO_AUTH_ACTION_COUNT": str(free_actions)},
            start_new_session=True,  # its own process group: the clean-up below ends it and nothing else
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start:\n{log.read_text(errors='replace')[-4000:]}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    import boto3

    with moto_with_auth(tmp_path_factory.mktemp("moto-auth") / "moto.log", free_actions=3) as endpoint:
        kw = {
            "endpoint_url": endpoint,
            "aws_access_key_id": s3server.ACCESS_KEY,
            "aws_secret_access_key": s3server.SECRET_KEY,
            "region_name": s3server.REGION,
        }
        bucket = s3server.new_bucket_name()
        boto3.client("s3", **kw).create_bucket(Bucket=bucket)  # free action 1
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="no-permissions")  # 2
        key = iam.create_access_key(UserName="no-permissions")["AccessKey"]  # 3; from here on, signatures count
        yield AuthServer(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])


@pytest.mark.server
@pytest.mark.parametrize(
    ("keys", "op", "code"),
    [
        ("unknown key", "list", "InvalidAccessKeyId"),
        ("unknown key", "write", "InvalidAccessKeyId"),
        ("wrong secret", "list", "SignatureDoesNotMatch"),
        ("no permission", "list", "AccessDenied"),
        ("no permission", "write", "AccessDenied"),
        ("unknown key", "head", "403"),  # a HEAD answer has no body: s3fs's bare "PermissionError: Forbidden"
    ],
)
def test_wrong_keys_are_named(auth_server: AuthServer, keys: str, op: str, code: str) -> None:
    key, secret = {
        "unknown key": ("AKIAUNKNOWNKEY000000", "whatever"),
        "wrong secret": (auth_server.key, "not-the-secret"),
        "no permission": (auth_server.key, auth_server.secret),
    }[keys]
    fs = open_fs(auth_server.endpoint, key=key, secret=secret)
    b = auth_server.bucket
    url = f"s3://{b}/run"
    run: Callable[[], object] = {
        "list": lambda: fs.ls(f"{b}/run"),
        "write": lambda: fs.pipe_file(f"{b}/run/x", b"1"),
        "head": lambda: fs.info(f"{b}/run/manifest.msgpack"),
    }[op]
    f = attempt(run, url, op)
    assert isinstance(f.raw, PermissionError)  # what s3fs raises today, without the URL
    err = assert_named(f, errors.AccessDeniedError, errno.EACCES, url, code, "key", "bucket's permissions")
    assert isinstance(err, PermissionError)  # `except PermissionError` still catches it
    assert f.elapsed < 10  # a refusal is not retried


# --- unreachable endpoints --------------------------------------------------------------------------------


def test_refused_connection_fails_fast_and_is_named() -> None:
    endpoint = f"http://127.0.0.1:{s3server.free_port()}"  # nobody listens: connection refused
    fs = open_fs(endpoint, key="k", secret="s")
    url = "s3://bucket/run"
    f = attempt(lambda: fs.ls("bucket/run"), url, "listing")
    # What the session raises once its attempts are used up: no ckptstore error yet (the storage boundary
    # lets those through unchanged), so that describe() gets to name it with the URL.
    assert isinstance(f.raw, _s3.NeverConnectedError) and not isinstance(f.raw, CkptStoreError)
    assert f.raw.attempts == knobs.current.connect_retries + 1 == 2
    assert _s3.is_unreachable(f.raw)
    assert_named(f, errors.EndpointUnreachableError, errno.ECONNREFUSED, url, endpoint, "endpoint_url", "network")
    # Before: 5 botocore attempts with up to 15 s of backoff, times 4 retry.call attempts (31 to 48 s measured).
    assert f.elapsed < 5


@contextlib.contextmanager
def unanswered_endpoint() -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts no more TCP connections: a listening socket with backlog 0
    whose accept queue is filled first, so that the kernel drops further SYNs and a connect hangs."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(8):
            c = socket.socket()
            fillers.append(c)
            c.settimeout(0.3)
            try:
                c.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # queue full: this connect hangs, and so will the next ones
        else:
            pytest.skip("connects to a full accept queue do not hang on this system")
        yield f"http://127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        server.close()


@pytest.mark.parametrize(("timeout_s", "retries"), [(1.0, 1), (0.5, 0), (0.5, 2)])
def test_connect_that_never_completes_fails_within_the_knobs_bound(timeout_s: float, retries: int) -> None:
    url = "s3://bucket/run"
    with unanswered_endpoint() as endpoint, knobs.override(connect_timeout_s=timeout_s, connect_retries=retries):
        fs = open_fs(endpoint, key="k", secret="s")
        f = attempt(lambda: fs.ls("bucket/run"), url, "listing")
        assert_named(f, errors.EndpointUnreachableError, errno.ETIMEDOUT, url, endpoint, "endpoint_url", "timed out")
    assert isinstance(f.raw, _s3.NeverConnectedError) and f.raw.attempts == retries + 1
    assert _s3.is_unreachable(f.raw)
    bound = timeout_s * (retries + 1)
    # At least every attempt's connect timeout (the knobs are in force), and well under the default
    # 5 s x 2 attempts; before, 20 connects of 5 s each were tried (about 2 minutes measured).
    assert 0.8 * bound <= f.elapsed < bound + 3.0, (f.elapsed, bound)


# --- a reachable service keeps its retries ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_reachable_service_keeps_botocores_retries(s3_server: s3server.Server, fault: str) -> None:
    """HTTP 503 (SlowDown) and a connection reset mid-request are retried per request as before."""
    from tests.conftest import new_bucket

    bucket = new_bucket(s3_server.endpoint)
    with FaultProxy(s3_server.endpoint) as proxy:
        fs = open_fs(proxy.endpoint, key=s3server.ACCESS_KEY, secret=s3server.SECRET_KEY)
        fs.pipe_file(f"{bucket}/k", b"data")
        rule = proxy.fail(lambda r: r.method == "GET" and r.path.endswith("/k"), fault, times=2)
        assert fs.cat_file(f"{bucket}/k") == b"data"  # third attempt of one request
        assert rule.hits == 2


# --- through ckptstore's own API: the wiring at the storage boundary ----------------------------------------


def test_store_without_credentials_names_them(s3_server: s3server.Server, no_credentials: None) -> None:
    url = "s3://ckpt-nocreds/run"
    store = ckptstore.CheckpointStore(url, storage_options={"endpoint_url": s3_server.endpoint})
    t0 = time.monotonic()
    with pytest.raises(errors.MissingCredentialsError, match="AWS_ACCESS_KEY_ID") as info:
        store.steps()
    assert url in str(info.value) and info.value.errno == errno.EACCES
    assert time.monotonic() - t0 < 10


def test_cli_without_credentials_prints_one_line(
    s3_server: s3server.Server, no_credentials: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptstore.cli import main

    rc = main(["ls", "s3://ckpt-nocreds/run", "-o", f"endpoint_url={s3_server.endpoint}"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "s3://ckpt-nocreds/run" in err and "credentials" in err


def test_store_on_a_refused_endpoint_fails_fast() -> None:
    endpoint = f"http://127.0.0.1:{s3server.free_port()}"
    store = ckptstore.CheckpointStore(
        "s3://bucket/run", storage_options={"endpoint_url": endpoint, "key": "k", "secret": "s"}
    )
    t0 = time.monotonic()
    with pytest.raises(errors.EndpointUnreachableError) as info:
        store.save(1, {"w": np.arange(3)})
    assert endpoint in str(info.value) and info.value.errno == errno.ECONNREFUSED
    assert time.monotonic() - t0 < 5  # one attempt and one retry, no backoff of botocore's, no retry.call


def test_store_on_an_unanswered_endpoint_fails_within_the_knobs_bound() -> None:
    with unanswered_endpoint() as endpoint, knobs.override(connect_timeout_s=0.5, connect_retries=1):
        store = ckptstore.CheckpointStore(
            "s3://bucket/run", storage_options={"endpoint_url": endpoint, "key": "k", "secret": "s"}
        )
        t0 = time.monotonic()
        with pytest.raises(errors.EndpointUnreachableError) as info:
            store.steps()
        elapsed = time.monotonic() - t0
    assert info.value.errno == errno.ETIMEDOUT, info.value
    assert elapsed < 0.5 * 2 + 3, elapsed  # two connects of 0.5 s, with generous slack for a loaded machine
