"""Phantom parallelism for PyTorch Lightning.

``import lightning_phantom`` registers ``strategy="phantom"`` with Lightning. The top level
holds what a user of the strategy needs; the rest is reachable from the subpackages, one
per layer: ``ops`` (collectives, the fused operator), ``nn`` (layers, conversion, plans),
``cost`` (cost model, counters), ``strategy``, ``energy`` and ``app`` (the Hydra CLI).
"""

from lightning_phantom.energy import EnergyMonitor
from lightning_phantom.nn import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, PhantomSelfAttention, PhantomTransformerEncoder,
    PhantomTransformerEncoderLayer, RowParallelLinear, merge_shards, to_dense, to_phantom,
)
from lightning_phantom.nn.plan import FFNPlan, PhantomPlan
from lightning_phantom.strategy import NonFiniteError, NonFiniteGuard, PhantomStrategy, reshard_checkpoint

__all__ = [
    "PhantomStrategy", "PhantomPlan", "FFNPlan",
    "EnergyMonitor",
    "PhantomFFN", "PhantomLinear", "ColumnParallelLinear", "RowParallelLinear",
    "PhantomTransformerEncoder", "PhantomTransformerEncoderLayer", "PhantomSelfAttention",
    "to_phantom", "to_dense", "merge_shards", "reshard_checkpoint",
    "NonFiniteError", "NonFiniteGuard",
]
__version__ = "0.1.0"
