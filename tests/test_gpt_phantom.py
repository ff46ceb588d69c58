"""The phantom GPT (``model=gpt strategy=phantom``): the app's GPT blocks as one phantom stack.

At p = 2 in float64 with ``ghosts="full"``, converted by SVD from the same dense GPT as the TP
tests (``tests/test_gpt.py``), the phantom GPT has the dense GPT's loss and every gradient: the
replicated parameters' directly, each shard's through the chain rule of its factors (the diagonal
block, the compressors and decompressors, docs/operator.md §2); ``to_dense`` gives back the app's
classes with the same predictions, the record of the stack rebuilds it from plain data and
``reshard_tensors`` (the heart of ``reshard_checkpoint``) merges it onto one rank exactly. What it
sends and computes equals ``cost.gpt`` (scheme "phantom"), in float64 and under bf16 autocast, where
TP's figures are checked too and the app's recorder takes its element sizes from the precision.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import run_ranks
from test_gpt import BATCH, SEQ, SHAPE, _batch, _dense

from lightning_phantom.cost.gpt import GPTShape, gpt_cost

GPT_SHAPE = GPTShape(SHAPE["vocab"], SHAPE["width"], SHAPE["layers"], SHAPE["heads"],
                     SHAPE["mlp_ratio"] * SHAPE["width"], SHAPE["context"])
# Each phantom linear of a block and the dense GPT's linears it is made of (the QKV: q, k and v stacked).
LINEARS = {"self_attn.in_proj": ("attn.q", "attn.k", "attn.v"), "self_attn.out_proj": ("attn.out",),
           "linear1": ("mlp.fc1",), "linear2": ("mlp.fc2",)}
NORMS = {"norm1": "ln1", "norm2": "ln2"}


def _dense_grad(dense, block: int, names: tuple[str, ...], what: str) -> torch.Tensor:
    return torch.cat([dense.blocks[block].get_submodule(n).get_parameter(what).grad for n in names])


def expected_shard_grads(dense, shards: list, rank: int) -> dict[str, torch.Tensor]:
    """The gradient of every parameter of shard ``rank`` of the phantom stack, from the dense GPT's:
    W_rj = L_r (r = j) or D_rj C_j, so dL/d(factor) = the vector-Jacobian product of that map with the
    dense gradient (its QKV rows in the phantom order, ``qkv_rows``)."""
    from lightning_phantom.nn.attention import qkv_rows

    p, d = len(shards), shards[0].d_model
    expected = {}
    for b in range(len(shards[0].layers)):
        for path, names in LINEARS.items():
            rows = qkv_rows(d, p) if path.endswith("in_proj") else slice(None)
            g_w, g_b = _dense_grad(dense, b, names, "weight")[rows], _dense_grad(dense, b, names, "bias")[rows]
            layers = [s.layers[b].get_submodule(path) for s in shards]
            leaves = [[t.detach().clone().requires_grad_() for t in (m.weight, m.compress, m.decompress)]
                      for m in layers]
            k = layers[0].ghosts
            w = torch.cat([torch.cat([leaves[r][0] if r == j else
                                      leaves[r][2][:, (j - (j > r)) * k:(j - (j > r) + 1) * k] @ leaves[j][1]
                                      for j in range(p)], dim=1) for r in range(p)])
            grads = torch.autograd.grad(w, [t for per_rank in leaves for t in per_rank], g_w)
            c = g_b.shape[0] // p
            at = f"layers.{b}.{path}."
            expected.update({at + "weight": grads[3 * rank], at + "compress": grads[3 * rank + 1],
                             at + "decompress": grads[3 * rank + 2], at + "bias": g_b[rank * c:(rank + 1) * c]})
        for phantom, dense_name in NORMS.items():
            for what in ("weight", "bias"):
                g = dense.blocks[b].get_submodule(dense_name).get_parameter(what).grad
                expected[f"layers.{b}.{phantom}.{what}"] = g[rank * d // p:(rank + 1) * d // p]
    return expected


def _phantom_step() -> dict:
    """Dense GPT and its phantom form (ghosts="full", SVD) on every rank: loss, every gradient, what was
    sent and computed, to_dense, and this rank's shard as a checkpoint would hold it."""
    import torch.distributed as dist

    import lightning_phantom as lp
    from lightning_phantom.app.language_model import GPTModule
    from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
    from lightning_phantom.nn import architecture
    from lightning_phantom.nn.convert_transformer import gather_stack_shards
    from lightning_phantom.strategy.checkpoints import shard_keys

    rank, p = dist.get_rank(), dist.get_world_size()
    dense = _dense()
    tokens, targets = _batch()
    dense_loss = F.cross_entropy(dense(tokens).flatten(0, 1), targets.flatten())
    dense_loss.backward()

    module = GPTModule(**SHAPE)
    module.gpt = copy.deepcopy(dense)
    module.gpt.zero_grad(set_to_none=True)
    module.gpt.blocks = lp.to_phantom(module.gpt.blocks, ghosts="full", group=dist.group.WORLD, init="svd")
    stack = module.gpt.blocks
    with CommCounter() as comm, LocalFlopCounterMode(display=False) as flops:
        loss = module._loss((tokens, targets))
        loss.backward()
    errors = {name: (q.grad - dense.get_parameter(name).grad).abs().max().item()
              for name, q in module.gpt.named_parameters() if not name.startswith("blocks.")}
    expected = expected_shard_grads(dense, gather_stack_shards(stack), rank)
    errors.update({f"blocks.{name}": (q.grad - expected[name]).abs().max().item()
                   for name, q in stack.named_parameters()})
    served = lp.to_dense(module.gpt)
    with torch.no_grad():
        served_error = (served(tokens) - dense(tokens)).abs().max().item()
    keys = shard_keys(stack, rank, p)
    return {"loss": abs(loss.item() - dense_loss.item()), "grads": errors, "expected": len(expected),
            "ghosts": stack.ghosts, "payloads": sorted((r.op, r.numel, r.phase) for r in comm.records),
            "sent": comm.sent_bytes, "macs": flops.get_total_flops() // 2,
            "params": sum(q.numel() for q in module.gpt.parameters()),
            "served": (type(served.blocks).__name__, type(served.blocks[0]).__name__, served_error),
            "record": architecture.describe(stack),
            "state": {f"gpt.blocks.{keys.get(k, k)}": t.detach().clone() for k, t in stack.state_dict().items()}}


def test_phantom_gpt_is_the_dense_gpt_serves_dense_reshards_and_costs_what_the_model_says(tmp_path):
    import lightning_phantom.app.gpt_blocks  # noqa: F401  a record names the app's classes: registered here
    from lightning_phantom.nn import architecture
    from lightning_phantom.strategy.reshard import reshard_tensors

    p = 2
    ranks = run_ranks(p, _phantom_step)
    cost = gpt_cost(GPT_SHAPE, BATCH, SEQ, p, element_size=8, scheme="phantom", ghosts=ranks[0]["ghosts"])
    for rank in ranks:
        assert rank["loss"] < 1e-12
        assert len(rank["grads"]) == 6 + 20 * SHAPE["layers"] and rank["expected"] == 20 * SHAPE["layers"]
        assert max(rank["grads"].values()) < 1e-12, rank["grads"]
        assert rank["served"][:2] == ("Blocks", "Block") and rank["served"][2] < 1e-12
        assert rank["payloads"] == cost.payloads()
        assert (rank["sent"], rank["macs"], rank["params"]) == (cost.sent_bytes, cost.macs, cost.params)
    assert ranks[0]["ghosts"] == [4, 4, 4, 8] * SHAPE["layers"]  # "full": d/p, d/p, d/p, f/p

    # The record is plain data naming the app's classes; merged 2 -> 1 from a checkpoint's keys, the
    # stack is the dense GPT's blocks.
    record = ranks[0]["record"]
    torch.save(record, tmp_path / "record.pt")
    assert torch.load(tmp_path / "record.pt", weights_only=True) == record
    assert record["dense_type"] == "lightning_phantom.app.gpt.Blocks"
    out, new_records, ghosts = reshard_tensors({**ranks[0]["state"], **ranks[1]["state"]}, {"gpt.blocks": record},
                                               p, 2)
    assert ghosts == {"gpt.blocks": [8, 8, 8, 16] * SHAPE["layers"]}
    one = architecture.build(new_records["gpt.blocks"], (0, 1))
    one.load_state_dict({k: out[f"gpt.blocks.{k}"] for k in one.state_dict()}, assign=True)
    dense = _dense()
    merged = copy.deepcopy(dense)
    merged.blocks = one
    tokens, _ = _batch()
    with torch.no_grad():
        assert (merged(tokens) - dense(tokens)).abs().max().item() < 1e-12


def _autocast_step() -> dict:
    """One GPT step under bf16 autocast (float32 parameters), phantom (ghosts 2) and TP: what each sent,
    and what the app's recorder predicts for it from the precision."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_phantom as lp
    from lightning_phantom.app.language_model import GPTModule
    from lightning_phantom.app.recorder import element_sizes, predicted_cost
    from lightning_phantom.app.tensor_parallel import parallelize_gpt
    from lightning_phantom.cost.counting import CommCounter

    p = dist.get_world_size()
    sizes = element_sizes("bf16-mixed", 4)
    out = {"sizes": sizes}
    for scheme in ("phantom", "tp"):
        torch.manual_seed(0)
        module = GPTModule(**SHAPE)
        if scheme == "phantom":
            module.gpt.blocks = lp.to_phantom(module.gpt.blocks, ghosts=2, group=dist.group.WORLD)
        else:
            parallelize_gpt(module.gpt, init_device_mesh("cpu", (p,)))
        with CommCounter() as comm:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = module._loss(_batch())
            loss.backward()
        out[scheme] = {"calls": sorted((r.op, r.numel, r.element_size, r.phase) for r in comm.records),
                       "sent": comm.sent_bytes,
                       "predicted": predicted_cost(scheme, module, p, p, [BATCH, SEQ], *sizes)["sent_bytes"]}
    return out


def test_under_bf16_autocast_the_recorder_predicts_what_both_gpts_send():
    """Linears compute in bf16 (ghosts, TP's forward all-reduces: 2 bytes); the residual stream, the norms
    and the partial sums stay float32 (4 bytes): the entry and exit, the ghost-gradient reduce-scatters,
    the norm statistics, TP's backward all-reduces of the norms' output gradients."""
    d, rows, L = SHAPE["width"], BATCH * SEQ, SHAPE["layers"]
    for rank in run_ranks(2, _autocast_step):
        pp, tp = rank["phantom"], rank["tp"]
        for side in (pp, tp):
            assert side["sent"] == side["predicted"]
        assert tp["calls"] == sorted([("all_reduce", rows * d, 2, "forward")] * 2 * L
                                     + [("all_reduce", rows * d, 4, "backward")] * 2 * L)
        assert sorted({(op, e) for op, _, e, _ in pp["calls"]}) == [
            ("all_gather", 2), ("all_gather", 4), ("all_reduce", 4), ("reduce_scatter", 4)]
        assert [c for c in pp["calls"] if c[2] == 4 and c[0] == "all_gather"] == [
            ("all_gather", rows * d // 2, 4, "backward"), ("all_gather", rows * d // 2, 4, "forward")]
        assert rank["sizes"] == (2, 4)


def test_the_strategy_plans_the_gpt_blocks_as_one_stack():
    from lightning_phantom.app.language_model import GPTModule
    from lightning_phantom.nn.plan import PhantomPlan, plan_module

    with torch.device("meta"):
        module = GPTModule(**SHAPE)
    found = plan_module(module, PhantomPlan(ghosts=3), 2)
    (stack, dense), = found.stacks
    assert dense is module.gpt.blocks and not found.convert
    assert (stack.name, stack.layers, stack.heads, stack.ghosts, stack.norm_first, stack.final_norm) == (
        "gpt.blocks", SHAPE["layers"], SHAPE["heads"], (3,) * 4 * SHAPE["layers"], True, False)


def test_the_recorder_counts_a_compiled_model_eagerly(tmp_path):
    """``model.compile=true``: the counted steps run eagerly (the counters are dispatch modes, under which a
    ``fullgraph`` compiled block refuses to run) and count what the model says."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_phantom.app.cli import Plan
    from lightning_phantom.app.language_model import GPTModule
    from lightning_phantom.app.recorder import RunRecorder

    torch.manual_seed(0)
    module = GPTModule(**SHAPE)
    for block in module.gpt.blocks:
        block.compile(backend="eager", fullgraph=True)
    tokens = torch.randint(0, SHAPE["vocab"], (4 * BATCH, SEQ))
    data = DataLoader(TensorDataset(tokens, tokens.roll(-1, 1)), batch_size=BATCH)
    recorder = RunRecorder(Plan("single", 1, 1, 1, [], None), count_step=0, warmup_steps=0)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[recorder], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    rank, = recorder.result["per_rank"]
    assert rank["flops"] == 2 * recorder.result["predicted"]["macs"] == 2 * gpt_cost(GPT_SHAPE, BATCH, SEQ).macs
    assert rank["sent_bytes"] == "0" and len(recorder.result["train_curve"]) == 3


def test_blocks_that_are_not_the_apps_are_refused_with_the_reason():
    from dataclasses import replace

    import pytest
    from torch import nn

    import lightning_phantom as lp
    from lightning_phantom.app.gpt import Block, Blocks
    from lightning_phantom.app.gpt_blocks import build_block, read_block

    class OwnLinear(nn.Linear):
        pass

    block = Block(8, 2, 2)
    block.attn.q = OwnLinear(8, 8)
    with pytest.raises(ValueError, match=r"layers\[0\] \(the app's GPT Block\) cannot be converted to phantom form: "
                                         r"attn.q is OwnLinear, not nn.Linear"):
        lp.to_phantom(Blocks([block]), "auto")
    block = Block(8, 2, 2)
    block.mlp.act = nn.Softmax(-1)
    with pytest.raises(ValueError, match=r"layers\[0\].activation is Softmax.*must act on each element alone"):
        lp.to_phantom(Blocks([block]), "auto")
    parts = read_block(Block(8, 2, 2), "block")
    with pytest.raises(ValueError, match="do not make an app GPT Block: it is pre-norm, batch-first and causal only"):
        build_block(replace(parts, causal=False))
