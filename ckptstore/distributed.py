"""How the processes of a job talk during a save: the transport, and nothing else.

A :class:`Coordinator` is the little a save needs of a job's processes: gather small plain values to rank
0, scatter rank 0's orders, broadcast its verdict. :class:`TorchDistributed` does this with
torch.distributed's collectives, :class:`JaxDistributed` through the key-value store of JAX's distributed
runtime; :data:`SINGLE` is the one-process default (a world of one). :func:`resolve` picks the runtime the
caller's program has initialised (neither torch nor jax is imported to find out). The save itself, the
same for one process or many, is :mod:`ckptstore.pipeline`.

Errors cross ranks as plain values (:func:`failure`): a rank that raises sends its error instead of its
result, and every rank then raises (:func:`raise_failure`: the failing rank its own exception, the others
the same error class naming that rank). A rank that dies makes the others' collectives fail (at the latest
after the process group's timeout): they raise :class:`~ckptstore.errors.DistributedError`
(:func:`collective`).
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import errors, knobs
from .errors import CkptStoreError, DistributedError

log = logging.getLogger(__name__)

__all__ = [
    "SINGLE",
    "Coordinator",
    "JaxDistributed",
    "SingleProcess",
    "TorchDistributed",
    "agree",
    "all_max",
    "collective",
    "failure",
    "raise_failure",
    "resolve",
    "side_group",
]


@runtime_checkable
class Coordinator(Protocol):
    """How the processes of one job talk during a save: rank 0 gathers, decides and tells.

    Values passed are small plain Python values (lists, str, int, float). Every method is a collective:
    all ranks call it, in the same order.
    """

    #: This process's rank, 0 .. world_size - 1.
    rank: int
    #: How many processes take part.
    world_size: int

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
        ...

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank 0 passes one value per rank (the others None); each rank gets its own."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...


class SingleProcess:
    """The coordinator of a job of one process (the default)."""

    rank = 0
    world_size = 1

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        if not objs:
            raise CkptStoreError("scatter needs one value per rank on rank 0")
        return objs[0]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def __repr__(self) -> str:
        return "SingleProcess()"


#: The single-process coordinator.
SINGLE = SingleProcess()


class TorchDistributed:
    """A coordinator over torch.distributed (any backend: gloo, nccl, ...), on ``group`` or the world.

    Values are pickled: small plain lists made by ckptstore itself, between the processes of one job. On a
    group with gloo (CPU tensors), each passes in one fixed-size message (``gather``, ``scatter`` or
    ``broadcast`` of :data:`INLINE_BYTES`), and a longer one in a second message of its own size: the object
    collectives (``gather_object``, ...) first all-gather or broadcast every value's size, and gloo's
    all-gather costs several times its gather (3.5 ms against 0.6 at 4 processes on 2 cores, see
    docs/distributed.md). On other backends (NCCL alone) the object collectives are used. A collective
    whose peer died fails after the process group's timeout at the latest
    (``init_process_group(timeout=timedelta(...))``).

    Raises:
        DistributedError: torch.distributed is not initialised.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("torch.distributed is not initialised (call init_process_group first)")
        self._dist = dist
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        # "gloo", or "cpu:gloo,cuda:nccl" where a group has a backend per device: CPU tensors go to gloo.
        self._gloo = "gloo" in str(dist.get_backend(group))

    def gather(self, obj: Any) -> list[Any] | None:
        if not self._gloo:
            got: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            self._dist.gather_object(obj, got, group=self.group, group_dst=0)
            return got
        head, data = _pack(obj)
        heads = [_head() for _ in range(self.world_size)] if self.rank == 0 else None
        self._dist.gather(head, heads, group=self.group, group_dst=0)
        if self.rank != 0:
            if len(data) > INLINE_BYTES:
                self._dist.send(_tensor(data), group=self.group, group_dst=0, tag=_TAG)
            return None
        assert heads is not None
        return [pickle.loads(data)] + [self._rest(h, r) for r, h in enumerate(heads[1:], 1)]

    def scatter(self, objs: list[Any] | None) -> Any:
        if not self._gloo:
            box: list[Any] = [None]
            self._dist.scatter_object_list(box, objs, group=self.group, group_src=0)
            return box[0]
        head = _head()
        if self.rank != 0:
            self._dist.scatter(head, None, group=self.group, group_src=0)
            return self._rest(head, 0)
        if objs is None or len(objs) != self.world_size:
            raise CkptStoreError("scatter needs one value per rank on rank 0")
        packed = [_pack(obj) for obj in objs]
        self._dist.scatter(head, [h for h, _ in packed], group=self.group, group_src=0)
        for r, (_, data) in enumerate(packed[1:], 1):
            if len(data) > INLINE_BYTES:
                self._dist.send(_tensor(data), group=self.group, group_dst=r, tag=_TAG)
        return pickle.loads(packed[0][1])

    def broadcast(self, obj: Any) -> Any:
        if not self._gloo:
            box = [obj]
            self._dist.broadcast_object_list(box, group=self.group, group_src=0)
            return box[0]
        head, data = _pack(obj) if self.rank == 0 else (_head(), b"")
        self._dist.broadcast(head, group=self.group, group_src=0)
        size = _size(head)
        if size <= INLINE_BYTES:
            return pickle.loads(data if self.rank == 0 else _inline(head, size))
        rest = _tensor(data) if self.rank == 0 else _buffer(size)
        self._dist.broadcast(rest, group=self.group, group_src=0)
        return pickle.loads(data if self.rank == 0 else rest.numpy().tobytes())

    def _rest(self, head: Any, src: int) -> Any:
        """The value whose first message from rank ``src`` is ``head``: inline, or in a second message."""
        size = _size(head)
        if size <= INLINE_BYTES:
            return pickle.loads(_inline(head, size))
        rest = _buffer(size)
        self._dist.recv(rest, group=self.group, group_src=src, tag=_TAG)
        return pickle.loads(rest.numpy().tobytes())

    def check_in(self, what: str) -> None:
        """Every rank says it has begun ``what`` (a save), through the process group's key-value store
        (no collective: a rank that never joins is not mixed up with the training's collectives). Rank 0
        waits for all: after ``knobs.join_warn_s`` it logs which ranks have not joined yet, and after
        ``knobs.join_timeout_s`` it raises DistributedError naming them. The usual cause is a save called on
        rank 0 alone (``if rank == 0: store.save(...)``), which needs ``coordinator=SINGLE``.

        Raises:
            DistributedError: ranks did not join within ``knobs.join_timeout_s`` (rank 0 only).
        """
        from datetime import timedelta

        store = _key_value_store()
        if store is None:
            return
        group = "world" if self.group is None else ",".join(map(str, self._dist.get_process_group_ranks(self.group)))
        seq = _check_ins[(group, what)] = _check_ins.get((group, what), 0) + 1
        prefix = f"ckptstore/check-in/{group}/{what}/{seq}/"
        verdict_key, k = f"{prefix}verdict", knobs.current
        if self.rank != 0:
            # Here, then rank 0's word: go on, or the error it raised (so that no rank that joined is left
            # waiting in a collective rank 0 never enters).
            store.set(f"{prefix}{self.rank}", "1")
            store.wait([verdict_key], timedelta(seconds=k.join_timeout_s + 60))
            verdict = store.get(verdict_key).decode()
            if store.add(f"{prefix}read", 1) == self.world_size - 1:  # the last reader cleans up
                store.delete_key(verdict_key)
                store.delete_key(f"{prefix}read")
            if verdict != "go":
                raise DistributedError(f"rank 0: {verdict}")
            return
        keys = {r: f"{prefix}{r}" for r in range(1, self.world_size)}
        waited = 0.0
        try:
            for limit in (k.join_warn_s, k.join_timeout_s):
                try:
                    store.wait(list(keys.values()), timedelta(seconds=max(limit - waited, 0.001)))
                    break
                except Exception:  # the store's timeout (DistStoreError, a RuntimeError)
                    missing = [r for r, key in keys.items() if not store.check([key])]
                    if not missing:
                        break
                    why = (
                        f"ranks {missing} of {self.world_size} have not joined this {what} after {limit:g} s; "
                        "a save that rank 0 makes alone (`if rank == 0: store.save(...)`) needs "
                        "`CheckpointStore(..., coordinator=ckptstore.distributed.SINGLE)`"
                    )
                    if limit == k.join_timeout_s:
                        raise DistributedError(f"{why} (knobs.join_timeout_s); nothing was saved") from None
                    log.warning("%s; waiting up to knobs.join_timeout_s = %g s", why, k.join_timeout_s)
                    waited = limit
        except DistributedError as e:
            store.set(verdict_key, str(e))
            raise
        store.set(verdict_key, "go")
        for key in keys.values():
            store.delete_key(key)

    def all_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of every rank's ``values`` (small non-negative ints), on every rank: one
        all-reduce of a CPU tensor on a gloo group of this coordinator's ranks, made for it (:func:`side_group`),
        so that it never interleaves with the training's collectives on the group itself (whatever its
        backend: NCCL too)."""
        import torch

        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=side_group(self.group))
        return [int(v) for v in t.tolist()]

    def __repr__(self) -> str:
        return f"TorchDistributed(rank={self.rank}, world_size={self.world_size})"


#: The bytes of a pickled value that pass inline in the fixed-size message of a :class:`TorchDistributed`
#: collective on gloo; a longer value follows in a second message. A save's plan and results for a few
#: dozen tensors fit.
INLINE_BYTES = 4096

#: The tag of :class:`TorchDistributed`'s point-to-point messages (a long value's second message), apart
#: from the default tag 0 a training's own ``send``/``recv`` would use.
_TAG = 0x636B7074


def _head() -> Any:
    """An empty fixed-size message: 8 bytes of size (little-endian), then :data:`INLINE_BYTES` of value."""
    import torch

    return torch.zeros(8 + INLINE_BYTES, dtype=torch.uint8)


def _buffer(size: int) -> Any:
    import torch

    return torch.empty(size, dtype=torch.uint8)


def _tensor(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _pack(obj: Any) -> tuple[Any, bytes]:
    """``obj`` pickled, and its fixed-size message: its size, and the value itself if it fits."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    head = _head()
    view = head.numpy()
    view[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
    if len(data) <= INLINE_BYTES:
        view[8 : 8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return head, data


def _size(head: Any) -> int:
    return int.from_bytes(head.numpy()[:8].tobytes(), "little")


def _inline(head: Any, size: int) -> bytes:
    return head.numpy()[8 : 8 + size].tobytes()


class JaxDistributed:
    """A coordinator over JAX's distributed runtime: the processes of ``jax.distributed.initialize``.

    It passes values through the key-value store of JAX's coordination service (what Orbax's multihost
    utilities do; JAX's public ``multihost_utils`` only moves arrays, through compiled collectives, with
    no timeout). Values are pickled: they are small plain lists made by ckptstore itself, between the
    processes of one job. Every wait is bounded by ``timeout_s``: a process that died or never joins makes
    the others raise DistributedError within that time, and sooner where JAX's coordination service notices
    the death first (its heartbeats: ``initialize(heartbeat_timeout_seconds=...)``; it may then end the other
    processes itself).

    Args:
        timeout_s: the longest one collective waits for the other processes (default 600 s; a save's
            collectives wait for the slowest process's writing, so allow for it).

    Raises:
        DistributedError: JAX's distributed runtime is not initialised (``jax.distributed.initialize``).
    """

    def __init__(self, timeout_s: float = 600.0, *, channel: str = "main") -> None:
        client = _jax_client()
        if client is None:
            raise DistributedError("JAX's distributed runtime is not initialised (call jax.distributed.initialize)")
        import jax

        self._client = client
        self.rank = int(jax.process_index())
        self.world_size = int(jax.process_count())
        self.timeout_s = float(timeout_s)
        self.channel = channel
        self._joining: str | None = None

    def background(self) -> JaxDistributed:
        """A twin for the background half of async saves (``save(blocking=False)``): its collectives are
        numbered in a sequence of their own, so that they never pair with those the caller's thread runs
        meanwhile (a restore, the save decisions)."""
        return JaxDistributed(self.timeout_s, channel="background")

    def check_in(self, what: str) -> None:
        """Mark the next gather as the start of ``what`` (a save): there process 0 waits for the others as
        :meth:`TorchDistributed.check_in` does, logging after ``knobs.join_warn_s`` which processes have not
        joined (the usual cause: a save called on process 0 alone, which needs ``coordinator=SINGLE``), and
        failing after ``timeout_s`` with the same words. Not a collective of its own."""
        self._joining = what

    def _keys(self, op: str) -> str:
        # Collectives are numbered in one sequence per process and channel, whatever coordinator object
        # runs them: every process calls them in the same order, so the n-th of each meets the n-th of the
        # others (making a coordinator takes no number). The background channel is async saves' thread's.
        n = _jax_collectives[self.channel] = _jax_collectives.get(self.channel, 0) + 1
        return f"ckptstore/jax/{self.channel}/{n}/{op}"

    def _put(self, key: str, obj: Any) -> None:
        self._client.key_value_set_bytes(key, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def _get(self, key: str, who: int, joining: str | None = None) -> Any:
        get = self._client.blocking_key_value_get_bytes
        hint = (
            f"; a {joining} that process 0 makes alone (`if jax.process_index() == 0: store.save(...)`) needs "
            "`CheckpointStore(..., coordinator=ckptstore.distributed.SINGLE)`"
            if joining
            else ""
        )
        first = min(knobs.current.join_warn_s, self.timeout_s) if joining else self.timeout_s
        started = time.monotonic()
        try:
            try:
                data = get(key, max(int(first * 1000), 1))
            except Exception:  # the runtime's timeout, or at once its error after a peer died
                if first >= self.timeout_s or time.monotonic() - started < first * 0.9:
                    raise
                log.warning("rank %d has not joined this %s after %g s%s", who, joining, first, hint)
                data = get(key, max(int((self.timeout_s - first) * 1000), 1))
        except Exception as e:
            raise DistributedError(
                f"rank {self.rank}: no word from rank {who} within {self.timeout_s:g} s "
                f"(JaxDistributed.timeout_s), or the runtime failed ({type(e).__name__}: {e}){hint}"
            ) from e
        self._client.key_value_delete(key)
        return pickle.loads(data)  # ckptstore's own small values, from a process of this job

    def gather(self, obj: Any) -> list[Any] | None:
        base = self._keys("gather")
        joining, self._joining = self._joining, None
        if self.rank != 0:
            self._put(f"{base}/{self.rank}", obj)
            return None
        return [obj] + [self._get(f"{base}/{r}", r, joining) for r in range(1, self.world_size)]

    def scatter(self, objs: list[Any] | None) -> Any:
        base = self._keys("scatter")
        if self.rank != 0:
            return self._get(f"{base}/{self.rank}", 0)
        if objs is None or len(objs) != self.world_size:
            raise CkptStoreError("scatter needs one value per rank on rank 0")
        for r in range(1, self.world_size):
            self._put(f"{base}/{r}", objs[r])
        return objs[0]

    def broadcast(self, obj: Any) -> Any:
        # One key per receiver: each deletes its own, so nothing is left in the service's memory.
        return self.scatter([obj] * self.world_size if self.rank == 0 else None)

    def __repr__(self) -> str:
        return f"JaxDistributed(rank={self.rank}, world_size={self.world_size})"


#: How many collectives JaxDistributed coordinators of this process ran (their keys' prefix).
_jax_collectives: dict[str, int] = {}


def _jax_client() -> Any:
    """The client of JAX's distributed runtime if this program imported jax and initialised it, else None
    (never imports jax; the client is private API, present in jax 0.4 to 0.10)."""
    if "jax" not in sys.modules:
        return None
    try:
        from jax._src import distributed as jax_distributed
    except Exception:
        return None
    return getattr(jax_distributed.global_state, "client", None)


#: The gloo groups :func:`side_group` made, by (default process group, group served): the objects themselves
#: are the key (held, so their ids are never reused); a new ``init_process_group`` makes a new key.
_side_groups: dict[tuple[Any, Any], Any] = {}


#: Check-ins made, by (group, what): every rank counts alike, so that the n-th save of each meets the n-th
#: of the others.
_check_ins: dict[tuple[str, str], int] = {}


def _key_value_store() -> Any:
    """The default process group's key-value store (TCPStore, ...), or None where torch keeps it out of
    reach (a private accessor, present in torch 2.x)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def side_group(group: Any = None) -> Any:
    """A gloo process group of the ranks of ``group`` (None: the world) for ckptstore's own small collectives
    (the save decisions' agreement), made on first use. Making it is a collective of those ranks
    (``new_group(..., use_local_synchronization=True)``): every rank of ``group`` must ask for it at the same
    point of the program, the first agreement of the first ``should_save``."""
    import torch.distributed as dist

    key = (dist.group.WORLD, group)
    made = _side_groups.get(key)
    if made is None:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        made = dist.new_group(ranks, backend="gloo", use_local_synchronization=ranks is not None)
        _side_groups[key] = made
    return made


def resolve(coordinator: Coordinator | None) -> Coordinator:
    """``coordinator`` if given; else the world of the distributed runtime this program initialised:
    torch.distributed's (if torch is imported and a process group of more than one process exists) or
    JAX's (if jax is imported and ``jax.distributed.initialize`` made more than one process); else
    :data:`SINGLE`. Neither framework is imported to find out.

    Raises:
        DistributedError: both are initialised and disagree on this process's rank or the number of
            processes (pass ``coordinator=`` to say which one a save uses).
    """
    if coordinator is not None:
        if not isinstance(coordinator, Coordinator):
            raise CkptStoreError(f"coordinator must have rank, world_size, gather, scatter, broadcast: {coordinator!r}")
        return coordinator
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    torch_world = dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    jax_world = _jax_world()
    if torch_world and jax_world is not None:
        assert dist is not None
        torch_at = (int(dist.get_rank()), int(dist.get_world_size()))
        if torch_at != jax_world:
            raise DistributedError(
                f"torch.distributed (rank {torch_at[0]} of {torch_at[1]}) and JAX's distributed runtime "
                f"(process {jax_world[0]} of {jax_world[1]}) are both initialised and disagree; pass "
                "coordinator=ckptstore.distributed.TorchDistributed() or JaxDistributed() to say which one saves"
            )
    if torch_world:
        return TorchDistributed()
    if jax_world is not None:
        return JaxDistributed()
    return SINGLE


def _jax_world() -> tuple[int, int] | None:
    """``(process index, process count)`` of JAX's distributed runtime if initialised with more than one
    process, else None."""
    if _jax_client() is None:
        return None
    import jax

    count = int(jax.process_count())
    return (int(jax.process_index()), count) if count > 1 else None


def agree(coordinator: Coordinator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank; if it raises, every rank raises (rank 0 its
    own exception, the others the same error class)."""
    c = coordinator
    own: BaseException | None = None
    outcome: Any = None
    if c.rank == 0:
        try:
            outcome = ["ok", fn()]
        except Exception as e:
            own, outcome = e, failure(-1, e)
    outcome = collective(c.broadcast, outcome, "agreeing on a value")
    if outcome[0] != "ok":
        raise_failure(outcome, own, c.rank)
    return outcome[1]


def all_max(coordinator: Coordinator, values: list[int]) -> list[int]:
    """The element-wise maximum of every rank's ``values`` (small ints), on every rank: a collective. A
    coordinator with an ``all_max`` method (:class:`TorchDistributed`: one all-reduce on a side gloo group) does
    it; any other gathers to rank 0 and broadcasts; a world of one returns ``values``."""
    c = coordinator
    if c.world_size == 1:
        return list(values)
    own = getattr(c, "all_max", None)
    if callable(own):
        return list(collective(own, list(values), "agreeing on the save decision"))
    gathered = collective(c.gather, list(values), "agreeing on the save decision")
    top = [max(column) for column in zip(*gathered)] if gathered is not None else None
    return list(collective(c.broadcast, top, "agreeing on the save decision"))


# --- errors across ranks -----------------------------------------------------------------------------


def collective(fn: Callable[[Any], Any], arg: Any, what: str) -> Any:
    """``fn(arg)``, a collective of the coordinator; its failure (a rank died or timed out) as a
    DistributedError naming ``what`` was being done."""
    try:
        return fn(arg)
    except Exception as e:
        raise DistributedError(
            f"{what} failed: a collective between the ranks failed ({type(e).__name__}: {e}); "
            "a rank died, timed out or raised outside ckptstore"
        ) from e


def failure(rank: int, e: BaseException) -> list[Any]:
    """An error as plain values: ``["error", rank (-1: no one rank), class name, message]``."""
    return ["error", rank, type(e).__name__, str(e)]


def raise_failure(failed: list[Any], own: BaseException | None, rank: int) -> None:
    """Raise the error ``failed`` (from :func:`failure`) on this rank: its own exception ``own`` where the
    error came from here (or from no one rank), else the same ckptstore error class naming its rank."""
    _, origin, cls_name, message = failed
    if own is not None and origin in (rank, -1):
        raise own
    cls = getattr(errors, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CkptStoreError)):
        cls, message = DistributedError, f"{cls_name}: {message}"
    raise cls(f"rank {origin}: {message}" if origin >= 0 else message)
