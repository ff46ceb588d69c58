"""Sharding a model in place: every FFN its plan selects becomes this rank's ``PhantomFFN``, every
transformer stack this rank's ``PhantomTransformerEncoder``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning.fabric.utilities.init import _materialize_meta_tensors
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_phantom.cost.model import summary
from lightning_phantom.cost.transformer import stack_summary
from lightning_phantom.nn.convert import to_phantom
from lightning_phantom.nn.layers import set_group
from lightning_phantom.nn.plan import FFNPlan, PhantomPlan, StackPlan, plan_module
from lightning_phantom.ops.comm import broadcast_tensors
from lightning_phantom.strategy.layout import PhantomLayout


def shard_module(module: nn.Module, plan: PhantomPlan, layout: PhantomLayout, phantom_group: dist.ProcessGroup,
                 device: torch.device, converted: dict[str, str]) -> None:
    """Replace every FFN and stack ``plan`` selects by this rank's shard; all checks first, so all ranks fail alike.

    ``converted`` gets, for each, a one-line summary with its cost (also logged).
    """
    p = layout.phantom
    found = plan_module(module, plan, p)
    for name, built in [*found.built, *found.built_stacks]:
        if built.shard.size != p:
            raise ValueError(
                f"{name} is a {type(built).__name__} split over {built.shard.size} ranks, but this run's phantom "
                f"groups have {p} ({layout}). Build it with "
                "group=self.trainer.strategy.phantom_group in configure_model(), or re-shard it with "
                "lightning_phantom.merge_shards."
            )
    for name, ffn in found.built:  # the user's own, or converted by an earlier fit/validate/...
        set_group(ffn, phantom_group)
        if name not in converted:
            converted[name] = f"user-built PhantomFFN {ffn.sizes}; " + summary(ffn.sizes, p, ffn.ghosts)
    for name, stack in found.built_stacks:
        set_group(stack, phantom_group)
        converted.setdefault(name, f"user-built PhantomTransformerEncoder, {stack.num_layers} layers")
    for name, why in found.rejected_stacks:
        rank_zero_warn(f"PhantomStrategy leaves {name} dense: {why}")
    done: dict[int, nn.Module] = {}  # one module reached by two names stays one module
    for item_plan, dense in [*found.convert, *found.stacks]:
        if id(dense) in done:
            shard, how = done[id(dense)], "shared"
        elif any(t.is_meta for t in dense.parameters()):
            how = "random, from meta"
            shard = to_phantom(dense, item_plan.ghosts, phantom_group, "random", item_plan.overlap)
        else:
            dense.to(device)
            # The SVD shards of one model must come from one set of dense weights: rank 0's.
            broadcast_tensors(list(dense.parameters()), None, 0)
            how = item_plan.init
            shard = to_phantom(dense, item_plan.ghosts, phantom_group, item_plan.init, item_plan.overlap)
        done[id(dense)] = shard
        parent, _, attr = item_plan.name.rpartition(".")
        setattr(module.get_submodule(parent), attr, shard)
        converted[item_plan.name] = _describe(item_plan, how)
        rank_zero_info(f"PhantomStrategy {layout}: {item_plan.name}: {converted[item_plan.name]}")
    _materialize_meta_tensors(module, device)


def _describe(item_plan, how: str) -> str:
    if isinstance(item_plan, FFNPlan):
        return (f"{list(item_plan.sizes)} -> PhantomFFN ({how}); "
                + summary(item_plan.sizes, item_plan.phantom, item_plan.ghosts))
    s: StackPlan = item_plan
    return (f"{s.layers} x (d={s.d_model}, nhead={s.heads}, f={s.dim_feedforward}) -> PhantomTransformerEncoder "
            f"({how}); " + stack_summary(s.d_model, s.heads, s.dim_feedforward, s.layers, s.phantom, s.ghosts,
                                         norm_first=s.norm_first, final_norm=s.final_norm))
