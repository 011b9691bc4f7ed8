"""The save pipeline, for one process or many: a single process is a world of one.

Every save, blocking or in the background, of one process or of every rank of a job, runs these steps;
the coordinator (:mod:`.distributed`: this process alone, torch.distributed) is the only thing that
differs. Each step that involves the other ranks is a collective that every rank joins whatever happened
to it locally, so a failure anywhere fails the save everywhere:

1. *prepare* (every rank): walk the state (:func:`prepare`); nothing is written if a leaf is unsupported.
2. *plan* (rank 0): gather what each rank holds (key paths, dtypes, shapes, and for each
   :class:`~ckptstore.Shard` its global shape and offsets); check that the ranks agree and that each
   array's blocks cover it exactly; give every distinct block and every replicated array to one rank,
   balancing bytes (:func:`assign`); check the step is free; begin the staging; send each rank its share.
3. *write* (every rank): write the share into the rank's own safetensors files in the staging, with
   checksums; send rank 0 the files' names and sizes and the tensors' entries.
4. *commit* (rank 0): build the one manifest and commit it (:func:`commit_manifest`, the only place a
   manifest is encoded and published); tell every rank the outcome.
5. *abort* on any failure: the staging is removed and nothing is committed (a rank that cannot know
   whether rank 0 committed leaves its files to the leftover cleaning of later saves).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from . import knobs, manifest, tensorio, tree
from .blocks import check_partition
from .distributed import Coordinator, collective, failure, raise_failure
from .dtypes import dtype_of
from .errors import (
    ArrayDeletedError,
    CheckpointExistsError,
    CorruptCheckpointError,
    DistributedError,
    ShardingError,
    StorageError,
    UnsupportedTypeError,
    storage_error,
)
from .manifest import FileEntry, Manifest, TensorEntry
from .skeleton import (
    ArrayLeaf,
    NamedTuple,
    PerRankValues,
    Scalar,
    ShardedRef,
    Stateful,
    TensorRef,
    iter_refs,
    map_refs,
    per_rank_nodes,
    render_path,
    walk,
)
from .storage import Staging, Storage, new_token

__all__ = ["Committed", "Prepared", "assign", "commit_manifest", "ensure_free", "prepare", "save"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A state taken apart and checked, ready to be written (nothing has touched storage yet)."""

    skeleton: Any
    #: The arrays to write: one per leaf, or, where a leaf holds several blocks (a JAX global array: one
    #: per distinct block on this process's devices), its blocks in a row (see ``starts``).
    arrays: list[ArrayLeaf]
    metadata: dict[str, Any]
    #: The skeleton and the metadata surveyed (nesting, what decoding them may cost).
    survey: manifest.Survey
    #: Where some leaf holds several blocks: the index in ``arrays`` of each leaf's first block, in the
    #: leaves' order (the skeleton's references name these); None: one array per leaf, in order.
    starts: tuple[int, ...] | None = None
    #: The leaves that are this rank's own (inside a ``ckptstore.PerRank``): the last ``n_own`` leaves,
    #: one array each.
    n_own: int = 0

    @property
    def nbytes(self) -> int:
        return sum(a.array.nbytes for a in self.arrays)

    @property
    def n_leaves(self) -> int:
        return len(self.arrays) if self.starts is None else len(self.starts)


def prepare(
    state: Any, metadata: dict[str, Any] | None, *, snapshot: bool = False, defer_devices: bool = False
) -> Prepared:
    """Walk the state and check the metadata; raise before anything is written if either is unsupported.
    ``snapshot``, ``defer_devices``: see :func:`tree.flatten`."""
    skeleton, arrays = tree.flatten(state, snapshot=snapshot, defer_devices=defer_devices)
    meta = _check_metadata(metadata)
    found = manifest.survey(skeleton) + manifest.survey(meta)
    if found.problem:  # refused now, or saved and never restorable
        raise UnsupportedTypeError(f"the state cannot be saved: {found.problem}")
    n_own = 0
    if found.per_rank:  # this rank's own arrays (PerRank) go last: the ranks compare the others
        own = [i for i, a in enumerate(arrays) if a.per_rank]
        if own:
            order = [i for i, a in enumerate(arrays) if not a.per_rank] + own
            moved = {old: new for new, old in enumerate(order)}
            arrays = [arrays[i] for i in order]
            skeleton = map_refs(skeleton, lambda ref: TensorRef(moved[ref.index]))
            n_own = len(own)
    starts = None
    if any(a.global_shape is not None for a in arrays):  # sharded leaves (rare): some may hold several blocks
        firsts = sorted(ref.index for ref in iter_refs(skeleton) if type(ref) is TensorRef)
        if len(firsts) != len(arrays):
            starts = tuple(firsts)
            leaf_of = {first: k for k, first in enumerate(firsts)}
            skeleton = map_refs(skeleton, lambda ref: TensorRef(leaf_of[ref.index]))
    return Prepared(skeleton, arrays, meta, found, starts, n_own)


def _blocks_of(prepared: Prepared) -> list[list[int]]:
    """The indices in ``prepared.arrays`` of each leaf's blocks (one each for a leaf of one array)."""
    if prepared.starts is None:
        return [[i] for i in range(len(prepared.arrays))]
    ends = (*prepared.starts[1:], len(prepared.arrays))
    return [list(range(a, b)) for a, b in zip(prepared.starts, ends)]


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata as saved: plain Python values, NumPy scalars and 0-d arrays or tensors of any framework
    (``np.float32(0.5)``, ``torch.tensor(0.5)``) as the plain numbers they hold."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedTypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        skeleton, arrays = tree.flatten(metadata)
    except UnsupportedTypeError as e:  # flatten names paths from "state"; here they lie in "metadata"
        msg = str(e)
        raise UnsupportedTypeError("metadata" + msg.removeprefix("state") if msg.startswith("state") else msg) from None

    def number(node: Any) -> Any:
        """A Python number for a NumPy scalar or a 0-d array; ``node`` itself for anything else."""
        t = type(node)
        if t is Scalar or (t is TensorRef and arrays[node.index].array.ndim == 0):
            value = node.value().item() if t is Scalar else arrays[node.index].array.item()
            return value if type(value) in (bool, int, float, complex) else node
        if t is dict:
            return {k: number(v) for k, v in node.items()}
        if t is list or t is tuple:
            return t(number(v) for v in node)
        return node

    if arrays or any(type(v) is Scalar for _, v in walk(skeleton)):
        skeleton = number(skeleton)
        arrays = [a for _, ref in walk(skeleton) if type(ref) is TensorRef for a in [arrays[ref.index]]]
    if arrays:
        raise UnsupportedTypeError(
            f"{render_path(arrays[0].path, 'metadata')} is an array; metadata holds small plain "
            "values (put arrays in the state)"
        )
    if any(type(v) in (Stateful, Scalar, NamedTuple, PerRankValues) for _, v in walk(skeleton)):
        raise UnsupportedTypeError("metadata holds plain Python values only (numbers, strings, lists, dicts)")
    return dict(skeleton)


def ensure_free(storage: Storage, name: str, overwrite: bool) -> None:
    """Raise CheckpointExistsError if ``name`` is committed and ``overwrite`` is False (the one place this
    is asked before a save; the commit protocols refuse a taken step again, atomically)."""
    if not overwrite and storage.is_committed(name):
        raise CheckpointExistsError(f"{storage.url_of(name)} is already committed (pass overwrite=True to replace it)")


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
    #: Seconds this rank spent in each phase: "prepare" (walking the state, a snapshot's copy included),
    #: "plan" (agreeing on who writes what, beginning the staging), "write" (its share of the tensor files,
    #: synced), "commit" (waiting for every rank's share, then publishing the manifest).
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def save(
    storage: Storage,
    name: str,
    step: int,
    source: Callable[[], Prepared],
    *,
    overwrite: bool,
    coordinator: Coordinator,
    staged: bool = False,
) -> Committed:
    """Save what ``source()`` prepares (this rank's view of the state) as checkpoint directory ``name``,
    with every rank of ``coordinator``; steps 1-5 of the module docstring.

    Plain arrays are taken as replicated: the same on every rank, written once. :class:`ckptstore.Shard`
    and DTensor leaves are blocks of global arrays. Plain values and the metadata are rank 0's. ``staged``:
    local direct writes go through staging buffers (``knobs.staged_writes``: a blocking save's).

    Raises:
        UnsupportedTypeError: a leaf cannot be saved (on any rank; nothing is written).
        ShardingError: the ranks disagree about the state, or an array's blocks do not cover it exactly.
        CheckpointExistsError: ``name`` is committed and ``overwrite`` is False.
        StorageError: the filesystem failed; the message says whether the checkpoint is committed.
        DistributedError: another rank failed, died or timed out.
    """
    c = coordinator
    own: BaseException | None = None
    prepared: Prepared | None = None
    clock = _PhaseClock()
    check_in = getattr(c, "check_in", None)
    if c.world_size > 1 and check_in is not None:  # every rank is here: rank 0 waits for them, or says why not
        check_in("save")
    try:
        prepared = source()
        # A world of one hands its arrays over as they are: nothing crosses a process boundary.
        several = c.world_size > 1
        report: list[Any] = ["ok", _describe(prepared) if several else prepared, name, several and _own(prepared)]
    except Exception as e:
        own, report = e, failure(c.rank, e)
    clock.lap("prepare")

    staging: Staging | None = None
    # Rank 0 removes the staging on failure until it has committed (it knows every file once the results
    # arrived). Another rank removes its own files only while rank 0 cannot have committed them: before it
    # sent them, or on rank 0's word that the save failed.
    may_abort = True
    try:
        reports = collective(c.gather, report, "planning")
        orders: list[Any] | None = None
        layout: _Layout | None = None
        if c.rank == 0:
            assert reports is not None
            orders, layout, staging, own0 = _plan(storage, name, reports, overwrite, c.world_size)
            own = own or own0
        order = collective(c.scatter, orders, "planning")
        if order[0] != "ok":
            raise_failure(order, own, c.rank)
        _, token, tasks = order
        assert prepared is not None
        clock.lap("plan")
        try:
            if staging is None:
                staging = storage.join(name, token)
            result: list[Any] = ["ok", *_write_share(staging, prepared, tasks, token, c.rank, staged)]
        except Exception as e:
            err: BaseException = e
            if isinstance(e, StorageError) and c.world_size > 1:
                err = _with_cause(storage_error(e, f"saving {storage.url_of(name)} failed on rank {c.rank}"), e)
            own, result = err, failure(c.rank, err)
        may_abort = c.rank == 0
        clock.lap("write")
        results = collective(c.gather, result, "writing")
        verdict: list[Any] | None = None
        if c.rank == 0:
            assert results is not None and layout is not None and staging is not None
            verdict, own0 = _commit(storage, staging, name, step, prepared, layout, results, overwrite)
            may_abort = False  # committed, or aborted by _commit
            own = own or own0
        verdict = collective(c.broadcast, verdict, "committing")
        if verdict[0] != "ok":
            may_abort = c.rank != 0
            raise_failure(verdict, own, c.rank)
        _, created, nbytes, meta = verdict
        clock.lap("commit")
        return Committed(created, nbytes, meta, layout.manifest if layout is not None else None, clock.laps)
    except BaseException:
        if staging is not None and may_abort:
            staging.abort()
        raise


class _PhaseClock:
    """Seconds per phase of a save, measured from one lap to the next."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now


def _with_cause(e: BaseException, cause: BaseException) -> BaseException:
    e.__cause__ = cause
    return e


def _describe(prepared: Prepared) -> list[tuple[Any, ...]]:
    """This rank's leaves as plain values: ``(key path, dtype, shape, global shape | None, offsets | None)``,
    and for a leaf of several blocks a sixth value: ``[(offsets, shape), ...]`` of its blocks after the
    first."""
    if prepared.starts is None:
        common = prepared.arrays[: len(prepared.arrays) - prepared.n_own]
        return [(a.path, a.dtype, a.array.shape, a.global_shape, a.offsets) for a in common]
    out: list[tuple[Any, ...]] = []
    for indices in _blocks_of(prepared)[: prepared.n_leaves - prepared.n_own]:
        a = prepared.arrays[indices[0]]
        more = [(prepared.arrays[i].offsets, prepared.arrays[i].array.shape) for i in indices[1:]]
        out.append((a.path, a.dtype, a.array.shape, a.global_shape, a.offsets, *([more] if more else [])))
    return out


def _own(prepared: Prepared) -> tuple[list[Any], list[tuple[str, tuple[int, ...]]], list[Any]] | None:
    """This rank's per-rank values (``ckptstore.PerRank``), for rank 0: their key paths, the dtype and
    shape of each own array (the last leaves), and each value's skeleton, its references numbering the
    own arrays from 0; None where there are none."""
    if not prepared.survey.per_rank:
        return None
    nodes = per_rank_nodes(prepared.skeleton)
    base = prepared.n_leaves - prepared.n_own
    own = prepared.arrays[len(prepared.arrays) - prepared.n_own :]
    values = [map_refs(node.values[0], lambda ref: TensorRef(ref.index - base)) for _, node in nodes]
    return [path for path, _ in nodes], [(a.dtype, tuple(a.array.shape)) for a in own], values


def _leaf_blocks(leaf: Sequence[Any]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A reported leaf's blocks, ``(offsets, shape)`` each (see :func:`_describe`)."""
    blocks = [(tuple(leaf[4]), tuple(leaf[2]))]
    if len(leaf) > 5:
        blocks.extend((tuple(o), tuple(n)) for o, n in leaf[5])
    return blocks


#: A slot of the manifest's tensor list: (leaf index, offsets of the block or None for a replicated array,
#: shape, dtype, writer rank).
_Slot = tuple[int, tuple[int, ...] | None, tuple[int, ...], str, int]


@dataclasses.dataclass
class _Layout:
    """Rank 0's plan: the manifest's tensor list, slot by slot, and what each leaf became."""

    #: Per slot: see :data:`_Slot`.
    slots: list[_Slot]
    #: Per leaf: a slot (replicated) or the global shape and its blocks' slots (sharded).
    leaves: list[int | tuple[tuple[int, ...], list[int]]]
    #: Every leaf is a replicated array written by rank 0, slot = leaf index: ``slots`` is left empty
    #: and rank 0's tasks are None (a world of one without Shards: nothing to plan).
    in_order: bool = False
    #: The writer token of this save (in the manifest and the data file names).
    token: str = ""
    #: Per rank, the slot of each of its own arrays (``ckptstore.PerRank``), and its per-rank values (see
    #: :func:`_own`); None where the state holds none, or in a world of one (the skeleton says it all).
    own_slots: list[list[int]] | None = None
    own_values: list[list[Any]] | None = None

    manifest: Manifest | None = None

    @property
    def n_slots(self) -> int:
        return len(self.leaves) if self.in_order else len(self.slots)


def _path_text(path: Any) -> str:
    return path if isinstance(path, str) else render_path(path)


def assign(reports: list[list[Any]], own: list[Any] | None = None) -> tuple[_Layout, list[list[list[int]] | None]]:
    """Check the ranks' arrays against each other and give every distinct block, and every replicated
    array, to one rank: blocks held by one rank to it, the rest largest first to the least loaded rank
    that holds them. A leaf may hold several blocks on one rank (a JAX global array: one per distinct block
    on the process's devices), and several ranks may hold one block (replicas): each distinct block is
    written once. Returns the layout and each rank's tasks ``[slot, index of the array in that rank's
    prepared arrays]`` (the leaf index where every leaf is one array; None: every leaf, in order, slot =
    leaf index). ``own``: each rank's per-rank values (:func:`_own`), written by that rank alone.

    Raises:
        ShardingError: the ranks disagree, or an array's blocks overlap, leave a gap or reach outside it.
    """
    world = len(reports)
    first = reports[0]
    for r, rep in enumerate(reports[1:], 1):
        if len(rep) != len(first) or any(a[0] != b[0] for a, b in zip(rep, first)):
            paths0, paths_r = [a[0] for a in first], [a[0] for a in rep]
            diff = sorted(set(paths0) ^ set(paths_r), key=str)[:5] or paths0[:5]
            raise ShardingError(
                f"the ranks' states differ: rank 0 has {len(first)} arrays, rank {r} {len(rep)} "
                f"(paths not on both, or out of order: {[_path_text(p) for p in diff]})"
            )
    load = [0] * world
    # Per rank, the index in its prepared arrays of each leaf's first block.
    bases: list[list[int]] = []
    totals: list[int] = []  # per rank, its arrays that are not its own
    for rep in reports:
        n, base = 0, []
        for leaf in rep:
            base.append(n)
            n += 1 + (len(leaf[5]) if len(leaf) > 5 else 0)
        bases.append(base)
        totals.append(n)
    #: slot -> {rank: index of the array in that rank's prepared arrays}
    sources: dict[int, dict[int, int]] = {}
    slots: list[tuple[int, tuple[int, ...] | None, tuple[int, ...], str, int]] = []
    leaves: list[int | tuple[tuple[int, ...], list[int]]] = []
    shared: list[tuple[int, int, list[int]]] = []  # (nbytes, slot, holders) still to assign
    for i, (key_path, dtype, shape, gshape, *_) in enumerate(first):
        path = _path_text(key_path)
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
            sources[len(slots)] = {r: bases[r][i] for r in range(world)}
            slots.append((i, None, tuple(shape), dtype, -1))
            continue
        holders: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[int, int]] = {}
        for r, rep in enumerate(reports):
            for k, block in enumerate(_leaf_blocks(rep[i])):
                holders.setdefault(block, {})[r] = bases[r][i] + k
        blocks = sorted(holders)
        problem = check_partition(blocks, tuple(gshape))
        if problem is not None:
            raise ShardingError(f"{path}: the ranks' shards of global shape {tuple(gshape)} do not fit: {problem}")
        block_slots = []
        for offsets, bshape in blocks:
            sources[len(slots)] = holders[(offsets, bshape)]
            owners = sorted(sources[len(slots)])
            nbytes = math.prod(bshape) * itemsize
            if len(owners) == 1:
                load[owners[0]] += nbytes
                slots.append((i, offsets, bshape, dtype, owners[0]))
            else:
                shared.append((nbytes, len(slots), owners))
                slots.append((i, offsets, bshape, dtype, -1))
            block_slots.append(len(slots) - 1)
        leaves.append((tuple(gshape), block_slots))
    own_slots = _own_slots(own, totals, slots, sources, load) if own is not None and any(own) else None
    for nbytes, slot, owners in sorted(shared, key=lambda s: (-s[0], s[1])):
        writer = min(owners, key=lambda r: (load[r], r))
        load[writer] += nbytes
        leaf, where, shape, dtype, _ = slots[slot]
        slots[slot] = (leaf, where, shape, dtype, writer)
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    for slot, (_, _, _, _, writer) in enumerate(slots):
        per_rank[writer].append([slot, sources[slot][writer]])
    tasks: list[list[list[int]] | None] = list(per_rank)
    own_values = None if own_slots is None or own is None else [o[2] if o else [] for o in own]
    return _Layout(slots, leaves, own_slots=own_slots, own_values=own_values), tasks


def _own_slots(
    own: list[Any], totals: list[int], slots: list[_Slot], sources: dict[int, dict[int, int]], load: list[int]
) -> list[list[int]]:
    """A slot for each rank's own arrays, written by that rank (see :func:`assign`); the ranks must hold
    per-rank values at the same key paths."""
    paths = own[0][0] if own[0] else []
    for r, o in enumerate(own[1:], 1):
        theirs = o[0] if o else []
        if theirs != paths:
            raise ShardingError(
                f"the ranks hold per-rank values (PerRank) at different places: rank 0 at "
                f"{[render_path(p) for p in paths][:5]}, rank {r} at {[render_path(p) for p in theirs][:5]}"
            )
    out: list[list[int]] = []
    for r, (_, arrays, _) in enumerate(own):
        out.append([])
        for k, (dtype, shape) in enumerate(arrays):
            out[r].append(len(slots))
            sources[len(slots)] = {r: totals[r] + k}
            load[r] += math.prod(shape) * _itemsize(dtype)
            slots.append((-1, None, tuple(shape), dtype, r))
    return out


def _assign_one(prepared: Prepared) -> tuple[_Layout, list[list[list[int]] | None]]:
    """:func:`assign` for a world of one: everything to rank 0, in order; a Shard must cover its array."""
    arrays = prepared.arrays
    if all(a.global_shape is None for a in arrays):  # the common case, kept cheap for 100,000 small arrays
        return _Layout([], list(range(len(arrays))), in_order=True), [None]
    slots: list[_Slot] = []
    leaves: list[int | tuple[tuple[int, ...], list[int]]] = []
    tasks: list[list[int]] = []
    for indices in _blocks_of(prepared):
        a = arrays[indices[0]]
        i = len(leaves)
        if a.global_shape is None or a.offsets is None:
            leaves.append(len(slots))
            tasks.append([len(slots), indices[0]])
            slots.append((i, None, tuple(a.array.shape), a.dtype, 0))
            continue
        gshape = tuple(a.global_shape)
        blocks = [(tuple(arrays[k].offsets or ()), tuple(arrays[k].array.shape)) for k in indices]
        problem = check_partition(blocks, gshape)
        if problem is not None:
            raise ShardingError(
                f"{render_path(a.path)}: the shards of global shape {gshape} do not fit: {problem} (a save by "
                "one process of arrays spread over several needs every process, with their coordinator)"
            )
        leaves.append((gshape, list(range(len(slots), len(slots) + len(blocks)))))
        for k, (offsets, shape) in zip(indices, blocks):
            tasks.append([len(slots), k])
            slots.append((i, offsets, shape, a.dtype, 0))
    return _Layout(slots, leaves), [tasks]


def _check_visible(storage: Storage, staging: Staging, files: list[FileEntry], results: list[Any]) -> None:
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
    return int(dtype_of(code).itemsize)


def _plan(
    storage: Storage, name: str, reports: list[Any], overwrite: bool, world: int
) -> tuple[list[Any], _Layout | None, Staging | None, BaseException | None]:
    """Rank 0: the orders for every rank, the layout, and the staging (or the failure for all)."""
    failed = next((r for r in reports if r[0] != "ok"), None)
    if failed is not None:
        return [failed] * world, None, None, None
    try:
        names = [r[2] for r in reports]
        if len(set(names)) > 1:
            raise DistributedError(f"the ranks save different steps: {', '.join(sorted(set(names)))}")
        if world > 1:
            layout, tasks = assign([r[1] for r in reports], [r[3] for r in reports])
        else:
            layout, tasks = _assign_one(reports[0][1])
        ensure_free(storage, name, overwrite)
        layout.token = token = new_token()
        staging = storage.begin(name, token)
    except Exception as e:
        return [failure(-1, e)] * world, None, None, e
    return [["ok", token, t] for t in tasks], layout, staging, None


def _write_share(
    staging: Staging, prepared: Prepared, tasks: list[list[int]] | None, token: str, rank: int, staged: bool
) -> tuple[list[list[Any]], list[tuple[int, TensorEntry]]]:
    """Write this rank's arrays into its own files; return their names and sizes, and each array's slot
    with its tensor entry (``file``: the index among this rank's files)."""
    leaves = prepared.arrays if tasks is None else [prepared.arrays[leaf] for _, leaf in tasks]
    names = tensorio.tensor_names(leaves)
    #: The name of each sharded leaf's first block here, by its key path (the blocks of one JAX array share
    #: that very object; ``#2`` is for another leaf whose path renders alike, not for a second block).
    first: dict[int, str] = {}
    for k, a in enumerate(leaves):
        if a.offsets is not None:  # blocks of one array are told apart by their offsets
            names[k] = first.setdefault(id(a.path), names[k]) + "@" + ",".join(map(str, a.offsets))
    check_intact(leaves)  # a failure before anything is written costs nothing
    staged = staged and knobs.current.staged_writes  # decided here, once, for the plan and every file
    by_phase = knobs.current.direct_writes and staging.storage.local_files and not staged  # each at its page offset
    plans = tensorio.plan_files(leaves, f"tensors-{token}-r{rank:05d}", knobs.current.max_file_bytes, by_phase=by_phase)
    files: list[list[Any]] = []
    entries: list[tuple[int, TensorEntry]] = []
    fills = [
        (plan.name, functools.partial(_write_file, leaves, names, plan, k, staged)) for k, plan in enumerate(plans)
    ]
    for plan, (size, written) in zip(plans, staging.write_all(fills)):  # all durable once it returns
        files.append([plan.name, size])
        slot_of = plan.indices if tasks is None else [tasks[i][0] for i in plan.indices]
        entries.extend(zip(slot_of, written))
    check_intact(leaves)
    return files, entries


def check_intact(leaves: Sequence[ArrayLeaf]) -> None:
    """Raise ArrayDeletedError if an array written from its framework's own buffer (``ArrayLeaf.intact``) is
    no longer that array's: what was written may not be what the array held."""
    for leaf in leaves:
        if leaf.intact is not None and not leaf.intact():
            raise ArrayDeletedError(
                f"{render_path(leaf.path)} was deleted or donated to a computation while a background save "
                "wrote it (a JAX array is saved without a copy): keep it until the save's handle is done, "
                "or save with blocking=True"
            )


def _write_file(
    arrays: Sequence[ArrayLeaf], names: Sequence[str], plan: tensorio.FilePlan, k: int, staged: bool, f: BinaryIO
) -> tuple[int, list[TensorEntry]]:
    return tensorio.write_file(f, arrays, names, plan, k, staged=staged)


def _commit(
    storage: Storage,
    staging: Staging,
    name: str,
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
        files: list[FileEntry] = []
        slots: list[TensorEntry | None] = [None] * layout.n_slots
        others: list[str] = []
        for rank, (_, rank_files, rank_entries) in enumerate(results):
            base = len(files)
            files.extend(FileEntry(n, s) for n, s in rank_files)
            if rank:
                others.extend(n for n, _ in rank_files)
            for slot, e in rank_entries:
                slots[slot] = dataclasses.replace(e, file=base + e.file) if base else e
        if any(s is None for s in slots):
            raise DistributedError(f"{sum(s is None for s in slots)} arrays were written by no rank")
        if len(results) > 1:
            _check_visible(storage, staging, files, results)
            staging.adopt(others)
        per_rank = prepared.survey.per_rank
        m = Manifest(
            step=step,
            created=time.time(),
            writer=layout.token,
            metadata=prepared.metadata,
            tree=_tree(prepared, layout),
            files=tuple(files),
            tensors=tuple(s for s in slots if s is not None),
            version=2 if per_rank else 1,
        )
        survey = prepared.survey
        if per_rank and len(results) > 1:  # the other ranks' values are in the tree now
            survey = manifest.survey(m.tree) + manifest.survey(m.metadata)
    except Exception as e:
        staging.abort()
        return failure(-1, e), e
    try:
        commit_manifest(storage, staging, name, m, overwrite=overwrite, survey=survey)
    except Exception as e:
        return failure(0, e), e
    layout.manifest = m
    return ["ok", m.created, sum(f.size for f in files), m.metadata], None


def _tree(prepared: Prepared, layout: _Layout) -> Any:
    """The skeleton with each leaf's reference pointing at its slot (or blocks) in the tensor list."""
    if layout.in_order:
        return prepared.skeleton  # every array replicated, in order: the references are right already

    def ref(node: Any) -> Any:
        leaf = layout.leaves[node.index]
        if isinstance(leaf, int):
            return TensorRef(leaf)
        gshape, block_slots = leaf
        first = node.index if prepared.starts is None else prepared.starts[node.index]
        dtype = layout.slots[block_slots[0]][3] if block_slots else prepared.arrays[first].dtype
        return ShardedRef(gshape, dtype, tuple((s, layout.slots[s][1] or ()) for s in block_slots))

    if layout.own_slots is None or layout.own_values is None:
        return map_refs(prepared.skeleton, ref)
    # Every rank's per-rank values, their references pointing at the slots of that rank's own arrays.
    own_slots, own_values = layout.own_slots, layout.own_values
    assembled = iter(
        [
            PerRankValues(
                tuple(
                    map_refs(values[k], functools.partial(_own_ref, own_slots[r]))
                    for r, values in enumerate(own_values)
                )
            )
            for k in range(len(own_values[0]))
        ]
    )
    return map_refs(prepared.skeleton, ref, lambda _: next(assembled))


def _own_ref(slots: list[int], ref: TensorRef) -> TensorRef:
    return TensorRef(slots[ref.index])


def commit_manifest(
    storage: Storage, staging: Staging, name: str, m: Manifest, *, overwrite: bool, survey: manifest.Survey
) -> None:
    """Encode ``m`` and publish it as the commit of ``staging`` (the one place a manifest is written).
    ``survey`` is its tree's and metadata's: a manifest that a reader would refuse is never published.

    On failure the staging is aborted; a StorageError then says what the save left: the failure may
    come after the checkpoint was published (a sync of the root, a lost response).
    """
    data = manifest.encode(m)
    refused = None
    if len(data) > knobs.current.max_manifest_bytes:  # published, it could never be read back
        refused = (
            f"would take {len(data)} bytes, more than a reader accepts "
            f"(knobs.max_manifest_bytes = {knobs.current.max_manifest_bytes})"
        )
    elif not survey.within_budget(data):  # (rare: a tree of many tiny containers) decoded to know for sure
        try:
            manifest.decode(data)
        except CorruptCheckpointError as e:
            refused = f"would be refused by every reader ({str(e).removeprefix('manifest: ')})"
    if refused:
        staging.abort()
        raise UnsupportedTypeError(f"the manifest of {storage.url_of(name)} {refused}; nothing was committed")
    try:
        staging.commit(data, overwrite=overwrite)
    except StorageError as e:
        staging.abort()
        raise storage_error(e, f"saving {storage.url_of(name)} failed; {_outcome(storage, name)}") from e
    except BaseException:
        staging.abort()
        raise


def _outcome(storage: Storage, name: str) -> str:
    """What a failed save left, in words."""
    try:
        committed = storage.is_committed(name)
    except Exception:
        return "it may or may not be committed (check with CheckpointStore.verify)"
    if committed:
        return "it is committed all the same (its data was complete before it was published)"
    return "nothing was committed"
