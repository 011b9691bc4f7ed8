"""Tunables, in one place.

Each knob has a default, an environment override (``CKPTSTORE_<NAME>``) and can be changed for a block
of code with :func:`override` (tests use it to shorten grace periods)::

    with ckptstore.knobs.override(stale_after_s=0):
        store.save(...)

The environment is read once, at import. A ``CKPTSTORE_*`` variable that names no knob is warned about
(with the closest knob's name); a value that does not parse never fails the import: reading that knob
raises :class:`~ckptstore.errors.ConfigError`, naming the variable and its value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import ConfigError


@dataclasses.dataclass
class Knobs:
    #: Seconds between two looks for a new checkpoint in ``checkpoints_iterator`` (shortened to fit a timeout).
    poll_interval_s: float = 1.0
    #: A reader's lease on a checkpoint lasts this long unless renewed (renewed every third of it while held),
    #: so a reader that died stops blocking retention after at most this long.
    lease_ttl_s: float = 300.0
    #: Bytes per read/write/hash call when streaming tensor bytes.
    chunk_bytes: int = 16 << 20
    #: A new tensor file is started once a file holds this many bytes (a larger tensor gets a file alone).
    max_file_bytes: int = 1 << 30
    #: Remote filesystems: requests in flight at once per file (ranged GETs of a restore, parts of a multipart
    #: upload). Tensor files themselves are written one after another.
    io_threads: int = 4
    #: Local reads: threads reading one tensor file at once, each a ``chunk_bytes`` piece at a time with a
    #: positional read (the disk sees a few sequential streams; checksums are hashed meanwhile). 1: the
    #: caller's thread alone.
    read_threads: int = 4
    #: Restores into accelerator memory: the bounce buffer's size; its two halves take turns, one read into
    #: from the file while the other's bytes are copied to the device (see :mod:`ckptstore.bounce`).
    bounce_bytes: int = 128 << 20
    #: Remote reads: bytes per ranged GET (a larger tensor is fetched in parallel pieces of this size).
    read_part_bytes: int = 32 << 20
    #: Remote reads: tensors closer than this in one file are fetched by one ranged GET (fewer requests,
    #: a few unwanted bytes).
    read_coalesce_bytes: int = 1 << 16
    #: Remote writes: bytes per part of a multipart upload; ``io_threads`` parts go up at once, so a file
    #: being written holds at most about ``io_threads * upload_part_bytes`` in memory.
    upload_part_bytes: int = 16 << 20
    #: Whole-operation retries of a remote operation after a transient failure (on top of the client
    #: library's per-request retries), with exponential backoff and jitter between retry_base_s and
    #: retry_max_s seconds. See :mod:`ckptstore.retry`.
    retries: int = 3
    retry_base_s: float = 0.2
    retry_max_s: float = 10.0
    #: S3: seconds to wait for a TCP connection to the endpoint (botocore's ``connect_timeout``, unless
    #: ``storage_options["config_kwargs"]`` sets it), and how many times more a connection that never came up
    #: is tried before the endpoint is reported unreachable: an endpoint nobody answers at fails after about
    #: ``connect_timeout_s * (connect_retries + 1)`` seconds. Errors on a connection that did come up (HTTP
    #: 5xx, SlowDown, a reset mid-request) keep the client's and ``retries``' retries. See
    #: :mod:`ckptstore.storage._s3`.
    connect_timeout_s: float = 5.0
    connect_retries: int = 1
    #: Across ranks, rank 0 waits for every rank to join a save: after this many seconds it warns which ranks
    #: have not (a save on rank 0 alone needs ``coordinator=ckptstore.distributed.SINGLE``), and after
    #: ``join_timeout_s`` it fails, saying the same. A rank that joins in between is merely slower.
    join_warn_s: float = 5.0
    join_timeout_s: float = 600.0
    #: Leftovers of a writer (temp directories, uncommitted objects) whose liveness cannot be checked
    #: are removed once they are older than this.
    stale_after_s: float = 3600.0
    #: Largest manifest that is read at all (a guard against hostile files).
    max_manifest_bytes: int = 1 << 30
    #: Local files: ask the kernel to start writing back every this many bytes written (0: never), so the
    #: disk works while the tensors are still being copied and the final fsync has little left to do.
    writeback_bytes: int = 64 << 20
    #: Local files of a megabyte or more: write the tensors' bytes with ``O_DIRECT`` (Linux), from memory to
    #: the disk without a copy into the page cache (a fraction of the CPU time, and the page cache keeps
    #: the training job's data). Where the filesystem refuses it, files are written through the cache. The
    #: file is then not in the page cache: a reader on the same machine right after (an evaluator) reads
    #: it from the disk; set False where that read matters more than the save.
    direct_writes: bool = True
    #: Direct writes of a blocking save: copy the bytes into two page-aligned staging buffers of
    #: ``chunk_bytes`` in huge pages (kept per thread; ``CheckpointStore.close()`` frees the caller's) and
    #: write each on a helper thread while the next fills, so that the disk gets requests as large as it
    #: takes whatever memory the arrays lie in (from memory in scattered pages a request carries less; the
    #: copy overlaps the writes, on a core the waiting caller leaves free). A background save writes from
    #: where the bytes lie, copying nothing on the training's time. False: every save writes from there.
    staged_writes: bool = True
    #: Run the retention pass after each commit on a thread of its own (the save returns at once; the next
    #: save, ``close`` and the store's own listings wait for it). False: in the save, after the commit, with
    #: the same failure semantics (logged, reported by the next save). The test suite runs with False except
    #: where it tests the background itself, so that its tests see one sequence of calls.
    retention_in_background: bool = True
    #: Background saves (``save(..., blocking=False)``) in flight per store at once; another save waits for
    #: a slot before taking its snapshot, so snapshot memory is at most this many copies of the state.
    async_max_in_flight: int = 1
    #: Keep an async save's snapshot buffer for the next snapshot (copying into memory already touched is
    #: several times faster than into fresh pages); ``CheckpointStore.close()`` frees it either way.
    async_keep_snapshot: bool = True
    #: Threads that copy a background save's snapshot (on the caller's time: ``save`` returns after it).
    snapshot_threads: int = 2
    #: Ask for transparent huge pages (``MADV_HUGEPAGE``) for restored tensors and async snapshot buffers.
    #: Off by default, like torch's and safetensors' allocations: on the VM where ckptstore was measured,
    #: huge pages made a 1 GiB restore take 0.3 to 6 s, against a steady 0.7 to 0.9 s without
    #: (docs/benchmarks.md). Where the kernel's THP mode is "always" they are used either way.
    hugepages: bool = False
    #: Across ranks, ``CheckpointStore.should_save`` agrees on the time interval (rank 0's clock) and on
    #: preemption signals (any rank's) by one small all-reduce on a gloo group of its own, every this many
    #: calls; 0 (the default): as often as costs at most 0.5% of the calls' time, measured as the job runs
    #: (``decisions.AGREEMENT_SHARE``). A signal is acted on at the next agreement (docs/distributed.md).
    preemption_sync_every: int = 0


_ENV_PREFIX = "CKPTSTORE_"


class _Invalid:
    """An environment value that did not parse, held in place of the knob's value until the knob is read."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"<invalid: {self.message}>"


class _EnvKnobs(Knobs):
    """The knobs when some environment value did not parse: reading such a knob raises ConfigError (the
    other knobs read as usual). Plain :class:`Knobs` otherwise, so that reads cost nothing extra."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if type(value) is _Invalid:
            raise ConfigError(value.message)
        return value

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={object.__getattribute__(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"Knobs({fields})"


def _from_env(environ: Mapping[str, str] = os.environ) -> Knobs:
    values: dict[str, Any] = {}
    known = {_ENV_PREFIX + f.name.upper(): f.name for f in dataclasses.fields(Knobs)}
    for var, name in known.items():
        raw = environ.get(var)
        if raw is not None:
            kind = type(getattr(Knobs, name))
            try:
                values[name] = _parse(name, raw, kind)
            except ConfigError as e:  # raised when the knob is read, not at import
                values[name] = _Invalid(str(e))
    for var in sorted(v for v in environ if v.startswith(_ENV_PREFIX) and v not in known):
        # Compared without the prefix, which every name shares: CKPTSTORE_ZZZ resembles no knob.
        close = difflib.get_close_matches(var[len(_ENV_PREFIX) :].upper(), [k[len(_ENV_PREFIX) :] for k in known], n=1)
        hint = f"; did you mean {_ENV_PREFIX}{close[0]}?" if close else " (the knobs: ckptstore.knobs.Knobs)"
        warnings.warn(
            f"unknown environment variable {var}: ckptstore has no such knob{hint}", UserWarning, stacklevel=2
        )
    cls = _EnvKnobs if any(type(v) is _Invalid for v in values.values()) else Knobs
    return cls(**values)


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:  # bool("0") is True: spell the accepted words out
        words = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)
        if raw.strip().lower() not in words:
            raise ConfigError(f"{_ENV_PREFIX}{name.upper()}={raw!r}: expected one of {sorted(words)}")
        return words[raw.strip().lower()]
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{_ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


#: The knobs in force. Read them as ``knobs.current.chunk_bytes``.
current: Knobs = _from_env()


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Knobs]:
    """Set some knobs for the duration of a ``with`` block (not thread-safe: for tests and scripts).

    Work a store started in the background inside the block (an async save, the retention pass after a
    save) may run after it ends: call ``store.wait_until_finished()`` inside the block."""
    global current
    saved = current
    # Copied field by field, not through dataclasses.replace: a knob whose environment value is invalid
    # stays so (and raises only when read), unless it is overridden here.
    values = {f.name: object.__getattribute__(current, f.name) for f in dataclasses.fields(Knobs)}
    values.update(changes)  # an unknown name: TypeError from Knobs()
    cls = _EnvKnobs if any(type(v) is _Invalid for v in values.values()) else Knobs
    current = cls(**values)
    try:
        yield current
    finally:
        current = saved
