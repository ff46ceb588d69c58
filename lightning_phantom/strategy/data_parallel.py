"""The data axis: replicas of a phantom group start equal and step with the same gradients.

Each phantom group holds one copy of the model and sees its own batch. As DDP does, the
replicas start from the same weights (``sync_replicas``, once at set-up) and average their
gradients over the data-parallel group before every optimizer step
(``average_gradients``), so they stay equal without ever exchanging weights. Within a
phantom group, the copies of replicated parameters get the group's mean gradient
(``average_replicated_gradients``) for the same reason.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_phantom.nn.layers import sharded_parameters
from lightning_phantom.ops.comm import broadcast_tensors, coalesced
from lightning_phantom.strategy.layout import PhantomLayout


def sync_replicas(module: nn.Module, layout: PhantomLayout, data_group: dist.ProcessGroup) -> None:
    """Replicated tensors equal on every rank, each shard equal on its replicas (as DDP does at wrap)."""
    sharded = {id(t) for t in sharded_parameters(module)}
    tensors = [*module.parameters(), *module.buffers()]
    broadcast_tensors([t for t in tensors if id(t) not in sharded], None, 0)
    if layout.data > 1:
        broadcast_tensors([t for t in tensors if id(t) in sharded], data_group, dist.get_global_rank(data_group, 0))


def average_gradients(optimizer: Optimizer, layout: PhantomLayout, data_group: dist.ProcessGroup,
                      device: torch.device) -> None:
    """Every gradient of ``optimizer`` becomes its mean over the data-parallel replicas (bucketed)."""
    if layout.data == 1:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    # A parameter with a gradient on some replicas only counts as 0 on the others.
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, group=data_group)
    with torch.no_grad():
        grads = []
        for p, anywhere in zip(params, present.tolist()):
            if anywhere:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)

        def average(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, group=data_group)
            flat.div_(layout.data)

        coalesced(grads, average)


def average_replicated_gradients(optimizer: Optimizer, module: nn.Module, layout: PhantomLayout,
                                 phantom_group: dist.ProcessGroup) -> None:
    """Gradients of the parameters every phantom rank holds a copy of become their mean over the group.

    Those copies (biases after a phantom layer, anything outside the FFNs) compute the same
    gradient on every rank in exact arithmetic, but nondeterministic GPU kernels can differ
    in the last bits, and copies that step with different gradients drift apart for good (the
    checkpoint keeps one of them). Megatron all-reduces the gradients of parameters replicated
    over tensor-parallel ranks for the same reason. They are small, so this is one bucketed
    all-reduce per step. The copies are assumed to have gradients on the same ranks: they run
    the same code on the same batch.
    """
    if layout.phantom == 1:
        return
    sharded = {id(p) for p in sharded_parameters(module)}
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]
             if p.grad is not None and id(p) not in sharded]

    def average(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=phantom_group)
        flat.div_(layout.phantom)

    with torch.no_grad():
        coalesced(grads, average)
