"""Dropout in phantom FFNs: own masks per shard, one mask for replicated tensors, reproducible."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import lightning_phantom as lp
from lightning_phantom.nn.dropout import ReplicatedDropout, ShardedDropout
from conftest import run_ranks


def dense_with_dropout() -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.5),  # on the replicated input
        nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.5)),
        nn.Linear(16, 4),
        nn.Dropout(0.5),  # on the replicated output
    ).double()


def masks_of(ffn: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which positions each dropout layer kept, in one training forward."""
    kept, handles = {}, []
    for name, m in ffn.named_modules():
        if isinstance(m, (ShardedDropout, ReplicatedDropout)):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: kept.__setitem__(name, out != 0)))
    ffn(x)
    for h in handles:
        h.remove()
    return kept


def draw_masks():
    torch.manual_seed(0)  # what seed_everything does to torch's RNG
    ffn = lp.to_phantom(dense_with_dropout(), ghosts=2, init="random")
    kinds = {name: type(m).__name__ for name, m in ffn.named_modules() if "Dropout" in type(m).__name__}
    x = torch.rand(5, 6, dtype=torch.float64) + 1  # no zeros of its own
    first = masks_of(ffn, x)
    saved = {k: v.clone() for k, v in ffn.state_dict().items()}
    second = masks_of(ffn, x)
    ffn.load_state_dict(saved)  # a resume from the checkpoint taken after the first step
    resumed = masks_of(ffn, x)
    torch.manual_seed(0)
    again = masks_of(lp.to_phantom(dense_with_dropout(), ghosts=2, init="random"), x)
    gathered = {}
    for name, mask in first.items():
        every = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mask.to(torch.uint8))
        gathered[name] = torch.stack(every).bool()
    ffn.eval()
    eval_same = torch.equal(ffn(x), ffn(x))
    dense = lp.to_dense(ffn)
    dense_kinds = [type(m).__name__ for m in dense.modules() if "Dropout" in type(m).__name__]
    return {"kinds": kinds, "first": first, "second": second, "resumed": resumed, "again": again,
            "gathered": gathered, "eval_same": eval_same, "dense_kinds": dense_kinds}


def test_dropout_masks_per_rank_and_reproducible():
    results = run_ranks(2, draw_masks)
    r = results[0]
    assert r["kinds"] == {"0": "ReplicatedDropout", "1.2": "ShardedDropout", "2.2": "ShardedDropout",
                          "4": "ReplicatedDropout"}
    for name, every in r["gathered"].items():
        if r["kinds"][name] == "ShardedDropout":
            assert not torch.equal(every[0], every[1]), f"{name}: both shards dropped the same positions"
            assert 0.2 < every.float().mean() < 0.8
        else:
            assert torch.equal(every[0], every[1]), f"{name}: replicated tensor dropped differently per rank"
    for rank in results:
        for name in rank["first"]:
            assert torch.equal(rank["first"][name], rank["again"][name])  # same seed, same masks
            assert torch.equal(rank["second"][name], rank["resumed"][name])  # state dict resumes the stream
            assert not torch.equal(rank["first"][name], rank["second"][name])  # new masks each step
        assert rank["eval_same"]
        assert rank["dense_kinds"] == ["Dropout"] * 4
