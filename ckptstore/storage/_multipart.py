"""Streaming uploads to S3 in parallel parts, with bounded memory.

s3fs's own file object uploads the parts of a file one after another. :class:`ParallelUpload` is a
write-only file that cuts what it is given into parts of ``knobs.upload_part_bytes`` and keeps up to
``knobs.io_threads`` part uploads in flight (``write`` waits for the oldest when all are busy), so a file
of any size holds at most about ``(io_threads + 1) * upload_part_bytes`` bytes in memory. A file smaller
than one part goes up in a single PUT. Each part is retried on its own (:mod:`ckptstore.storage._retry`).

Used for any filesystem with s3fs's ``call_s3`` (S3 and S3-compatible endpoints); others get their own
``fs.open(path, "wb")``.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import knobs
from . import _retry as retry

_MIN_PART = 5 << 20  # S3's smallest part (all but the last)
_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")


def supported(fs: Any) -> bool:
    """Whether ``fs`` speaks the S3 API through s3fs (has ``call_s3`` and ``split_path``)."""
    return callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None))


def abort_stale(fs: Any, root: str, older_than_s: float, ours: Callable[[str], bool]) -> list[str]:
    """Abort the incomplete multipart uploads under the prefix ``root`` (``bucket/key``, s3fs's form) whose
    key below it ``ours(rel)`` accepts and which nothing happened to for ``older_than_s`` seconds (neither
    begun nor given a part since); return their keys, relative to ``root``.

    A writer killed in the middle of a :class:`ParallelUpload` leaves its upload open: no object appears,
    but its parts are stored (and billed) until the upload is aborted. One more recent may be a live
    writer's, and is left alone.
    """
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""
    where = f"s3://{bucket}/{prefix}"
    now = time.time()
    aborted: list[str] = []
    for upload in _pages(fs, "list_multipart_uploads", "Uploads", where, Bucket=bucket, Prefix=prefix):
        rel = str(upload.get("Key", ""))[len(prefix) :]
        if not ours(rel) or now - _seconds(upload.get("Initiated")) < older_than_s:
            continue
        ids = {"Bucket": bucket, "Key": upload["Key"], "UploadId": upload["UploadId"]}
        try:
            # Its last part, not only its start, says whether a writer still works on it (a large file takes
            # long; moto reports a fixed start time).
            parts = _pages(fs, "list_parts", "Parts", f"{where}{rel}", **ids)
            if any(now - _seconds(part.get("LastModified")) < older_than_s for part in parts):
                continue
            retry.call(fs.call_s3, "abort_multipart_upload", what=f"aborting the upload of {where}{rel}", **ids)
        except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
            continue
        aborted.append(rel)
    return aborted


def _seconds(when: Any) -> float:
    """A datetime of an S3 listing as seconds since the epoch (0 if there is none: as old as can be)."""
    return float(when.timestamp()) if hasattr(when, "timestamp") else 0.0


def _pages(fs: Any, method: str, field: str, where: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every entry of a paginated S3 listing (``list_multipart_uploads``, ``list_parts``)."""
    markers = {
        "list_multipart_uploads": (("KeyMarker", "NextKeyMarker"), ("UploadIdMarker", "NextUploadIdMarker")),
        "list_parts": (("PartNumberMarker", "NextPartNumberMarker"),),
    }[method]
    out: list[dict[str, Any]] = []
    page_kwargs = dict(kwargs)
    while True:
        page = retry.call(fs.call_s3, method, what=f"{method} of {where}", **page_kwargs)
        out.extend(page.get(field) or ())
        following = {marker: page.get(nxt, "") for marker, nxt in markers}
        if not page.get("IsTruncated") or all(page_kwargs.get(k) == v for k, v in following.items()):
            return out  # (a server that says truncated without moving its markers on would loop forever)
        page_kwargs.update(following)


class ParallelUpload:
    """A write-only binary file on S3, uploaded in parallel parts. The object appears, complete, when
    :meth:`close` returns; after a failure nothing appears (the multipart upload is aborted)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = max(_MIN_PART, knobs.current.upload_part_bytes)
        self.threads = max(1, knobs.current.io_threads)
        self.closed = False
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque[Future[dict[str, Any]]] = collections.deque()
        self._parts: list[dict[str, Any]] = []
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self._buf += data
        while len(self._buf) >= self.part_bytes:
            part = bytes(self._buf[: self.part_bytes])
            del self._buf[: self.part_bytes]
            self._submit(part)
        return n

    def flush(self) -> None:
        """Parts go up as they fill; there is nothing to flush before :meth:`close`."""

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        out = retry.call(
            self.fs.call_s3, method, Bucket=self.bucket, Key=self.key, what=f"{method} of s3://{self.path}", **kwargs
        )
        return dict(out)

    def _submit(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                self._upload_id = str(self._call("create_multipart_upload")["UploadId"])
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckptstore-upload")
            while len(self._pending) >= self.threads:  # bounded memory: wait for the oldest part
                self._parts.append(self._pending.popleft().result())
            assert self._pool is not None
            number = len(self._parts) + len(self._pending) + 1
            self._pending.append(self._pool.submit(self._upload_part, number, part))
        except BaseException:
            self._fail()
            raise

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        out = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": out["ETag"], **{k: out[k] for k in _CHECKSUMS if k in out}}

    def close(self) -> None:
        """Upload what is left and complete the object (or abort everything after a failure)."""
        if self.closed:
            return
        self.closed = True
        if self._failed:
            self._abort()
            return
        try:
            if self._upload_id is None:
                self._call("put_object", Body=bytes(self._buf))
            else:
                if self._buf or not (self._parts or self._pending):
                    self._submit(bytes(self._buf))
                while self._pending:
                    self._parts.append(self._pending.popleft().result())
                self._parts.sort(key=lambda p: p["PartNumber"])
                self._call(
                    "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
                )
        except BaseException:
            self._abort()
            raise
        finally:
            self._buf = bytearray()
            self.fs.invalidate_cache(self.path)
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def discard(self) -> None:
        """Give up: abort the multipart upload; nothing appears."""
        self._fail()
        self.closed = True
        self._abort()

    def _fail(self) -> None:
        self._failed = True

    def _abort(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._upload_id = None

    def __enter__(self) -> ParallelUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
