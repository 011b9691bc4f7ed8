"""Block geometry: a global array cut into rectangular blocks, each given by the offsets of its first
element and its shape. Pure functions, shared by the manifest's validation, the save planner and the
block reader."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Dims", "check_partition", "intersect"]

Dims = tuple[int, ...]


def intersect(a_off: Dims, a_shape: Dims, b_off: Dims, b_shape: Dims) -> tuple[Dims, Dims] | None:
    """The common block of two blocks as ``(offsets, shape)``, or None if they share no element."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def check_partition(blocks: Sequence[tuple[Dims, Dims]], global_shape: Dims) -> str | None:
    """Why the blocks ``(offsets, shape)`` are not an exact partition of ``global_shape`` (every block
    inside it, no two sharing an element, all of them covering it), or None if they are one."""
    ndim = len(global_shape)
    total = 0
    for off, shape in blocks:
        if len(off) != ndim or len(shape) != ndim:
            return f"block at {off} of shape {shape} has not {ndim} dimensions"
        if any(o + n > g for o, n, g in zip(off, shape, global_shape)):
            return f"block at {off} of shape {shape} reaches outside the global shape {global_shape}"
        total += math.prod(shape)
    # Sweep along dimension 0: only blocks whose row ranges meet can overlap, so sorted row-sharded
    # arrays cost n log n, not n^2.
    live = sorted((c for c in blocks if math.prod(c[1])), key=lambda c: c[0][0] if ndim else 0)
    for i, (off, shape) in enumerate(live):
        end0 = off[0] + shape[0] if ndim else 1
        for off2, shape2 in live[i + 1 :]:
            if ndim and off2[0] >= end0:
                break
            if intersect(off, shape, off2, shape2) is not None:
                return f"blocks at {off} (shape {shape}) and {off2} (shape {shape2}) overlap"
    if total != math.prod(global_shape):
        return f"the blocks hold {total} elements, the global shape {global_shape} has {math.prod(global_shape)}"
    return None
