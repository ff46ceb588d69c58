"""Transformer stacks under ``PhantomStrategy``: found and planned next to FFNs, compiled per block, and a
user's language model (nn.Embedding → nn.TransformerEncoder, causal → nn.Linear) trained on 2 CPU ranks:
its loss falls, it resumes exactly from a checkpoint, and ``to_dense`` gives back the user's classes with
the same predictions."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_phantom as lp
from lightning_phantom.nn.plan import PhantomPlan, StackPlan, plan_module
from conftest import run_ranks

V, D, H, FF, SEQ = 11, 16, 4, 32, 6


class Body(nn.Module):
    """A user's model: embedding, a causal transformer stack, a head, and an FFN beside them."""

    def __init__(self, heads: int = H, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, heads, FF, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D, V)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def test_stacks_are_found_and_planned_next_to_ffns():
    model = nn.Module()
    model.lm = Body()
    model.ffn = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model.odd = Body(heads=2)  # 2 heads do not split over 4 ranks: left dense, with the reason
    found = plan_module(model, PhantomPlan(ghosts="full"), 4)
    assert [plan.name for plan, _ in found.convert] == ["ffn"]
    (stack, module), = found.stacks
    assert module is model.lm.encoder
    assert stack == StackPlan("lm.encoder", D, H, FF, 2, 4, (4, 4, 4, 8) * 2, "svd", True, True, False)
    (name, why), = found.rejected_stacks
    assert name == "odd.encoder" and "nhead (2) is not divisible by the phantom group size (4)" in why

    named = plan_module(model, PhantomPlan(modules={"lm.encoder": {"ghosts": [1, 2, 3, 4] * 2, "init": "random"}}), 4)
    assert not named.convert and named.stacks[0][0].ghosts == (1, 2, 3, 4) * 2 and named.stacks[0][0].init == "random"
    with pytest.raises(ValueError, match="odd.encoder.*nhead .2. is not divisible"):
        plan_module(model, PhantomPlan(modules={"odd.encoder": {}}), 4)
    with pytest.raises(ValueError, match="ghosts=9 is too large for lm.encoder"):
        plan_module(model, PhantomPlan(ghosts=9), 2)
    alone = Body(heads=2)
    with pytest.raises(ValueError, match="(?s)nothing to shard.*transformer stacks.*encoder: .*nhead .2."):
        plan_module(alone, PhantomPlan(), 4)


def compiled_blocks_match_eager():
    """``compile_ffns`` (what ``compile=True`` runs) compiles each block as one graph, equal to eager, with
    batch-first attention and dropout (the transposed dropout mask) in training."""
    import torch._dynamo

    from lightning_phantom.nn.compiling import compile_ffns

    torch._dynamo.reset()
    stack = lp.to_phantom(Body().encoder, ghosts=2)
    compiled = copy.deepcopy(stack)
    names = compile_ffns(compiled, {"backend": "aot_eager", "fullgraph": True})
    x = torch.randn(3, SEQ, D)
    mask = nn.Transformer.generate_square_subsequent_mask(SEQ)
    explained = torch._dynamo.explain(copy.deepcopy(stack.layers[0]))(x[..., :D // 2], src_mask=mask, is_causal=True)
    out = []
    for module in (stack, compiled):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        y = module(xi, mask=mask)
        y.square().sum().backward()
        out.append((y.detach(), xi.grad, [p.grad for p in module.parameters()]))
    errors = [(a - b).abs().max().item() for a, b in zip(out[0][:2], out[1][:2])]
    errors.append(max((a - b).abs().max().item() for a, b in zip(out[0][2], out[1][2])))
    return names, (explained.graph_count, explained.graph_break_count), errors


def test_each_block_compiles_as_one_graph():
    for names, graphs, errors in run_ranks(2, compiled_blocks_match_eager, timeout=600):
        assert names == ["layers.0", "layers.1"] and graphs == (1, 0)
        assert max(errors) < 1e-5, errors


class NextToken(L.LightningModule):
    """How a user trains a language model: next-token cross-entropy with Adam; each step's loss kept."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        loss = F.cross_entropy(self(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def lightning_language_model(path: str):
    from torch.utils.data import DataLoader, TensorDataset

    class TinyLM(NextToken):
        def __init__(self):
            super().__init__()
            self.body = Body()

        def forward(self, tokens):
            return self.body(tokens)

    def trainer(steps, **kw):
        return L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(ghosts=2), max_steps=steps,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, use_distributed_sampler=False, **kw)

    g = torch.Generator().manual_seed(3)
    start, stride = torch.randint(0, V, (32, 1), generator=g), torch.randint(1, 3, (32, 1), generator=g)
    tokens = (start + stride * torch.arange(SEQ + 1)) % V  # each sequence counts up by 1 or 2
    # Every step sees the whole set, in order: a resumed fit replays the data of the uninterrupted one
    # whatever Lightning's epoch bookkeeping at the checkpoint (its sampler would shuffle each epoch, and a
    # plain DataLoader resumed at max_steps restarts its epoch).
    # Its own generator: a new epoch's iterator draws its seed from it, not from the global RNG.
    data = DataLoader(TensorDataset(tokens), batch_size=len(tokens), generator=torch.Generator().manual_seed(0))

    L.seed_everything(0)
    straight = TinyLM()
    run = trainer(12)
    run.fit(straight, data)
    kinds = (type(straight.body.encoder).__name__, type(straight.body.embed).__name__,
             type(straight.body.head).__name__)

    L.seed_everything(0)
    first = TinyLM()
    half = trainer(6)
    half.fit(first, data)
    half.save_checkpoint(path)
    L.seed_everything(1)  # a different start, and RNG state, until the checkpoint is loaded
    resumed = TinyLM()
    trainer(12).fit(resumed, data, ckpt_path=path)
    want, got = straight.state_dict(), resumed.state_dict()
    resume_err = max((want[k] - got[k]).abs().max().item() for k in want)

    dense = lp.to_dense(straight)
    straight.eval(), dense.eval()
    with torch.no_grad():
        dense_err = (dense(tokens) - straight(tokens)).abs().max().item()
    dense_kinds = (type(dense.body.encoder), type(dense.body.encoder.layers[0]), type(dense.body.embed),
                   type(dense.body.head), type(dense).__name__, dense.body.encoder.layers[0].self_attn.dropout)

    with trainer(2, precision="bf16-mixed").init_module(empty_init=True):
        low = TinyLM()  # built on the meta device: the stack is sharded straight from it
    trainer(2, precision="bf16-mixed").fit(low, data)
    return {"losses": straight.losses, "kinds": kinds, "resume_err": resume_err, "dense_err": dense_err,
            "dense_kinds": dense_kinds, "resumed_losses": resumed.losses, "bf16_losses": low.losses}


def test_user_language_model_trains_resumes_and_serves_dense(tmp_path):
    results = run_ranks(2, lightning_language_model, str(tmp_path / "lm.ckpt"), timeout=600)
    for r in results:
        assert r["kinds"] == ("PhantomTransformerEncoder", "Embedding", "Linear")
        losses = r["losses"]
        assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
        assert r["resumed_losses"] == losses[6:]  # the steps after the checkpoint, exactly
        assert r["resume_err"] == 0
        assert r["dense_kinds"] == (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.Embedding, nn.Linear,
                                    "TinyLM", 0.1)
        assert r["dense_err"] < 1e-5
        assert len(r["bf16_losses"]) == 2 and all(0 < x < 10 for x in r["bf16_losses"])
    assert results[0]["losses"] == results[1]["losses"]  # the loss is the same on both ranks


def stacks_the_strategy_keeps_leaves_and_shares():
    """A user's own phantom stack (built in configure_model on the strategy's group) is kept; a stack that
    cannot be split is left dense with a warning and trained as a replicated module; one FFN reached by
    two names becomes one shard."""
    import warnings

    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    class Mixed(NextToken):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            one_head = nn.TransformerEncoderLayer(D, 1, FF, dropout=0.0, batch_first=True)
            # 1 head does not split over 2 ranks: this stack stays dense
            self.odd = nn.TransformerEncoder(one_head, 1, enable_nested_tensor=False)
            ffn = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, D))
            self.ffn, self.inner = ffn, nn.Module()
            self.inner.ffn = ffn  # the same module under a second name
            self.head = nn.Linear(D, V)

        def configure_model(self):
            if hasattr(self, "stack"):  # configure_model runs for every fit/validate/...
                return
            group = self.device_mesh["phantom_parallel"].get_group()
            layer = lp.PhantomTransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, ghosts=2,
                                                      group=group, causal=True)
            self.stack = lp.PhantomTransformerEncoder(layer, 2)

        def forward(self, tokens):
            x = self.stack(self.odd(self.embed(tokens)))
            return self.head(self.ffn(x) + self.inner.ffn(x))

    L.seed_everything(0)
    tokens = torch.arange(SEQ + 1).repeat(16, 1) % V
    model, strategy = Mixed(), lp.PhantomStrategy()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=10, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(TensorDataset(tokens), batch_size=16))
    odd = torch.cat([p.detach().flatten() for p in model.odd.parameters()])
    everyone = [torch.empty_like(odd) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, odd)
    return {"warnings": [str(w.message) for w in caught if "leaves" in str(w.message)],
            "odd": type(model.odd), "odd_equal": all(torch.equal(o, everyone[0]) for o in everyone),
            "odd_trained": any(p.grad is not None for p in model.odd.parameters()),
            "stack": type(model.stack).__name__, "shared": model.ffn is model.inner.ffn,
            "ffn": type(model.ffn).__name__, "converted": dict(strategy.converted_modules),
            "losses": model.losses}


def test_a_user_s_own_stack_is_kept_one_that_cannot_split_stays_dense_and_a_shared_ffn_stays_shared():
    results = run_ranks(2, stacks_the_strategy_keeps_leaves_and_shares, timeout=300)
    (warned,) = results[0]["warnings"]  # said once, by rank 0, with the reason and what to do
    assert warned.startswith("PhantomStrategy leaves odd dense: odd.layers[0]: nhead (1) is not divisible "
                             "by the phantom group size (2)"), warned
    assert "Choose nhead a multiple of 2" in warned, warned
    assert results[1]["warnings"] == []
    for r in results:
        assert r["odd"] is nn.TransformerEncoder and r["odd_trained"]
        assert r["odd_equal"]  # the dense stack's copies stay equal on every rank
        assert r["stack"] == "PhantomTransformerEncoder"
        assert r["converted"]["stack"] == "user-built PhantomTransformerEncoder, 2 layers"
        assert r["shared"] and r["ffn"] == "PhantomFFN"
        assert "(shared)" in r["converted"]["inner.ffn"] and "(svd)" in r["converted"]["ffn"]
        assert sorted(r["converted"]) == ["ffn", "inner.ffn", "stack"]
        assert sum(r["losses"][-3:]) < 0.8 * sum(r["losses"][:3]), r["losses"]
