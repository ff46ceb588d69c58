"""From the last backward of a step to its optimizer step: the averages, and one verdict on every rank.

``finish_step`` runs inside the closure of every optimizer step, under automatic and manual
optimization alike, after the last backward of the step:

1. ``NonFiniteGuard.local_verdict`` (if a guard is on): taken before any average, so that a
   NaN is named on the rank that made it.
2. ``DataAxis.finish``: the replicas' mean. With armed ``"ddp"`` buckets it also reports a
   parameter that got no gradient on this rank (its buckets went out with zeros, so nobody waits).
3. ``average_replicated_gradients`` over the phantom group, carrying in the same buffer the
   guard's verdict and ``BatchCheck``'s hashes of this step's batches.
4. The step's flags — [non-finite, batches differ, gradients missing] — summed over the data
   axis (the one small all-reduce the guard sends anyway; sent whenever one of them can be set).
5. On a flag, every rank raises the same error before the optimizer step: the weights, and any
   checkpoint written after, stay those of the last good step.

Cost with nothing wrong: the hashes (a dozen numbers) in a buffer sent anyway, and one host
read of three flags per step (the guard reads its verdict there already).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_phantom.strategy.batches import BatchCheck, mismatch_error, rider_dtype
from lightning_phantom.strategy.data_parallel import average_replicated_gradients, replicated_gradients
from lightning_phantom.strategy.guards import NonFiniteGuard


class MissingGradientError(RuntimeError):
    """A parameter got a gradient on some data-parallel replicas and not others (``data_parallel="ddp"``).

    Raised on every rank at the same step; ``shapes``: rank → shapes of its parameters without one.
    """

    def __init__(self, message: str, step: int, shapes: dict[int, list]) -> None:
        super().__init__(message)
        self.step, self.shapes = step, shapes


class SteppingStrategy(Protocol):
    """What ``finish_step`` uses of ``PhantomStrategy``."""

    layout: Any  # PhantomLayout
    data_axis: Any  # DataAxis
    phantom_group: Any
    data_parallel_group: Any
    root_device: torch.device
    lightning_module: Any
    _guard: Optional[NonFiniteGuard]
    _batch_check: Optional[BatchCheck]
    _sharded: set[int]  # id() of the parameters split over the phantom group


def finish_step(strategy: SteppingStrategy, optimizer: Optimizer) -> None:
    """Average this step's gradients and agree, on every rank, that the step may be taken (see above)."""
    layout, guard, check = strategy.layout, strategy._guard, strategy._batch_check
    verdict = guard.local_verdict(optimizer) if guard is not None else None
    missing = strategy.data_axis.finish(optimizer, layout, strategy.data_parallel_group, strategy.root_device)
    grads = replicated_gradients(optimizer, strategy._sharded)
    device = grads[0].device if grads else strategy.root_device
    flags = torch.zeros(3, dtype=torch.float32, device=device)  # non-finite, batches differ, gradients missing
    if layout.phantom > 1 and (verdict is not None or check is not None):
        dtype = rider_dtype(grads[0].dtype if grads else torch.float32, layout.phantom)
        riders = [verdict.to(device, dtype).reshape(1) * layout.phantom] if verdict is not None else []
        riders += [check.riders(dtype, device)] if check is not None else []
        summed = average_replicated_gradients(grads, layout, strategy.phantom_group, torch.cat(riders))
        if verdict is not None:
            verdict, summed = summed[0], summed[1:]
        if check is not None:
            flags[1] = check.mismatch(summed)
    else:
        average_replicated_gradients(grads, layout, strategy.phantom_group)
    if verdict is not None:
        flags[0] = verdict
    flags[2] = len(missing)
    if layout.data > 1 and (guard is not None or check is not None or strategy.data_axis.buckets is not None):
        dist.all_reduce(flags, group=strategy.data_parallel_group)
    _, differ, absent = flags.tolist()  # the one host read of the step (the guard reads flags[0] later)
    trainer = strategy.lightning_module.trainer
    if differ:
        raise mismatch_error(trainer.global_step, _where(trainer), int(differ), layout.data, layout.phantom)
    if absent:
        raise _missing_error(trainer, missing)
    if guard is not None:
        guard.agree(flags[0])


def _where(trainer) -> str:
    batch = trainer.fit_loop.epoch_loop.batch_idx
    return f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch})"


def _missing_error(trainer, missing: list) -> MissingGradientError:
    """The failure path only: every rank learns which ranks lacked which gradients."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, missing)
    shapes = {rank: found for rank, found in enumerate(every) if found}
    named = "; ".join(f"rank {r}: {found}" for r, found in shapes.items())
    return MissingGradientError(
        f"PhantomStrategy(data_parallel='ddp') averages gradients during backward and needs every parameter "
        f"to get a gradient at every step, but at {_where(trainer)} parameters got none on some replicas only "
        f"(shapes {named}). Training stopped on every rank before this optimizer step. Give parameters that "
        "are never used requires_grad=False, keep their use the same at every step, or use them with a zero "
        "weight (0 * branch(x)) on the steps that skip them.",
        trainer.global_step, shapes,
    )

