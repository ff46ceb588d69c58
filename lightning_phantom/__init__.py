"""Phantom parallelism for PyTorch Lightning.

``import lightning_phantom`` registers ``strategy="phantom"`` with Lightning.
"""

from lightning_phantom.energy import EnergyMonitor
from lightning_phantom.nn import (
    ColumnParallelLinear, PhantomBatchNorm1d, PhantomFFN, PhantomLayerNorm, PhantomLinear, PhantomRMSNorm,
    RowParallelLinear, gather_shards, merge_shards, set_group, sharded_parameters, to_dense, to_phantom,
)
from lightning_phantom.strategy import NonFiniteError, NonFiniteGuard, PhantomStrategy, reshard_checkpoint

__all__ = [
    "PhantomStrategy",
    "EnergyMonitor",
    "ColumnParallelLinear", "PhantomFFN", "PhantomLinear", "RowParallelLinear", "set_group", "sharded_parameters",
    "PhantomLayerNorm", "PhantomRMSNorm", "PhantomBatchNorm1d",
    "gather_shards", "merge_shards", "to_dense", "to_phantom",
    "NonFiniteError", "NonFiniteGuard", "reshard_checkpoint",
]
__version__ = "0.1.0"
