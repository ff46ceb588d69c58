"""Phantom-parallel modules, sharding plans, and conversion between dense models and their shards (torch only)."""

from lightning_phantom.nn.attention import PhantomSelfAttention
from lightning_phantom.nn.convert import gather_shards, merge_shards, to_dense, to_phantom
from lightning_phantom.nn.convert_transformer import to_phantom_stack  # also registers stacks with nn.convert
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, set_group, sharded_buffers,
    sharded_parameters,
)
from lightning_phantom.nn.norms import PhantomBatchNorm1d, PhantomLayerNorm, PhantomRMSNorm
from lightning_phantom.nn.transformer import PhantomTransformerEncoder, PhantomTransformerEncoderLayer
from lightning_phantom.nn import transformer_architecture  # noqa: F401 - registers stacks' records

__all__ = [
    "ColumnParallelLinear", "PhantomFFN", "PhantomLinear", "RowParallelLinear", "set_group", "sharded_buffers",
    "sharded_parameters", "PhantomBatchNorm1d", "PhantomLayerNorm", "PhantomRMSNorm",
    "PhantomSelfAttention", "PhantomTransformerEncoder", "PhantomTransformerEncoderLayer",
    "gather_shards", "merge_shards", "to_dense", "to_phantom", "to_phantom_stack",
]
