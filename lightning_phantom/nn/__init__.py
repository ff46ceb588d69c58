"""Phantom-parallel modules, sharding plans, and conversion between dense FFNs and their shards (torch only)."""

from lightning_phantom.nn.convert import gather_shards, merge_shards, to_dense, to_phantom
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, set_group, sharded_buffers,
    sharded_parameters,
)
from lightning_phantom.nn.norms import PhantomBatchNorm1d, PhantomLayerNorm, PhantomRMSNorm

__all__ = [
    "ColumnParallelLinear", "PhantomFFN", "PhantomLinear", "RowParallelLinear", "set_group", "sharded_buffers",
    "sharded_parameters", "PhantomBatchNorm1d", "PhantomLayerNorm", "PhantomRMSNorm",
    "gather_shards", "merge_shards", "to_dense", "to_phantom",
]
