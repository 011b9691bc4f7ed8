"""Sharded arrays: :class:`Shard` (one process's block of a global array), block geometry, and the bridges
to torch's DTensor and to JAX's global arrays (a ``jax.Array`` over devices of several processes).

A global array of shape ``global_shape`` is cut into rectangular blocks; a rank holds the block whose
first element sits at ``offsets``. Blocks of one array must not overlap and, together, cover it (identical
blocks held by several ranks, as a DTensor replicated over one mesh dimension has them, count once).
This module imports no ML framework: DTensors and JAX arrays are recognised by their type's module name,
torch is imported only when a DTensor is met, and JAX arrays are only asked for their shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .blocks import Dims
from .errors import ShardingError, UnsupportedTypeError

__all__ = ["PerRank", "Shard", "is_dtensor", "is_global_jax"]


@dataclasses.dataclass(frozen=True)
class PerRank:
    """A value each rank of a job saves as its own: a data loader's position, a rank's RNG state, its
    sampler. Saved, every rank's value is kept (rank r's written by rank r; the ranks' values need not
    have the same structure); restored on the same number of ranks, each rank gets back its own.

    Restored on another number of ranks, the saved values do not say what each new rank should get:
    without ``reshard`` the restore raises :class:`~ckptstore.errors.WorldSizeError`. With it, the
    restore calls ``reshard(saved, rank, world_size)``, ``saved`` holding every saved rank's value in rank
    order (arrays as NumPy arrays, or in the restore's ``framework``), and puts what it returns in this
    rank's state: loaded into ``value`` when that is an object with ``load_state_dict`` (returned itself),
    else returned as it is.

    In ``like``, ``PerRank(x)`` and ``x`` restore alike on the same number of ranks (``x`` is the
    template); a ``PerRank`` template of a value the checkpoint holds plainly (saved before it was
    per-rank) restores that value into ``x`` on every rank.

    Args:
        value: this rank's value: any state ckptstore saves (containers, arrays, plain values, objects
            with ``state_dict()``), but no :class:`Shard` or other block of a global array.
        reshard: for restores on another number of ranks (see above); unused by saves.

    Example::

        state = {"model": model, "loader": ckptstore.PerRank(loader)}  # a StatefulDataLoader per rank
        store.save(step, state)
        store.restore(like=state)  # each rank's loader continues where it was
    """

    value: Any
    reshard: Callable[[list[Any], int, int], Any] | None = None


def _dims(value: Any, what: str) -> Dims:
    try:
        dims = tuple(value)
    except TypeError:
        raise ShardingError(f"{what} must be a sequence of ints, got {value!r}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ShardingError(f"{what} must hold non-negative ints, got {value!r}")
    return tuple(int(d) for d in dims)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's block of a global array: ``local`` holds ``global[offsets[0]:offsets[0]+n0, ...]``.

    Save a state whose leaves are Shards from every rank of a job and the checkpoint holds the global
    arrays; restore with ``like=`` leaves that are Shards of *any* partition (another number of ranks,
    another split) and each rank gets a Shard of the same block as its template, read from storage.

    Args:
        local: the block, an array of any supported framework (numpy, torch, jax, ...).
        global_shape: the shape of the whole array.
        offsets: the index of the block's first element in the global array.

    Raises:
        ShardingError: the block does not fit inside ``global_shape``, or the ranks disagree.

    Example::

        rows = slice(rank * 512, (rank + 1) * 512)
        state = {"w": ckptstore.Shard(w_full[rows], (1024, 256), (rows.start, 0))}
    """

    local: Any
    global_shape: Dims
    offsets: Dims

    def __post_init__(self) -> None:
        shape = getattr(self.local, "shape", None)
        if shape is None:
            raise ShardingError(f"Shard.local must be an array, got a {type(self.local).__name__}")
        local_shape = _dims(shape, "Shard.local.shape")
        gshape = _dims(self.global_shape, "Shard.global_shape")
        offsets = _dims(self.offsets, "Shard.offsets")
        if not len(local_shape) == len(gshape) == len(offsets):
            raise ShardingError(
                f"Shard of local shape {local_shape}, global shape {gshape} and offsets {offsets}: "
                "all three must have as many dimensions as the array"
            )
        if any(o + n > g for o, n, g in zip(offsets, local_shape, gshape)):
            raise ShardingError(
                f"Shard of shape {local_shape} at offsets {offsets} reaches outside the global shape {gshape}"
            )
        object.__setattr__(self, "global_shape", gshape)
        object.__setattr__(self, "offsets", offsets)

    @property
    def local_shape(self) -> Dims:
        """The shape of the block."""
        return tuple(int(d) for d in self.local.shape)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Where the block lies in the global array: ``full[shard.slices]`` is ``shard.local``."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.local_shape))


# --- torch DTensor ----------------------------------------------------------------------------------


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a torch DTensor (checked by type name: never imports torch)."""
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in type(x).__mro__[:-1])


def dtensor_block(x: Any) -> tuple[Dims, Dims, bool]:
    """``(offsets, local shape, replicated)`` of this rank's block of a DTensor.

    Raises:
        UnsupportedTypeError: a placement other than Shard(dim) or Replicate (Partial sums, strided
            shards), which has no single block to save.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as TorchShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in x.placements:
        if type(p) is not TorchShard and type(p) is not Replicate:
            raise UnsupportedTypeError(
                f"DTensor placement {p} is not supported (only Shard(dim) and Replicate); "
                "redistribute it first (e.g. dtensor.redistribute(placements=[Replicate()]))"
            )
    shape, offsets = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    replicated = all(type(p) is Replicate for p in x.placements)
    return tuple(int(o) for o in offsets), tuple(int(n) for n in shape), replicated


def from_dtensor(x: Any) -> Any:
    """A DTensor as what ckptstore saves: a :class:`Shard` of its local tensor, or the local tensor itself
    when every placement is Replicate (a replicated array)."""
    offsets, shape, replicated = dtensor_block(x)
    local = x.to_local()
    if replicated:
        return local
    if tuple(local.shape) != shape:
        raise ShardingError(f"DTensor's local tensor has shape {tuple(local.shape)}, its placements say {shape}")
    return Shard(local, tuple(int(d) for d in x.shape), offsets)


def dtensor_like(template: Any, local: Any) -> Any:
    """A DTensor on ``template``'s mesh and placements whose local tensor is ``local`` (no communication)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        template.device_mesh,
        template.placements,
        run_check=False,
        shape=template.shape,
        stride=template.stride(),
    )


# --- JAX global arrays ----------------------------------------------------------------------------------


def is_global_jax(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` whose devices belong to several processes (``jax.distributed``):
    recognised by its type's module name, never importing jax."""
    return type(x).__module__.partition(".")[0] == "jaxlib" and getattr(x, "is_fully_addressable", True) is False


def from_global_jax(x: Any) -> Any | list[Shard]:
    """A JAX global array as what this process saves: its distinct addressable blocks as :class:`Shard` s
    of single-device arrays, in offsets order (replicas on several of its devices count once), or, where
    every device holds the whole array (fully replicated), one device's copy, a plain array."""
    if x.sharding.is_fully_replicated:
        return x.addressable_data(0)
    gshape = tuple(int(d) for d in x.shape)
    distinct: dict[Dims, Shard] = {}
    for s in x.addressable_shards:
        offsets = tuple(int(sl.start or 0) for sl in s.index)
        if offsets not in distinct:  # replicas of a block on several local devices: one of them
            distinct[offsets] = Shard(s.data, gshape, offsets)
    return [distinct[o] for o in sorted(distinct)]
