"""The strategy's own precision plugins: clipping by the norm of the whole phantom model.

Lightning's ``gradient_clip_algorithm="norm"`` ends in ``Precision.clip_grad_by_norm``,
which would clip each rank by the norm of its own shard. ``PhantomStrategy`` therefore
replaces the plugin Lightning hands it by the matching class below (same settings), whose
``clip_grad_by_norm`` uses the norm of the whole model:

    ||g||² = Σ over the phantom group of each rank's sharded squares + the replicated squares once.

Gradients are already the data-parallel mean when it runs (equal on every replica); with
``data_parallel="fsdp"`` each replica holds only its part of them (a DTensor), and the
squares of those parts are summed over the data-parallel group as well.

Under ``16-mixed`` the plugin's ``GradScaler`` becomes a ``SyncedGradScaler``, whose inf/NaN
check is all-reduced over the world: every rank skips the same steps and keeps the same
scale, for fused optimizers too. Clipping works with a fused optimizer: the plugin unscales
first when it clips (a fused optimizer otherwise unscales inside its own step).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

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

    @override
    def clip_gradients(self, optimizer: Optimizer, clip_val: Union[int, float] = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        # Lightning refuses to clip for an optimizer that unscales inside its step (fused Adam,
        # AdamW, SGD), since it never calls unscale_ for one. Unscaling here, only when clipping,
        # keeps the fused path for everyone else; GradScaler.step then hands the optimizer
        # unscaled gradients (grad_scale=None) and this step's found_inf.
        # (bf16-mixed has no scaler and nothing to unscale, but Lightning refuses it all the same.)
        if clip_val > 0 and getattr(optimizer, "_step_supports_amp_scaling", False):
            if self.scaler is not None and _scaler_stage(self.scaler, optimizer) is OptState.READY:
                self.scaler.unscale_(optimizer)
            Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
            return
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


class SyncedGradScaler(torch.amp.GradScaler):
    """A ``GradScaler`` whose inf/NaN check is summed over every rank of the world before anyone decides.

    A step skipped on one rank only leaves the shards and replicas of one model at different
    steps, and once scales differ the next step's ghost reduce-scatter and gradient averages
    add gradients scaled differently. GradScaler checks in ``_unscale_grads_`` on both of its
    paths: ``unscale_`` (before clipping) and ``_check_inf_per_device``, which ``step`` uses for
    optimizers that unscale themselves (fused ones, for which Lightning never calls ``unscale_``;
    FSDP's ``ShardedGradScaler`` syncs only the first). Syncing there covers both.
    """

    @override
    def _unscale_grads_(self, optimizer: Optimizer, inv_scale: Tensor, found_inf: Tensor,
                        allow_fp16: bool) -> dict[torch.device, Tensor]:
        # Under data_parallel="fsdp" the FFNs' gradients are DTensors and the others plain
        # tensors; one foreach call refuses the mix, so each kind is unscaled on its own.
        params = [p for g in optimizer.param_groups for p in g["params"]]
        flags: list[Tensor] = []
        for kind in ([p for p in params if not isinstance(p.grad, DTensor)],
                     [p for p in params if isinstance(p.grad, DTensor)]):
            if kind:
                flags += super()._unscale_grads_(_Params(kind), inv_scale, found_inf, allow_fp16).values()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return {flag.device: flag for flag in flags}  # (found_inf itself where it is on that device)
        # One flag on the scale's device, whatever devices this rank's gradients are on: every
        # rank takes part in the all-reduce, and update() and step() read the same verdict.
        anywhere = torch.zeros_like(found_inf)
        for flag in flags:
            anywhere += flag.to(anywhere.device)
        dist.all_reduce(anywhere)
        return {anywhere.device: anywhere}


class _Params:
    """An optimizer as ``GradScaler._unscale_grads_`` reads one: parameter groups only."""

    def __init__(self, params: list[Tensor]) -> None:
        self.param_groups = [{"params": params}]


def _scaler_stage(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> OptState:
    return scaler._per_optimizer_states[id(optimizer)]["stage"]


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


def _synced_scaler(scaler: torch.amp.GradScaler, device: str) -> torch.amp.GradScaler:
    """The same GradScaler settings, its overflow decision shared by the world (``SyncedGradScaler``)."""
    if isinstance(scaler, SyncedGradScaler) or not scaler.is_enabled():  # a disabled one never skips
        return scaler
    return SyncedGradScaler(device=device, init_scale=scaler.get_scale(),
                            growth_factor=scaler.get_growth_factor(),
                            backoff_factor=scaler.get_backoff_factor(),
                            growth_interval=scaler.get_growth_interval())
