"""ckptstore: a framework-agnostic checkpoint state store.

Tensors go into safetensors files, everything else into a msgpack manifest, inside atomic, versioned step
directories on any fsspec filesystem. Importing ckptstore imports no ML framework.
"""

from __future__ import annotations

from . import distributed, errors, knobs
from .directory import restore, save
from .export import export_hf
from .leases import Lease, pin
from .rng import RNGState
from .shard import PerRank, Shard
from .store import CheckpointInfo, CheckpointStore
from .tree import MISSING
from .watch import checkpoints_iterator, wait_for_new_checkpoint

__all__ = [
    "MISSING",
    "CheckpointInfo",
    "CheckpointStore",
    "Lease",
    "PerRank",
    "RNGState",
    "Shard",
    "checkpoints_iterator",
    "distributed",
    "errors",
    "export_hf",
    "knobs",
    "pin",
    "restore",
    "save",
    "wait_for_new_checkpoint",
]
__version__ = "0.1.0"
