"""Norms between sharded layers and nested FFNs against the dense model they come from."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_phantom as lp
from lightning_phantom.cost.model import phantom_cost
from lightning_phantom.nn import gather_shards, sharded_parameters
from lightning_phantom.nn.convert import _dense_sequential
from lightning_phantom.nn.norms import PhantomNorm
from conftest import run_ranks

WIDTH = 8


def nested_dense(seed: int = 0, batchnorm: bool = True, dropout: bool = False) -> nn.Sequential:
    """Blocks of Linear → norm → activation, as people write MLPs, with non-trivial norm tensors."""
    torch.manual_seed(seed)
    third = nn.BatchNorm1d(WIDTH) if batchnorm else nn.LayerNorm(WIDTH, bias=False)
    dense = nn.Sequential(
        nn.LayerNorm(5),  # on the replicated input: stays a dense, replicated module
        nn.Sequential(nn.Linear(5, WIDTH), nn.LayerNorm(WIDTH), nn.GELU(), *([nn.Dropout(0.2)] if dropout else [])),
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.RMSNorm(WIDTH), nn.SiLU()),
        nn.Sequential(nn.Linear(WIDTH, WIDTH), third, nn.Tanh()),
        nn.Linear(WIDTH, 3),
    ).double()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)):
                for t in m.parameters():
                    t.copy_(torch.randn_like(t))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return dense


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def matches_dense():
    p = dist.get_world_size()
    dense = nested_dense()
    ffn = lp.to_phantom(dense, ghosts=WIDTH // p)  # "full": exact
    kinds = sorted({type(m).__name__ for m in ffn.modules() if isinstance(m, PhantomNorm)})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    train_err = (ffn(x) - dense(x)).abs().max().item()  # batch statistics; updates running ones alike
    ffn.eval(), dense.eval()
    eval_err = (ffn(x) - dense(x)).abs().max().item()
    back = lp.to_dense(ffn)  # the user's structure and keys, and the updated running statistics
    same_type = [type(m) for m in back.modules()] == [type(m) for m in dense.modules()]
    dense_err = _max_diff(back.state_dict(), dense.state_dict())
    one = lp.merge_shards(gather_shards(ffn), p)[0]
    merged_err = _max_diff(one.state_dict(), ffn.state_dict()) if p == 1 else None
    halves = lp.merge_shards(gather_shards(ffn), p // 2) if p > 2 else []
    twice = lp.merge_shards(halves, 2)[0] if halves else one
    merge_err = _max_diff(_dense_sequential(twice).state_dict(), dense.state_dict())
    # One shard of the whole model, run inside the p-rank world, sums its statistics alone.
    one_err = (one(x) - dense(x)).abs().max().item()
    return train_err, eval_err, same_type, dense_err, merge_err, one_err, kinds, list(ffn.state_dict())


@pytest.mark.parametrize("p", [2, 4])
def test_norm_ffn_equals_dense_model(p):
    keys_dense = list(nested_dense().state_dict())
    for train_err, eval_err, same_type, dense_err, merge_err, one_err, kinds, keys in run_ranks(p, matches_dense):
        assert kinds == ["PhantomBatchNorm1d", "PhantomLayerNorm", "PhantomRMSNorm"]
        assert train_err < 1e-10 and eval_err < 1e-10
        assert same_type and dense_err < 1e-10 and merge_err < 1e-10 and one_err < 1e-10
        # The phantom model's keys are the dense model's, plus each phantom layer's compressors.
        assert [k for k in keys if not k.endswith(("compress", "decompress"))] == keys_dense


def token_inputs_match():
    """(batch, tokens, features) through LayerNorm/RMSNorm FFNs, float32 and float64."""
    p = dist.get_world_size()
    out = []
    for dtype in (torch.float64, torch.float32):
        dense = nested_dense(batchnorm=False).to(dtype)
        ffn = lp.to_phantom(dense, ghosts=WIDTH // p)
        x = torch.randn(2, 7, 5, dtype=dtype, generator=torch.Generator().manual_seed(4))
        ref = dense(x)
        out.append(((ffn(x) - ref).norm() / ref.norm()).item())
    return out


def test_token_inputs_match_dense():
    for f64, f32 in run_ranks(2, token_inputs_match):
        assert f64 < 1e-10 and f32 < 1e-5


def finite_differences(h: float = 1e-6):
    """Every parameter on every rank, and the replicated input, against central differences."""
    rank, p = dist.get_rank(), dist.get_world_size()
    ffn = lp.to_phantom(nested_dense(seed=1), ghosts=2, init="random")  # BatchNorm in training mode
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(4, 3, dtype=torch.float64, generator=g)

    def loss():
        return (ffn(x) * r).sum()

    loss().backward()
    worst, checked = 0.0, 0
    sharded = {id(t) for t in sharded_parameters(ffn)}
    with torch.no_grad():
        for owner in range(p):  # one rank perturbs its shard, all run the forward
            for name, param in ffn.named_parameters():
                # A replicated parameter is one value held by every rank: all perturb it, once.
                mine = rank == owner if id(param) in sharded else owner == 0
                flat = param.view(-1)
                for idx in range(param.numel() if id(param) in sharded or owner == 0 else 0):
                    if mine:
                        flat[idx] += h
                    up = loss().item()
                    if mine:
                        flat[idx] -= 2 * h
                    down = loss().item()
                    if mine:
                        flat[idx] += h
                        fd = (up - down) / (2 * h)
                        worst = max(worst, abs(fd - param.grad.view(-1)[idx].item()) / max(1.0, abs(fd)))
                        checked += "norm" in type(ffn.get_submodule(name.rpartition(".")[0])).__name__.lower()
        flat_x = x.view(-1)
        for idx in range(x.numel()):  # replicated: every rank perturbs it
            flat_x[idx] += h
            up = loss().item()
            flat_x[idx] -= 2 * h
            down = loss().item()
            flat_x[idx] += h
            fd = (up - down) / (2 * h)
            worst = max(worst, abs(fd - x.grad.view(-1)[idx].item()) / max(1.0, abs(fd)))
    return worst, checked


def test_norm_gradients_match_finite_differences():
    for worst, norm_entries in run_ranks(2, finite_differences):
        # Per rank: the replicated input LayerNorm (10), then LayerNorm 4+4, RMSNorm 4, BatchNorm 4+4.
        assert norm_entries == 10 + 8 + 4 + 8
        assert worst < 1e-7


def counted_norm_step(rows: int):
    from lightning_phantom.cost.counting import CommCounter

    p = dist.get_world_size()
    dense = nested_dense()[1:].float()  # no norm on the input: every collective is the FFN's
    ffn = lp.to_phantom(dense, ghosts=1, init="random")
    x = torch.randn(rows, 5)
    with CommCounter() as comm:
        ffn(x).square().sum().backward()
    params = sum(t.numel() for t in ffn.parameters())
    return sorted((r.op, r.numel, r.phase) for r in comm.records), comm.sent_bytes, params, p


@pytest.mark.parametrize("p", [2, 4])
def test_counted_norm_bytes_equal_model(p):
    rows = 5
    cost = phantom_cost([5, WIDTH, WIDTH, WIDTH, 3], p, 1, rows, 4,
                        norms={1: "layernorm", 2: "rmsnorm", 3: "batchnorm"})
    plain = phantom_cost([5, WIDTH, WIDTH, WIDTH, 3], p, 1, rows, 4)
    for payloads, sent, params, _ in run_ranks(p, counted_norm_step, rows):
        assert payloads == cost.payloads()
        assert sent == cost.sent_bytes
        assert params == cost.params
    # One all-reduce of 2 values per row for LayerNorm, 1 for RMSNorm, each way; BatchNorm none.
    assert cost.sent_bytes - plain.sent_bytes == 2 * (2 * (p - 1) * rows * (2 + 1) * 4) / p


# ------------------------------------------------------------- in a Trainer


def trainer_round_trip(path: str):
    import copy

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nested_dense(dropout=True)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return (self(batch[0]) - batch[1]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log("val", (self(batch[0]) - batch[1]).square().mean(), sync_dist=True)

        def predict_step(self, batch, batch_idx):
            return self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(ghosts="full"),
                         precision="64-true", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **kw)

    L.seed_everything(0)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    model = Model()
    dense = copy.deepcopy(model.net).eval()
    preds = torch.cat(trainer().predict(model, DataLoader(TensorDataset(x), batch_size=8)))
    predict_err = (preds - dense(x)).abs().max().item()
    converted = type(model.net).__name__
    fit = trainer(max_steps=3)
    fit.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    fit.save_checkpoint(path)
    saved = {k: v.clone() for k, v in model.net.state_dict().items()}
    L.seed_everything(1)
    fresh = Model()
    trainer(max_steps=3).validate(fresh, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=path,
                                  verbose=False)
    restored = fresh.net.state_dict()
    resume_err = max((saved[k].double() - restored[k].double()).abs().max().item() for k in saved)
    moved = {k for k in saved if "running" in k}
    return converted, predict_err, resume_err, sorted(moved)


def test_trainer_shards_norm_ffn_predicts_dense_and_resumes(tmp_path):
    path = str(tmp_path / "norms.ckpt")
    results = run_ranks(2, trainer_round_trip, path)
    for converted, predict_err, resume_err, moved in results:
        assert converted == "PhantomFFN"
        assert predict_err < 1e-10
        assert resume_err == 0  # every shard's tensors and BatchNorm's running statistics
        assert moved == ["3.1.running_mean", "3.1.running_var"]
