"""Saves across processes: every rank writes its share of the state, rank 0 alone commits it, once.

A :class:`Coordinator` is the little a save needs of a job's processes: gather small plain values to rank
0, scatter rank 0's orders, broadcast its verdict. :class:`TorchDistributed` does this with
torch.distributed's collectives; :data:`SINGLE` is the one-process default. :func:`resolve` picks
torch.distributed when the caller's program has initialised it (torch is never imported to find out).

A save runs in three rounds, each a collective that every rank joins whatever happened to it locally, so
a failure on one rank fails the save on all of them:

1. *plan*: each rank walks its state and sends rank 0 what it holds (key paths, dtypes, shapes, and for
   each :class:`~ckptstore.Shard` its global shape and offsets). Rank 0 checks that the ranks agree and
   that each array's blocks cover it exactly, assigns every distinct block and every replicated (plain)
   array to one rank, balancing bytes, begins the staging area and scatters the orders.
2. *write*: each rank writes what it was given into its own safetensors files in the shared staging
   area, then sends rank 0 its file names, sizes and tensor entries (with checksums).
3. *commit*: rank 0 builds and validates the manifest and commits it (local disk: into the temp
   directory, then one rename; object stores: the manifest last, as an exclusive create), then
   broadcasts the outcome.

A rank that raises sends its error instead; rank 0 then aborts and every rank raises (the failing rank
its own exception, the others the same error class naming that rank). A rank that dies makes the other
ranks' collectives fail (at the latest after the process group's timeout); they raise
:class:`~ckptstore.errors.DistributedError` and nothing is committed unless rank 0 had committed already,
in which case the checkpoint is complete.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import errors, knobs, manifest, tensorio
from .blocks import check_partition
from .errors import CkptStoreError, DistributedError, ShardingError
from .manifest import Manifest
from .skeleton import ShardedRef, TensorRef, map_refs, render_path
from .storage import Staging, Storage, new_token

if TYPE_CHECKING:
    from .checkpoint import Prepared

__all__ = ["SINGLE", "Coordinator", "SingleProcess", "TorchDistributed", "resolve"]


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

    It uses ``gather_object``, ``scatter_object_list`` and ``broadcast_object_list``; these pickle, and
    only small plain lists pass through them, between the processes of one job. A collective whose peer
    died fails after the process group's timeout at the latest
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

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, group=self.group, group_dst=0)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        box: list[Any] = [None]
        self._dist.scatter_object_list(box, objs, group=self.group, group_src=0)
        return box[0]

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def __repr__(self) -> str:
        return f"TorchDistributed(rank={self.rank}, world_size={self.world_size})"


def resolve(coordinator: Coordinator | None) -> Coordinator:
    """``coordinator`` if given; else torch.distributed's world if this program has imported torch and
    initialised a process group of more than one process; else :data:`SINGLE`."""
    if coordinator is not None:
        if not isinstance(coordinator, Coordinator):
            raise CkptStoreError(f"coordinator must have rank, world_size, gather, scatter, broadcast: {coordinator!r}")
        return coordinator
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return SINGLE


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
            own, outcome = e, _failure(-1, e)
    outcome = _collective(c.broadcast, outcome, "agreeing on a value")
    if outcome[0] != "ok":
        _raise(outcome, own, c.rank)
    return outcome[1]


# --- save -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Committed:
    """What every rank learns of a committed save."""

    created: float
    #: Bytes of tensor data over all ranks' files.
    nbytes: int
    #: The metadata as committed (rank 0's).
    metadata: dict[str, Any]
    #: The manifest, on rank 0 only.
    manifest: Manifest | None = None


def save(
    storage: Storage,
    name: str,
    step: int,
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    coordinator: Coordinator,
    prepared: Prepared | None = None,
) -> Committed:
    """Save ``state`` (this rank's view of it) as the checkpoint directory ``name``, with every rank.

    Plain arrays are taken as replicated: the same on every rank, written once. :class:`ckptstore.Shard`
    and DTensor leaves are blocks of global arrays. Plain values and the metadata are rank 0's.

    Raises:
        ShardingError: the ranks disagree about the state, or an array's blocks do not cover it exactly.
        DistributedError: another rank failed, died or timed out.
        CheckpointExistsError: ``name`` is committed and ``overwrite`` is False.
    """
    from . import checkpoint  # checkpoint.write calls back here for single-process sharded saves

    c = coordinator
    own: BaseException | None = None
    try:
        if prepared is None:
            prepared = checkpoint.prepare(state, metadata)
        report: list[Any] = ["ok", _describe(prepared), name]
    except Exception as e:
        own, report = e, _failure(c.rank, e)

    staging: Staging | None = None
    # Rank 0 removes the staging area on failure until it has committed (it knows every file once the
    # results arrived). Another rank removes its own files only while rank 0 cannot have committed them:
    # before it sent them, or on rank 0's word that the save failed. After a failed collective it cannot
    # know, and leaves them to the leftover cleaning of later saves.
    may_abort = True
    try:
        reports = _collective(c.gather, report, "planning")
        orders: list[Any] | None = None
        layout: _Layout | None = None
        if c.rank == 0:
            assert reports is not None
            orders, layout, staging, own0 = _plan(storage, name, reports, overwrite, c.world_size)
            own = own or own0
        order = _collective(c.scatter, orders, "planning")
        if order[0] != "ok":
            _raise(order, own, c.rank)
        _, token, tasks = order
        assert prepared is not None
        try:
            if staging is None:
                staging = storage.join(name, token)
            result: list[Any] = ["ok", *_write_share(staging, prepared, tasks, token, c.rank)]
        except Exception as e:
            if isinstance(e, OSError) and not isinstance(e, CkptStoreError):  # a named error, errno kept
                wrapped = checkpoint.storage_error(e, f"saving {storage.url_of(name)} failed on rank {c.rank}")
                wrapped.__cause__, e = e, wrapped
            own, result = e, _failure(c.rank, e)
        may_abort = c.rank == 0
        results = _collective(c.gather, result, "writing")
        verdict: list[Any] | None = None
        if c.rank == 0:
            assert results is not None and layout is not None and staging is not None
            verdict, own0 = _commit(storage, staging, step, prepared, layout, results, overwrite)
            may_abort = verdict[0] != "ok"
            own = own or own0
        verdict = _collective(c.broadcast, verdict, "committing")
        if verdict[0] != "ok":
            may_abort = True
            _raise(verdict, own, c.rank)
        _, created, nbytes, meta = verdict
        return Committed(created, nbytes, meta, layout.manifest if layout is not None else None)
    except BaseException:
        if staging is not None and may_abort:
            staging.abort()
        raise


def _collective(fn: Callable[[Any], Any], arg: Any, what: str) -> Any:
    try:
        return fn(arg)
    except Exception as e:
        raise DistributedError(
            f"{what} failed: a collective between the ranks failed ({type(e).__name__}: {e}); "
            "a rank died, timed out or raised outside ckptstore"
        ) from e


def _failure(rank: int, e: BaseException) -> list[Any]:
    """An error as plain values: ``["error", rank (-1: no one rank), class name, message]``."""
    return ["error", rank, type(e).__name__, str(e)]


def _raise(failure: list[Any], own: BaseException | None, rank: int) -> None:
    _, origin, cls_name, message = failure
    if own is not None and origin in (rank, -1):
        raise own
    cls = getattr(errors, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CkptStoreError)):
        cls, message = DistributedError, f"{cls_name}: {message}"
    raise cls(f"rank {origin}: {message}" if origin >= 0 else message)


def _describe(prepared: Prepared) -> list[list[Any]]:
    """This rank's arrays as plain values: ``[path, dtype, shape, global shape | None, offsets | None]``."""
    return [
        [
            render_path(a.path),
            a.dtype,
            list(a.array.shape),
            None if a.global_shape is None else list(a.global_shape),
            None if a.offsets is None else list(a.offsets),
        ]
        for a in prepared.arrays
    ]


@dataclasses.dataclass
class _Layout:
    """Rank 0's plan: the manifest's tensor list, slot by slot, and what each leaf became."""

    #: Per slot: (leaf index, offsets of the block or None for a replicated array, shape, dtype, writer).
    slots: list[tuple[int, tuple[int, ...] | None, tuple[int, ...], str, int]]
    #: Per leaf: a slot (replicated) or the global shape and its blocks' slots (sharded).
    leaves: list[int | tuple[tuple[int, ...], list[int]]]
    #: The writer token of this save (in the manifest and the data file names).
    token: str = ""
    manifest: Manifest | None = None


def assign(reports: list[list[list[Any]]]) -> tuple[_Layout, list[list[list[int]]]]:
    """Check the ranks' arrays against each other and give every distinct block, and every replicated
    array, to one rank: blocks held by one rank to it, the rest largest first to the least loaded rank
    that holds them. Returns the layout and each rank's tasks ``[slot, leaf index]``.

    Raises:
        ShardingError: the ranks disagree, or an array's blocks overlap, leave a gap or reach outside it.
    """
    world = len(reports)
    first = reports[0]
    for r, rep in enumerate(reports[1:], 1):
        if len(rep) != len(first) or any(a[0] != b[0] for a, b in zip(rep, first)):
            paths0, paths_r = [a[0] for a in first], [a[0] for a in rep]
            diff = sorted(set(paths0) ^ set(paths_r))[:5] or paths0[:5]
            raise ShardingError(
                f"the ranks' states differ: rank 0 has {len(first)} arrays, rank {r} {len(rep)} "
                f"(paths not on both, or out of order: {diff})"
            )
    load = [0] * world
    slots: list[tuple[int, tuple[int, ...] | None, tuple[int, ...], str, int]] = []
    leaves: list[int | tuple[tuple[int, ...], list[int]]] = []
    shared: list[tuple[int, int, list[int]]] = []  # (nbytes, slot, holders) still to assign
    for i, (path, dtype, shape, gshape, _) in enumerate(first):
        itemsize = _itemsize(dtype)
        kinds = {tuple(rep[i][3]) if rep[i][3] is not None else None for rep in reports}
        if len(kinds) > 1 or any(rep[i][1] != dtype for rep in reports):
            raise ShardingError(
                f"{path}: the ranks disagree on it (dtypes {sorted({rep[i][1] for rep in reports})}, "
                f"global shapes {sorted(map(str, kinds))}); a plain array must be the same on every rank"
            )
        if gshape is None:
            if any(rep[i][2] != shape for rep in reports):
                raise ShardingError(
                    f"{path}: a plain (replicated) array with different shapes on different ranks "
                    f"({sorted({str(rep[i][2]) for rep in reports})}); save per-rank arrays as Shards"
                )
            leaves.append(len(slots))
            shared.append((math.prod(shape) * itemsize, len(slots), list(range(world))))
            slots.append((i, None, tuple(shape), dtype, -1))
            continue
        holders: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for r, rep in enumerate(reports):
            holders.setdefault((tuple(rep[i][4]), tuple(rep[i][2])), []).append(r)
        blocks = sorted(holders)
        problem = check_partition(blocks, tuple(gshape))
        if problem is not None:
            raise ShardingError(f"{path}: the ranks' shards of global shape {tuple(gshape)} do not fit: {problem}")
        block_slots = []
        for offsets, bshape in blocks:
            owners = holders[(offsets, bshape)]
            nbytes = math.prod(bshape) * itemsize
            if len(owners) == 1:
                load[owners[0]] += nbytes
                slots.append((i, offsets, bshape, dtype, owners[0]))
            else:
                shared.append((nbytes, len(slots), owners))
                slots.append((i, offsets, bshape, dtype, -1))
            block_slots.append(len(slots) - 1)
        leaves.append((tuple(gshape), block_slots))
    for nbytes, slot, owners in sorted(shared, key=lambda s: (-s[0], s[1])):
        writer = min(owners, key=lambda r: (load[r], r))
        load[writer] += nbytes
        leaf, where, shape, dtype, _ = slots[slot]
        slots[slot] = (leaf, where, shape, dtype, writer)
    tasks: list[list[list[int]]] = [[] for _ in range(world)]
    for slot, (leaf, _, _, _, writer) in enumerate(slots):
        tasks[writer].append([slot, leaf])
    return _Layout(slots, leaves), tasks


def _check_visible(storage: Storage, staging: Staging, files: list[Any], results: list[Any]) -> None:
    """Every rank's files, as rank 0 sees them: a filesystem that the ranks do not share (memory://, a
    node-local disk) must fail the save, not commit a manifest naming files that are not there."""
    sizes = storage.sizes(staging.dir)
    owner = {n: r for r, res in enumerate(results) for n, _ in res[1]}
    for f in files:
        if sizes.get(f.name) != f.size:
            raise DistributedError(
                f"rank {owner.get(f.name)}'s file {storage.url_of(staging.dir + '/' + f.name)} is not visible to "
                f"rank 0 ({sizes.get(f.name)} bytes, {f.size} written): do all ranks share this filesystem?"
            )


def _itemsize(code: str) -> int:
    from .dtypes import dtype_of

    return int(dtype_of(code).itemsize)


def _plan(
    storage: Storage, name: str, reports: list[Any], overwrite: bool, world: int
) -> tuple[list[Any], _Layout | None, Staging | None, BaseException | None]:
    """Rank 0: the orders for every rank, the layout, and the staging area (or the failure for all)."""
    failed = next((r for r in reports if r[0] != "ok"), None)
    if failed is not None:
        return [failed] * world, None, None, None
    try:
        names = [r[2] for r in reports]
        if len(set(names)) > 1:
            raise DistributedError(f"the ranks save different steps: {', '.join(sorted(set(names)))}")
        layout, tasks = assign([r[1] for r in reports])
        if not overwrite and storage.is_committed(name):
            raise errors.CheckpointExistsError(
                f"{storage.url_of(name)} is already committed (pass overwrite=True to replace it)"
            )
        layout.token = token = new_token()
        staging = storage.begin(name, token)
    except Exception as e:
        return [_failure(-1, e)] * world, None, None, e
    return [["ok", token, t] for t in tasks], layout, staging, None


def _write_share(
    staging: Staging, prepared: Prepared, tasks: list[list[int]], token: str, rank: int
) -> tuple[list[list[Any]], list[list[Any]]]:
    """Write this rank's arrays into its own files; return their names and sizes, and the tensor entries
    ``[slot, name, file (this rank's), dtype, shape, offset, nbytes, xxh3]``."""
    leaves = [prepared.arrays[leaf] for _, leaf in tasks]
    names = tensorio.tensor_names(leaves)
    for k, a in enumerate(leaves):
        if a.offsets is not None:  # blocks of one array are told apart by their offsets
            names[k] += "@" + ",".join(map(str, a.offsets))
    plans = tensorio.plan_files(leaves, f"tensors-{token}-r{rank:05d}", knobs.current.max_file_bytes)
    files: list[list[Any]] = []
    entries: list[list[Any]] = []
    for plan, size, written in tensorio.write_files(staging, leaves, names, plans):
        files.append([plan.name, size])
        for i, e in zip(plan.indices, written):
            entries.append([tasks[i][0], e.name, e.file, e.dtype, list(e.shape), e.offset, e.nbytes, e.xxh3])
    return files, entries


def _commit(
    storage: Storage,
    staging: Staging,
    step: int,
    prepared: Prepared,
    layout: _Layout,
    results: list[Any],
    overwrite: bool,
) -> tuple[list[Any], BaseException | None]:
    """Rank 0: the manifest from every rank's files and entries, committed; the verdict for all ranks."""
    failed = next((r for r in results if r[0] != "ok"), None)
    if failed is not None:
        staging.abort()
        return failed, None
    try:
        files: list[manifest.FileEntry] = []
        slots: list[manifest.TensorEntry | None] = [None] * len(layout.slots)
        others: list[str] = []
        for rank, (_, rank_files, rank_entries) in enumerate(results):
            base = len(files)
            files.extend(manifest.FileEntry(n, s) for n, s in rank_files)
            if rank:
                others.extend(n for n, _ in rank_files)
            for slot, tname, file, dtype, shape, offset, nbytes, xxh3 in rank_entries:
                slots[slot] = manifest.TensorEntry(tname, base + file, dtype, tuple(shape), offset, nbytes, xxh3)
        if any(s is None for s in slots):
            raise DistributedError(f"{sum(s is None for s in slots)} arrays were written by no rank")
        _check_visible(storage, staging, files, results)
        tensors = tuple(s for s in slots if s is not None)

        def ref(node: Any) -> Any:
            leaf = layout.leaves[node.index]
            if isinstance(leaf, int):
                return TensorRef(leaf)
            gshape, block_slots = leaf
            dtype = layout.slots[block_slots[0]][3] if block_slots else prepared.arrays[node.index].dtype
            return ShardedRef(gshape, dtype, tuple((s, layout.slots[s][1] or ()) for s in block_slots))

        m = Manifest(
            step=step,
            created=time.time(),
            writer=layout.token,
            metadata=prepared.metadata,
            tree=map_refs(prepared.skeleton, ref),
            files=tuple(files),
            tensors=tensors,
        )
        data = manifest.encode(m)
        manifest.decode(data, source="the manifest being committed")  # never commit one that cannot be read
        staging.adopt(others)
    except Exception as e:
        staging.abort()
        return _failure(-1, e), e
    try:
        staging.commit(data, overwrite=overwrite)
    except Exception as e:
        staging.abort()
        return _failure(0, e), e
    layout.manifest = m
    return ["ok", m.created, sum(f.size for f in files), m.metadata], None
