"""Block geometry: a global array cut into rectangular blocks, each given by the offsets of its first
element and its shape. Pure functions, shared by the manifest's validation, the save planner and the
block reader."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence

__all__ = ["Dims", "check_partition", "intersect"]

Dims = tuple[int, ...]

#: Blocks that differ from the global array in at most this many dimensions are checked by their corners
#: (linear time); beyond, by a sweep that gives up after :data:`MAX_PAIRS` pairs of blocks.
MAX_CORNER_DIMS = 6
#: Pairs of blocks the sweep compares at most before it gives up (a few tenths of a second).
MAX_PAIRS = 100_000


def intersect(a_off: Dims, a_shape: Dims, b_off: Dims, b_shape: Dims) -> tuple[Dims, Dims] | None:
    """The common block of two blocks as ``(offsets, shape)``, or None if they share no element."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def check_partition(blocks: Sequence[tuple[Dims, Dims]], global_shape: Dims) -> str | None:
    """Why the blocks ``(offsets, shape)`` are not an exact partition of ``global_shape`` (every block
    inside it, no two sharing an element, all of them covering it), or None if they are one.

    n log n in the number of blocks for grids (how meshes shard), and linear after a sort for any blocks
    that differ from the global array in at most :data:`MAX_CORNER_DIMS` dimensions: a crafted list of
    blocks cannot make it slow (a sweep over pairs of blocks took quadratic time: 3000 blocks in one row,
    15 s). Beyond that, a sweep over pairs, which refuses a partition it cannot check within
    :data:`MAX_PAIRS` pairs of blocks. Sorting only, or dicts keyed by bytes: no set or dict of tuples of
    ints, whose hashes a crafted list could make collide."""
    ndim = len(global_shape)
    total = 0
    live: list[tuple[Dims, Dims]] = []  # blocks holding elements (an empty block may lie anywhere inside)
    for off, shape in blocks:
        if len(off) != ndim or len(shape) != ndim:
            return f"block at {off} of shape {shape} has not {ndim} dimensions"
        if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(off, shape, global_shape)):
            return f"block at {off} of shape {shape} reaches outside the global shape {global_shape}"
        size = math.prod(shape)
        total += size
        if size:
            live.append((off, shape))
    expected = math.prod(global_shape)
    axis = _sweep_axis(live, ndim)
    if total == expected:  # then the blocks tile the array iff no two share an element
        if _grid(live, global_shape):
            return None
        suspects = _corner_residue(live, global_shape, axis)
        if suspects is not None:
            if not suspects:
                return None
            pair = _covering_pair(live, suspects)
            if pair is None:  # the first elements covered wrongly are not covered at all: overlaps lie elsewhere
                return (
                    f"the blocks overlap: their elements add up to the global shape {global_shape}, but the "
                    f"element at {suspects[0]} is in none of them"
                )
            return _overlap_message(pair)
    found = _overlap(live, axis)
    if isinstance(found, tuple):
        return _overlap_message(found)
    if total != expected:
        return f"the blocks hold {total} elements, the global shape {global_shape} has {expected}"
    if found is None:  # the right number of elements, no two blocks sharing one: a partition
        return None
    return (
        f"{len(live)} blocks differing in more than {MAX_CORNER_DIMS} dimensions are more than can be "
        f"checked (over {MAX_PAIRS} pairs of them share rows)"
    )


def _overlap_message(pair: tuple[tuple[Dims, Dims], tuple[Dims, Dims]]) -> str:
    (off, shape), (off2, shape2) = pair
    return f"blocks at {off} (shape {shape}) and {off2} (shape {shape2}) overlap"


def _sweep_axis(live: list[tuple[Dims, Dims]], ndim: int) -> int | None:
    """The dimension along which the blocks start at the most distinct offsets (None for 0-d arrays): the
    one to sweep along, where the fewest blocks are open at once. (Sets of offsets below 2**63 are safe from
    crafted hash collisions: at most 9 such ints share a hash.)"""
    if ndim == 0 or not live:
        return None
    spread = [len({off[k] for off, _ in live}) for k in range(ndim)]
    return spread.index(max(spread))


def _grid(live: list[tuple[Dims, Dims]], global_shape: Dims) -> bool:
    """Whether the blocks are exactly the cells of a grid (each dimension cut into ranges, a block for each
    combination): how meshes shard arrays, checked in n log n whatever the number of dimensions. Sorting
    only: no set or dict of tuples of ints, whose hashes a crafted list could make collide."""
    if not live:
        return False
    cells = 1
    for k, g in enumerate(global_shape):
        ranges = sorted((off[k], off[k] + shape[k]) for off, shape in live)
        distinct = [r for i, r in enumerate(ranges) if i == 0 or r != ranges[i - 1]]
        if distinct[0][0] != 0 or distinct[-1][1] != g:
            return False
        if any(a[1] != b[0] for a, b in itertools.pairwise(distinct)):
            return False
        cells *= len(distinct)
        if cells > len(live):
            return False
    if cells != len(live):
        return False
    ordered = sorted(live)
    return all(a != b for a, b in itertools.pairwise(ordered))


def _corner_residue(live: list[tuple[Dims, Dims]], global_shape: Dims, axis: int | None) -> list[Dims] | None:
    """The elements where the blocks' cover goes wrong first: none iff the blocks cover every element of
    the global array exactly once. None when they differ from it in more than :data:`MAX_CORNER_DIMS`
    dimensions (this way costs ``2**dims`` per block).

    The indicator function of a block ``[lo, hi)`` is the signed sum of the orthants ``x >= c`` at its
    ``2**d`` corners ``c`` (sign ``-1`` per coordinate taken from ``hi``), and orthants at distinct points
    are linearly independent: the blocks tile the array exactly iff their signed corners, summed point by
    point, leave the array's own corners and nothing else. Where points are left, the smallest (in
    lexicographic order) is an element covered ``1 + sum`` times: an overlap, or a gap. Points are dict
    keys as bytes (whose hash is randomized), never tuples of ints, whose hashes a crafted list could make
    collide."""
    if not live:
        return []  # no elements, and none wanted (the caller compared the totals)
    vary = sorted(
        {k for off, shape in live for k, (o, n, g) in enumerate(zip(off, shape, global_shape)) if o or n != g}
    )
    if len(vary) > MAX_CORNER_DIMS or max((global_shape[k] for k in vary), default=0) >= 1 << 63:
        return None
    layout = struct.Struct(f"<{len(vary)}q")
    signs = [-1 if bin(i).count("1") % 2 else 1 for i in range(1 << len(vary))]
    counts: dict[bytes, int] = {}

    def add(corners: list[tuple[int, int]], sign: int) -> None:
        for s, point in zip(signs, itertools.product(*corners)):
            key = layout.pack(*point)
            c = counts.pop(key, 0) + s * sign
            if c:
                counts[key] = c

    # In offset order along the sweep axis, the corners cancel as the sweep goes: few are kept at a time.
    for off, shape in sorted(live, key=lambda b: b[0][axis]) if axis is not None else live:
        add([(off[k], off[k] + shape[k]) for k in vary], 1)
    add([(0, global_shape[k]) for k in vary], -1)
    suspects = []
    for point in sorted(layout.unpack(key) for key in counts)[:8]:
        full = [0] * len(global_shape)
        for k, x in zip(vary, point):
            full[k] = x
        suspects.append(tuple(full))
    return suspects


def _covering_pair(
    live: list[tuple[Dims, Dims]], points: list[Dims]
) -> tuple[tuple[Dims, Dims], tuple[Dims, Dims]] | None:
    """Two blocks that both hold one of ``points`` (each point: one pass over the blocks), or None."""
    for point in points:
        holding = [(off, shape) for off, shape in live if all(o <= x < o + n for o, n, x in zip(off, shape, point))]
        if len(holding) > 1:
            return holding[0], holding[1]
    return None


_GAVE_UP = object()


def _overlap(
    live: list[tuple[Dims, Dims]], axis: int | None
) -> tuple[tuple[Dims, Dims], tuple[Dims, Dims]] | object | None:
    """Two blocks that share an element, None if no two do, or ``_GAVE_UP`` after :data:`MAX_PAIRS` pairs.

    A sweep along ``axis``: only blocks whose ranges along it meet can overlap, so blocks cut along that
    axis cost n log n; blocks that share a range are compared pair by pair."""
    ordered = sorted(live, key=lambda c: c[0][axis]) if axis is not None else live
    pairs = 0
    for i, (off, shape) in enumerate(ordered):
        end = off[axis] + shape[axis] if axis is not None else 1
        for j in range(i + 1, len(ordered)):
            off2, shape2 = ordered[j]
            if axis is not None and off2[axis] >= end:
                break
            pairs += 1
            if pairs > MAX_PAIRS:
                return _GAVE_UP
            if intersect(off, shape, off2, shape2) is not None:
                return (off, shape), (off2, shape2)
    return None


def read_regions(blocks: Sequence[tuple[Dims, Dims]]) -> list[tuple[Dims, Dims]]:
    """What to read for ``blocks`` ``(offsets, shape)`` (distinct and not overlapping, as a sharding's
    blocks are): their bounding box when they fill it exactly (one read: a stored block that several of
    them overlap is fetched, and verified, once), else the blocks themselves."""
    if len(blocks) < 2:
        return list(blocks)
    ndim = len(blocks[0][0])
    lo = tuple(min(off[k] for off, _ in blocks) for k in range(ndim))
    hi = tuple(max(off[k] + shape[k] for off, shape in blocks) for k in range(ndim))
    box = tuple(h - low for low, h in zip(lo, hi))
    if sum(math.prod(shape) for _, shape in blocks) == math.prod(box):
        return [(lo, box)]
    return list(blocks)
