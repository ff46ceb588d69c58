"""The strategy's own precision plugins: clipping by the norm of the whole phantom model.

Lightning's ``gradient_clip_algorithm="norm"`` ends in ``Precision.clip_grad_by_norm``,
which would clip each rank by the norm of its own shard. ``PhantomStrategy`` therefore
replaces the plugin Lightning hands it by the matching class below (same settings), whose
``clip_grad_by_norm`` uses the norm of the whole model:

    ||g||² = Σ over the phantom group of each rank's sharded squares + the replicated squares once.

Gradients are already the data-parallel mean when it runs (equal on every replica); with
``data_parallel="fsdp"`` each replica holds only its part of them (a DTensor), and the
squares of those parts are summed over the data-parallel group as well. Under ``16-mixed``
the plugin's ``GradScaler`` is replaced by one whose inf/NaN check is all-reduced over the
world, so every rank skips the same steps.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision

from lightning_phantom.ops.comm import local

GlobalNorm = Callable[[list[Tensor]], Tensor]  # gradients → the norm of the whole phantom model


def global_grad_norm(grads: list[Tensor], sharded: set[int], phantom_group: Optional[dist.ProcessGroup],
                     phantom: int, data_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The 2-norm of the whole model's gradient; ``sharded`` holds the ids of the sharded gradients.

    ``data_group``: given when some gradients are DTensors sharded over it (FSDP); every rank
    must then pass it, as the parts' squares are all-reduced over it.
    """
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device if grads else torch.device("cpu")
    # [phantom-sharded, replicated] of whole gradients, then of parts of gradients (FSDP's).
    squares = torch.zeros(4, dtype=dtype, device=device)
    for g in grads:
        part = local(g)
        slot = (0 if id(g) in sharded else 1) + (2 if part is not g else 0)
        squares[slot] += torch.linalg.vector_norm(part, 2, dtype=dtype).square()
    if data_group is not None:
        parts = squares[2:].clone()
        dist.all_reduce(parts, group=data_group)
        squares[2:] = parts
    squares = squares[:2] + squares[2:]
    sharded_squares = squares[:1].clone()
    if phantom > 1:
        dist.all_reduce(sharded_squares, group=phantom_group)
    return (sharded_squares[0] + squares[1]).sqrt()


class PhantomPrecision(Precision):
    """``precision="32-true"`` under ``PhantomStrategy``; the base of the strategy's other plugins."""

    global_norm: GlobalNorm

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> Tensor:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = self.global_norm(grads)
        coef = torch.clamp(clip_val / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        with torch.no_grad():
            for g in grads:
                local(g).mul_(coef.to(g.device, g.dtype))
        return total


class PhantomDoublePrecision(PhantomPrecision, DoublePrecision):
    """``precision="64-true"`` under ``PhantomStrategy``."""


class PhantomMixedPrecision(PhantomPrecision, MixedPrecision):
    """``precision="bf16-mixed"`` / ``"16-mixed"`` under ``PhantomStrategy``."""


def phantom_precision(plugin: Precision, global_norm: GlobalNorm) -> Precision:
    """The strategy's plugin for the one Lightning chose: same settings, whole-model clipping."""
    check_precision(plugin)
    if isinstance(plugin, PhantomPrecision):
        new = plugin
    elif isinstance(plugin, MixedPrecision):
        scaler = _synced_scaler(plugin.scaler, plugin.device) if plugin.scaler is not None else None
        new = PhantomMixedPrecision(plugin.precision, plugin.device, scaler)
    elif isinstance(plugin, DoublePrecision):
        new = PhantomDoublePrecision()
    else:
        new = PhantomPrecision()
    new.global_norm = global_norm
    return new


def check_precision(plugin: Precision) -> None:
    name = getattr(plugin, "precision", type(plugin).__name__)
    mixed = isinstance(plugin, MixedPrecision) and (
        name == "bf16-mixed" or (name == "16-mixed" and plugin.device == "cuda"))
    plain = type(plugin) in (Precision, PhantomPrecision)
    if not (plain or isinstance(plugin, DoublePrecision) or mixed):
        where = f" on {plugin.device}" if isinstance(plugin, MixedPrecision) else ""
        raise ValueError(
            f"PhantomStrategy does not support precision {name!r}{where} ({type(plugin).__name__}). "
            "Supported: '32-true', '64-true', 'bf16-mixed', and '16-mixed' on CUDA."
        )


def _synced_scaler(scaler, device: str):
    """The same GradScaler settings, with found_inf all-reduced over the world before each step.

    A step skipped for inf/NaN on one rank must be skipped on all, or the shards of one model
    and its replicas drift apart; FSDP's ShardedGradScaler does exactly that sync.
    """
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    if isinstance(scaler, ShardedGradScaler) or not scaler.is_enabled():  # a disabled one never skips
        return scaler
    return ShardedGradScaler(device=device, init_scale=scaler.get_scale(),
                             growth_factor=scaler.get_growth_factor(),
                             backoff_factor=scaler.get_backoff_factor(),
                             growth_interval=scaler.get_growth_interval())
