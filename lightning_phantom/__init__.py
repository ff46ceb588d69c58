"""Phantom parallelism for PyTorch Lightning.

``import lightning_phantom`` registers ``strategy="phantom"`` with Lightning.
"""

from lightning_phantom.checkpoints import reshard_checkpoint
from lightning_phantom.comm import copy_to_phantom, gather_ghosts, reduce_from_phantom
from lightning_phantom.energy import EnergyMonitor
from lightning_phantom.convert import gather_shards, merge_shards, to_dense, to_phantom
from lightning_phantom.guards import NonFiniteError, NonFiniteGuard
from lightning_phantom.strategy import PhantomStrategy
from lightning_phantom.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, set_group, sharded_parameters,
)

__all__ = [
    "PhantomStrategy",
    "EnergyMonitor",
    "ColumnParallelLinear", "PhantomFFN", "PhantomLinear", "RowParallelLinear", "set_group", "sharded_parameters",
    "copy_to_phantom", "gather_ghosts", "reduce_from_phantom",
    "gather_shards", "merge_shards", "to_dense", "to_phantom",
    "NonFiniteError", "NonFiniteGuard", "reshard_checkpoint",
]
__version__ = "0.1.0"
