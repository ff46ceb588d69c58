"""Phantom-parallel modules, sharding plans, and conversion between dense FFNs and their shards (torch only)."""

from lightning_phantom.nn.convert import gather_shards, merge_shards, to_dense, to_phantom
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, set_group, sharded_parameters,
)

__all__ = [
    "ColumnParallelLinear", "PhantomFFN", "PhantomLinear", "RowParallelLinear", "set_group", "sharded_parameters",
    "gather_shards", "merge_shards", "to_dense", "to_phantom",
]
