"""The data axis: replicas of a phantom group start equal and step with the same gradients.

Each phantom group holds one copy of the model and sees its own batch. The replicas start
from the same weights (``sync_replicas``, once at set-up). Then, by ``PhantomStrategy(data_parallel=...)``:

* ``"ddp"``: every replica keeps whole copies of its shards and averages their gradients over
  the data-parallel group before every optimizer step (``average_gradients``), as DDP does.
* ``"fsdp"``: every ``PhantomFFN`` is sharded once more, over the data-parallel group, with
  PyTorch's FSDP2 (``shard_over_data``): each rank stores 1/data of its phantom shard's
  parameters, gradients and optimizer state. FSDP all-gathers a unit's parameters before its
  forward and backward (the phantom operator sees plain full tensors inside it) and
  reduce-scatters (averages) the gradients after backward. Parameters outside the FFNs stay
  whole and are averaged by ``average_gradients``, which leaves FSDP's DTensors alone.

Within a phantom group, the copies of replicated parameters get the group's mean gradient
(``average_replicated_gradients``) for the same reason.

Under manual optimization (``automatic_optimization = False``) ``"ddp"`` averages synchronously
at each optimizer step: a step may follow several ``manual_backward`` calls, and buckets
started by the first would miss the later ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_phantom.nn.layers import PhantomFFN, sharded_buffers, sharded_parameters
from lightning_phantom.ops.comm import broadcast_tensors, coalesced, local
from lightning_phantom.strategy.grad_buckets import GradientBuckets
from lightning_phantom.strategy.layout import PhantomLayout


DATA_PARALLEL_MODES = ("ddp", "fsdp")


def check_data_parallel(mode: str) -> str:
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL_MODES}, got {mode!r}: 'ddp' keeps a "
                         "whole copy of each phantom shard per replica, 'fsdp' shards it over the replicas.")
    return mode


def sync_replicas(module: nn.Module, layout: PhantomLayout, data_group: dist.ProcessGroup) -> None:
    """Replicated tensors equal on every rank, each shard equal on its replicas (as DDP does at wrap)."""
    sharded = {id(t) for t in [*sharded_parameters(module), *sharded_buffers(module)]}
    tensors = [*module.parameters(), *module.buffers()]
    broadcast_tensors([t for t in tensors if id(t) not in sharded], None, 0)
    if layout.data > 1:
        broadcast_tensors([t for t in tensors if id(t) in sharded], data_group, dist.get_global_rank(data_group, 0))


def average_gradients(optimizer: Optimizer, layout: PhantomLayout, data_group: dist.ProcessGroup,
                      device: torch.device) -> bool:
    """Every gradient of ``optimizer`` becomes its mean over the data-parallel replicas (bucketed).

    Returns whether every parameter had a gradient on every replica.
    """
    if layout.data == 1:
        return True
    # FSDP's parameters (DTensors) have had their gradients reduce-scattered already.
    params = [p for g in optimizer.param_groups for p in g["params"]
              if p.requires_grad and not isinstance(p, DTensor)]
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
    return bool((present == layout.data).all())


def shard_over_data(module: nn.Module, data_mesh) -> list[nn.Module]:
    """FSDP2 on the data axis for every ``PhantomFFN`` of ``module``; returns the FSDP units.

    Each FFN is its own unit (and root), so its parameters are gathered only while it runs
    and the rest of the model keeps its plain tensors, whatever ``training_step`` calls.
    ``reshard_after_forward=True`` (a root's default is False): between forward and backward
    only one FFN's full parameters exist at a time, for one more all-gather per FFN and step.
    """
    from torch.distributed.fsdp import fully_shard

    units = [m for m in module.modules() if isinstance(m, PhantomFFN)]
    for ffn in units:
        fully_shard(ffn, mesh=data_mesh, reshard_after_forward=True)
    return units


class DataAxis:
    """What the strategy does on the data axis in one mode (``"ddp"`` or ``"fsdp"``); one per strategy."""

    def __init__(self, mode: str) -> None:
        self.mode = check_data_parallel(mode)
        self.fsdp_units: list[nn.Module] = []  # "fsdp": every PhantomFFN, sharded over the replicas
        self.buckets: Optional[GradientBuckets] = None  # "ddp": the overlapped all-reduce
        self.overlapped_steps = 0  # steps whose average overlapped backward

    def shard(self, module: nn.Module, data_mesh) -> None:
        """Before the optimizers are built: ``"fsdp"`` shards every FFN over the replicas (once)."""
        if self.mode == "fsdp" and not self.fsdp_units:
            self.fsdp_units = shard_over_data(module, data_mesh)

    def attach(self, optimizers: list[Optimizer], layout: PhantomLayout, data_group: dist.ProcessGroup,
               automatic: bool = True) -> None:
        """After: ``"ddp"``'s overlapped all-reduce for the whole parameters, where it applies.

        One optimizer under automatic optimization only: the buckets are finished at its step,
        after the one backward of each micro-batch. Under manual optimization a step may follow
        several ``manual_backward`` calls (the buckets would start on the first and miss the
        rest), and more optimizers are stepped by hand: those keep the synchronous average.
        """
        self.detach()
        if self.mode != "ddp" or layout.data == 1 or len(optimizers) != 1 or not automatic:
            return
        params = [p for g in optimizers[0].param_groups for p in g["params"]
                  if p.requires_grad and not isinstance(p, DTensor)]
        self.buckets = GradientBuckets(params, data_group, layout.data) if params else None

    def detach(self) -> None:
        if self.buckets is not None:
            self.buckets.remove()
            self.buckets = None

    def finish(self, optimizer: Optimizer, layout: PhantomLayout, data_group: dist.ProcessGroup,
               device: torch.device) -> list[tuple[int, ...]]:
        """After the last backward of a step: the gradients are the replicas' mean (FSDP's: already).

        Returns the shapes of parameters that got no gradient on this rank although the armed
        buckets need one (``GradientBuckets.finish``): the step must then stop on every rank.
        """
        average = partial(average_gradients, optimizer, layout, data_group, device)
        if self.buckets is None:
            average()
            return []
        self.overlapped_steps += self.buckets.armed
        return self.buckets.finish(average)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """No data-axis communication for the backwards inside (accumulating micro-batches)."""
        for unit in self.fsdp_units:
            unit.set_requires_gradient_sync(False)
        if self.buckets is not None:
            self.buckets.sync = False
        try:
            yield
        finally:
            for unit in self.fsdp_units:
                unit.set_requires_gradient_sync(True)
            if self.buckets is not None:
                self.buckets.sync = True


def replicated_gradients(optimizer: Optimizer, sharded: set[int]) -> list[torch.Tensor]:
    """The gradients of ``optimizer``'s parameters that every phantom rank holds a copy of.

    ``sharded`` holds the ``id`` of every parameter split over the group (``sharded_parameters``,
    taken once: walking the modules every step cost as much as the all-reduce). Under FSDP a
    replicated parameter of an FFN is a DTensor over the data axis: the ranks of one phantom
    group share a data coordinate, so their local parts are copies of each other.
    """
    return [local(p.grad) for g in optimizer.param_groups for p in g["params"]
            if p.grad is not None and id(p) not in sharded]


def average_replicated_gradients(grads: list[torch.Tensor], layout: PhantomLayout, phantom_group: dist.ProcessGroup,
                                 riders: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``grads`` (``replicated_gradients``) become their mean over the phantom group; ``riders`` their sum.

    Those copies (biases after a phantom layer, anything outside the FFNs) compute the same
    gradient on every rank in exact arithmetic, but nondeterministic GPU kernels can differ
    in the last bits, and copies that step with different gradients drift apart for good (the
    checkpoint keeps one of them). Megatron all-reduces the gradients of parameters replicated
    over tensor-parallel ranks for the same reason. They are small, so this is one bucketed
    all-reduce per step. The copies are assumed to have gradients on the same ranks: they run
    the same code on the same batch.

    ``riders``: small values every rank needs summed over the group (``NonFiniteGuard``'s
    verdict, ``BatchCheck``'s hashes) ride in the same buffer, so they cost no collective of
    their own; the caller sends them multiplied by p (the buffer is divided by p), in a dtype
    that holds their sums exactly. Returned summed (in place).
    """
    if layout.phantom == 1:
        return riders

    def average(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=phantom_group)
        flat.div_(layout.phantom)

    with torch.no_grad():
        coalesced(grads + ([riders] if riders is not None else []), average)
    return riders
