"""The phantom operator against the dense model it stands for (docs/operator.md §9)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_phantom as lp
import lightning_phantom.nn as lpnn
from lightning_phantom.nn.layers import PhantomLinear
from conftest import run_ranks

SIZES = [6, 8, 12, 8, 3]  # column 6→8, phantom 8→12 and 12→8, row 8→3


def dense_from_formula(ffn: lp.PhantomFFN) -> list[torch.Tensor]:
    """W of every Linear, assembled here from the gathered shards exactly as docs/operator.md §2 writes it:
    W_ii = L_i, W_ij = D_ij C_j (an independent check of to_dense/merge_shards)."""
    shards = lpnn.gather_shards(ffn)
    p = len(shards)
    weights = []
    for idx, layer in enumerate(ffn):
        parts = [s[idx] for s in shards]
        if isinstance(layer, lp.ColumnParallelLinear):
            weights.append(torch.cat([s.weight for s in parts]))
        elif isinstance(layer, lp.RowParallelLinear):
            weights.append(torch.cat([s.weight for s in parts], dim=1))
        elif isinstance(layer, PhantomLinear):
            k = layer.ghosts
            rows = []
            for i in range(p):
                row = []
                for j in range(p):
                    if i == j:
                        row.append(parts[i].weight)
                    else:
                        col = j if j < i else j - 1
                        row.append(parts[i].decompress[:, col * k:(col + 1) * k] @ parts[j].compress)
                rows.append(torch.cat(row, dim=1))
            weights.append(torch.cat(rows))
    return weights


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, SIZES[0], generator=g, dtype=dtype),  # odd batch
            torch.randn(1, SIZES[0], generator=g, dtype=dtype),  # batch 1
            torch.randn(3, 7, SIZES[0], generator=g, dtype=dtype)]  # B×T×d


def forward_matches_dense(dtype, activation):
    torch.manual_seed(0)
    ffn = lp.PhantomFFN(SIZES, ghosts=2, activation=activation, dtype=dtype)
    dense = lp.to_dense(ffn)
    assert isinstance(dense, nn.Sequential) and len(dense) == len(ffn)
    formula = dense_from_formula(ffn)
    dense_w = [m.weight for m in dense if isinstance(m, nn.Linear)]
    w_err = max((a - b).abs().max().item() for a, b in zip(formula, dense_w))
    out = []
    for x in _inputs(dtype):
        y, ref = ffn(x), dense(x)
        assert y.shape == ref.shape == (*x.shape[:-1], SIZES[-1])
        out.append(((y - ref).norm() / ref.norm()).item())
    return max(out), w_err, type(dense[1]).__name__


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_equals_dense_model(p, dtype, tol):
    activation = "gelu" if p == 2 else "relu"
    results = [forward_matches_dense(dtype, activation)] if p == 1 else run_ranks(p, forward_matches_dense, dtype,
                                                                                      activation)
    for rel_err, w_err, act in results:
        assert rel_err < tol
        assert w_err < tol
        assert act == ("GELU" if p == 2 else "ReLU")


def finite_difference_check(overlap: bool, h: float = 1e-6):
    """Every parameter entry on every rank, and the input: analytic vs central differences."""
    rank, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ffn = lp.PhantomFFN(SIZES, ghosts=2, activation="tanh", dtype=torch.float64, overlap=overlap)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, SIZES[0], dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, SIZES[-1], dtype=torch.float64, generator=g)

    def loss():
        return (ffn(x) * r).sum()

    loss().backward()
    worst = 0.0
    params = list(ffn.named_parameters())
    with torch.no_grad():
        for owner in range(p):  # one rank perturbs, all run the forward
            for name, param in params:
                for idx in range(param.numel()):
                    flat = param.view(-1)
                    if rank == owner:
                        flat[idx] += h
                    up = loss().item()
                    if rank == owner:
                        flat[idx] -= 2 * h
                    down = loss().item()
                    if rank == owner:
                        flat[idx] += h
                        fd = (up - down) / (2 * h)
                        worst = max(worst, abs(fd - param.grad.view(-1)[idx].item()) / max(1.0, abs(fd)))
        flat_x = x.view(-1)
        for idx in range(x.numel()):  # the input is replicated: every rank perturbs it
            flat_x[idx] += h
            up = loss().item()
            flat_x[idx] -= 2 * h
            down = loss().item()
            flat_x[idx] += h
            fd = (up - down) / (2 * h)
            worst = max(worst, abs(fd - x.grad.view(-1)[idx].item()) / max(1.0, abs(fd)))
    checked = sum(param.numel() for _, param in params)
    return worst, checked


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("overlap", [True, False])
def test_gradients_match_finite_differences(p, overlap):
    results = run_ranks(p, finite_difference_check, overlap)
    for worst, checked in results:
        assert checked > 50
        assert worst < 1e-7


def svd_conversion(ghosts: int):
    p = dist.get_world_size()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    ffn = lp.to_phantom(dense, ghosts=ghosts)
    back = lp.to_dense(ffn)
    x = torch.randn(4, 6, dtype=torch.float64)
    out_err = (ffn(x) - dense(x)).abs().max().item()
    w, approx = dense[2].weight.detach(), back[2].weight.detach()
    a = 8 // p
    errors = []
    for j in range(p):  # each source rank's stacked off-diagonal column block M_j
        rows = [i for i in range(p) if i != j]
        m = torch.cat([w[i * a:(i + 1) * a, j * a:(j + 1) * a] for i in rows])
        m_k = torch.cat([approx[i * a:(i + 1) * a, j * a:(j + 1) * a] for i in rows])
        s = torch.linalg.svdvals(m)
        errors.append(((m - m_k).norm().item(), s[ghosts:].square().sum().sqrt().item(),
                       torch.linalg.matrix_norm(m - m_k, ord=2).item(), s[ghosts].item() if ghosts < len(s) else 0.0))
    diag_err = max((w[i * a:(i + 1) * a, i * a:(i + 1) * a] - approx[i * a:(i + 1) * a, i * a:(i + 1) * a]).abs().max()
                   .item() for i in range(p))
    ends_err = max((dense[i].weight - back[i].weight).abs().max().item() for i in (0, 4))
    return out_err, errors, diag_err, ends_err


@pytest.mark.parametrize("p", [2, 4])
def test_svd_conversion_is_eckart_young(p):
    a = 8 // p
    for rank_result in run_ranks(p, svd_conversion, a):  # ghosts = a: exact
        out_err, errors, diag_err, ends_err = rank_result
        assert out_err < 1e-12 and diag_err == 0 and ends_err == 0
        assert all(frob < 1e-12 for frob, *_ in errors)
    for rank_result in run_ranks(p, svd_conversion, 1):  # one ghost: error = discarded spectrum
        out_err, errors, diag_err, ends_err = rank_result
        assert out_err > 1e-3 and diag_err == 0 and ends_err == 0
        for frob, discarded, spectral, next_sv in errors:
            assert discarded > 1e-3
            assert frob == pytest.approx(discarded, rel=1e-10)
            assert spectral == pytest.approx(next_sv, rel=1e-10)


def merge_four_two_one():
    rank = dist.get_rank()
    torch.manual_seed(0)
    ffn = lp.PhantomFFN(SIZES, ghosts=[1, 2], activation="silu", dtype=torch.float64)
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y4 = ffn(x)
    shards4 = lpnn.gather_shards(ffn)
    shards2 = lp.merge_shards(shards4, 2)
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    result = {"ghosts2": shards2[0].ghosts}
    if rank < 2:
        half = lpnn.set_group(shards2[rank], pair)
        result["err2"] = (half(x) - y4).abs().max().item()
    one_from_two = lp.merge_shards(shards2, 2)[0]
    one_from_four = lp.merge_shards(shards4, 4)[0]
    result["err1"] = (one_from_two(x) - y4).abs().max().item()
    result["err1_direct"] = (one_from_four(x) - y4).abs().max().item()
    result["params1"] = sum(t.numel() for t in one_from_two.parameters())
    return result


def test_merge_four_to_two_to_one():
    results = run_ranks(4, merge_four_two_one)
    for rank, res in enumerate(results):
        assert res["ghosts2"] == [2, 4]
        assert res["err1"] < 1e-12 and res["err1_direct"] < 1e-12
        dense_params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
        assert res["params1"] == dense_params  # one shard is the dense model: no compressors left
        if rank < 2:
            assert res["err2"] < 1e-12


def dtypes_and_autocast():
    torch.manual_seed(0)
    ffn = lp.PhantomFFN(SIZES, ghosts=2, dtype=torch.float64)
    x = torch.randn(4, SIZES[0], dtype=torch.float64)
    ref = ffn(x)
    bf = ffn.to(torch.bfloat16)(x.to(torch.bfloat16))
    ffn32 = ffn.to(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn32(x.float())
    y.float().sum().backward()
    grad_dtypes = {p.grad.dtype for p in ffn32.parameters()}
    rel = lambda out: ((out.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    return rel(bf), rel(y), bf.dtype, grad_dtypes


def test_bfloat16_and_autocast():
    for bf_err, ac_err, bf_dtype, grad_dtypes in run_ranks(2, dtypes_and_autocast):
        assert bf_dtype == torch.bfloat16
        assert bf_err < 3e-2 and ac_err < 3e-2
        assert grad_dtypes == {torch.float32}  # autocast: fp32 parameters keep fp32 gradients


def group_mismatch():
    ffn = lp.PhantomFFN(SIZES, ghosts=2, shard=(dist.get_rank(), 4))
    try:
        ffn(torch.randn(2, SIZES[0]))
    except RuntimeError as e:
        return str(e)
    return None


def test_group_that_disagrees_with_shards_is_an_error():
    for msg in run_ranks(2, group_mismatch):
        assert msg is not None and "of 4" in msg and "size 2" in msg


@pytest.mark.parametrize("build, exc, words", [
    (lambda: lp.PhantomFFN([6, 9, 8, 3], 2, shard=(0, 2)), ValueError, ["(9)", "divisible", "2"]),
    (lambda: lp.PhantomFFN([6, 8, 8, 3], 0, shard=(0, 2)), ValueError, ["ghosts", "got 0", "= 4"]),
    (lambda: lp.PhantomFFN([6, 8, 8, 3], 5, shard=(0, 2)), ValueError, ["ghosts", "got 5", "= 4"]),
    (lambda: lp.PhantomFFN([6, 8, 3], 1), ValueError, ["at least 3 linear layers"]),
    (lambda: lp.to_phantom(nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 4), nn.Linear(4, 2)), 1),
     ValueError, ["module[1]", "Softmax", "element-wise", "residual"]),
    (lambda: lp.to_phantom(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(6), nn.Linear(4, 4), nn.Linear(4, 2)), 1),
     ValueError, ["module[1]", "LayerNorm", "6 features", "gives 4"]),
    (lambda: lp.to_phantom(nn.Linear(4, 4), 1), TypeError, ["nn.Sequential", "Linear"]),
    (lambda: lp.to_phantom(nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 4), nn.Linear(4, 2)), 1),
     ValueError, ["module[1]", "5", "4"]),
    (lambda: lp.PhantomFFN([6, 8, 8, 3], 1)(torch.randn(2, 5)), ValueError, ["(..., 6)", "(2, 5)"]),
    (lambda: lp.PhantomFFN([6, 8, 8, 3], 1)(torch.randn(2, 6, dtype=torch.float64)), TypeError,
     ["float64", "float32"]),
    (lambda: lp.PhantomFFN([6, 8, 8, 3], 1, shard=(1, 2))(torch.randn(2, 6)), RuntimeError, ["not initialised"]),
])
def test_bad_input_is_a_clear_error(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for word in words:
        assert word in str(info.value)
