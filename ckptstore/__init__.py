"""ckptstore: a framework-agnostic checkpoint state store.

Tensors go into safetensors files, everything else into a msgpack manifest, inside atomic, versioned step
directories on any fsspec filesystem. Importing ckptstore imports no ML framework.
"""

from __future__ import annotations

from . import distributed, errors, knobs
from .api import restore, save
from .rng import RNGState
from .shard import Shard
from .store import CheckpointInfo, CheckpointStore

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "RNGState",
    "Shard",
    "distributed",
    "errors",
    "knobs",
    "restore",
    "save",
]
__version__ = "0.1.0"
