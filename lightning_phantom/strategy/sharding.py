"""Sharding a model in place: every FFN its plan selects becomes this rank's ``PhantomFFN``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning.fabric.utilities.init import _materialize_meta_tensors
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_phantom.cost.model import summary
from lightning_phantom.nn.convert import to_phantom
from lightning_phantom.nn.layers import PhantomFFN, set_group
from lightning_phantom.nn.plan import PhantomPlan, plan_module
from lightning_phantom.ops.comm import broadcast_tensors
from lightning_phantom.strategy.layout import PhantomLayout


def shard_module(module: nn.Module, plan: PhantomPlan, layout: PhantomLayout, phantom_group: dist.ProcessGroup,
                 device: torch.device, converted: dict[str, str]) -> None:
    """Replace every FFN ``plan`` selects by this rank's PhantomFFN; all checks first, so all ranks fail alike.

    ``converted`` gets, for each PhantomFFN, a one-line summary with its cost (also logged).
    """
    p = layout.phantom
    found = plan_module(module, plan, p)
    for name, ffn in found.built:
        if ffn.shard.size != p:
            raise ValueError(
                f"{name} is a PhantomFFN split over {ffn.shard.size} ranks, but this run's phantom "
                f"groups have {p} ({layout}). Build it with "
                "group=self.trainer.strategy.phantom_group in configure_model(), or re-shard it with "
                "lightning_phantom.merge_shards."
            )
    for name, ffn in found.built:  # the user's own, or converted by an earlier fit/validate/...
        set_group(ffn, phantom_group)
        if name not in converted:
            converted[name] = f"user-built PhantomFFN {ffn.sizes}; " + summary(ffn.sizes, p, ffn.ghosts)
    done: dict[int, PhantomFFN] = {}  # one Sequential reached by two names stays one module
    for ffn_plan, seq in found.convert:
        if id(seq) in done:
            ffn, how = done[id(seq)], "shared"
        elif any(t.is_meta for t in seq.parameters()):
            how = "random, from meta"
            ffn = to_phantom(seq, ffn_plan.ghosts, phantom_group, "random", ffn_plan.overlap)
        else:
            seq.to(device)
            # The SVD shards of one model must come from one set of dense weights: rank 0's.
            broadcast_tensors(list(seq.parameters()), None, 0)
            how = ffn_plan.init
            ffn = to_phantom(seq, ffn_plan.ghosts, phantom_group, ffn_plan.init, ffn_plan.overlap)
        done[id(seq)] = ffn
        parent, _, attr = ffn_plan.name.rpartition(".")
        setattr(module.get_submodule(parent), attr, ffn)
        converted[ffn_plan.name] = (f"{list(ffn_plan.sizes)} -> PhantomFFN ({how}); "
                                    + summary(ffn_plan.sizes, p, ffn_plan.ghosts))
        rank_zero_info(f"PhantomStrategy {layout}: {ffn_plan.name}: {converted[ffn_plan.name]}")
    _materialize_meta_tensors(module, device)
