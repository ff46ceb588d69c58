"""Dropout in phantom FFNs: each rank keeps its slice of the dense model's mask.

Every rank draws the mask of the whole activation from torch's global RNG, as ``nn.Dropout`` on
the dense activation would, and keeps its own columns: from the same RNG state a phantom FFN at
``ghosts="full"`` computes in training mode what the dense FFN computes, and activation
checkpointing (which restores the RNG state to recompute) redraws the same masks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_phantom as lp
from lightning_phantom.nn.dropout import ShardedDropout
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
        if isinstance(m, nn.Dropout):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: kept.__setitem__(name, out != 0)))
    ffn(x)
    for h in handles:
        h.remove()
    return kept


def dense_masks_sliced():
    p = dist.get_world_size()
    torch.manual_seed(0)
    dense = dense_with_dropout()
    ffn = lp.to_phantom(dense, ghosts="full")  # exact: the dense model, sharded
    kinds = {name: type(m).__name__ for name, m in ffn.named_modules() if isinstance(m, nn.Dropout)}
    x = torch.rand(5, 6, dtype=torch.float64) + 1  # no zeros of its own
    errors = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = dense(x)
        torch.manual_seed(seed)
        errors.append((ffn(x) - want).abs().max().item())
    torch.manual_seed(3)
    first = masks_of(ffn, x)
    second = masks_of(ffn, x)
    gathered = {}
    for name, mask in first.items():
        every = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(p)]
        dist.all_gather(every, mask.to(torch.uint8))
        gathered[name] = torch.stack(every).bool()
    ffn.eval(), dense.eval()
    eval_error = (ffn(x) - dense(x)).abs().max().item()
    dense_kinds = [type(m).__name__ for m in lp.to_dense(ffn).modules() if isinstance(m, nn.Dropout)]
    return {"kinds": kinds, "errors": errors, "first": first, "second": second, "gathered": gathered,
            "eval_error": eval_error, "dense_kinds": dense_kinds}


def test_sharded_dropout_keeps_this_ranks_slice_of_the_dense_mask():
    results = run_ranks(2, dense_masks_sliced)
    r = results[0]
    assert r["kinds"] == {"0": "Dropout", "1.2": "ShardedDropout", "2.2": "ShardedDropout", "4": "Dropout"}
    for name, every in r["gathered"].items():
        if r["kinds"][name] == "ShardedDropout":  # each rank's own neurons: different positions
            assert not torch.equal(every[0], every[1]), f"{name}: both shards dropped the same positions"
            assert 0.2 < every.float().mean() < 0.8
        else:
            assert torch.equal(every[0], every[1]), f"{name}: replicated tensor dropped differently per rank"
    for rank in results:
        assert max(rank["errors"]) < 1e-12, rank["errors"]  # the dense model's masks, in training mode
        assert rank["eval_error"] < 1e-12
        for name in rank["first"]:
            assert not torch.equal(rank["first"][name], rank["second"][name])  # new masks each step
        assert rank["dense_kinds"] == ["Dropout"] * 4


def checkpointed_gradients():
    """Gradients of a phantom FFN with dropout, with and without activation checkpointing."""
    torch.manual_seed(0)
    ffn = lp.PhantomFFN([6, 16, 16, 16, 4], ghosts=2, activation="gelu", dropout=0.3).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)  # reentrant checkpoint needs one
    grads = {}
    for how in ("plain", "checkpoint", "reentrant"):
        ffn.zero_grad()
        torch.manual_seed(5)
        if how == "plain":
            out = ffn(x)
        else:  # torch's checkpoint restores the RNG state before the recompute
            out = checkpoint(ffn, x, use_reentrant=how == "reentrant")
        out.square().sum().backward()
        grads[how] = {n: p.grad.clone() for n, p in ffn.named_parameters()}
    return {how: max((g[n] - grads["plain"][n]).abs().max().item() for n in g) for how, g in grads.items()}


def test_activation_checkpointing_recomputes_the_same_masks():
    for rank in run_ranks(2, checkpointed_gradients):
        assert rank["checkpoint"] < 1e-12 and rank["reentrant"] < 1e-12, rank


def test_dropout_is_found_by_type_and_builds_on_the_meta_device():
    with torch.device("meta"):  # what Trainer.init_module(empty_init=True) does
        meta = lp.PhantomFFN([6, 16, 16, 4], ghosts=2, dropout=0.1, shard=(1, 2))
    assert [m.p for m in meta.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.1]

    torch.manual_seed(0)
    ffn = lp.PhantomFFN([6, 16, 16, 4], ghosts=2, dropout=0.5, shard=(0, 1)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    ffn.eval()
    want = ffn(x)
    dropouts = [m for m in ffn.modules() if isinstance(m, nn.Dropout)]  # Monte-Carlo dropout finds them
    assert len(dropouts) == 2
    for m in dropouts:
        m.train()
    assert not torch.allclose(ffn(x), want)  # on at inference
    for m in dropouts:
        m.p = 0.0  # and their rate can be changed
    assert torch.equal(ffn(x), want)


def test_sharded_dropout_refuses_the_wrong_width():
    layer = ShardedDropout(0.5, 16, shard=(0, 2))
    try:
        layer(torch.ones(3, 16))
    except ValueError as e:
        assert "holds 8 of 16 features" in str(e)
    else:
        raise AssertionError("a full-width input was taken as this rank's slice")


def test_sharded_dropout_draws_in_the_memory_layout_of_its_input():
    """F.dropout draws its mask in the input's memory layout (empty_like), and torch's batch-first attention
    output is a transposed view: each rank's slice must be that mask's slice, not a contiguous draw's."""
    dense = torch.rand(5, 3, 16, dtype=torch.float64).add_(1).transpose(0, 1)  # (3, 5, 16), laid out (5, 3, 16)
    torch.manual_seed(4)
    want = nn.functional.dropout(dense, 0.5, True)
    for rank in range(2):
        layer = ShardedDropout(0.5, 16, shard=(rank, 2))
        torch.manual_seed(4)
        got = layer(dense[..., rank * 8:(rank + 1) * 8])
        assert torch.equal(got, want[..., rank * 8:(rank + 1) * 8])
    torch.manual_seed(4)  # a contiguous input of the same shape gets a different mask, as in the dense model
    assert not torch.equal(nn.functional.dropout(dense.contiguous(), 0.5, True), want)
