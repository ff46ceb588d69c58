"""Converting transformer stacks: SVD (Eckart–Young per linear), exact re-sharding, to_dense, meta, refusals.

docs/operator.md §10.7. Sizes as in test_transformer.py (d = 16, h = 4, f = 32, 2 layers).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning_phantom as lp
from lightning_phantom.nn import PhantomSelfAttention, PhantomTransformerEncoder, PhantomTransformerEncoderLayer
from lightning_phantom.nn.convert import gather_shards
from lightning_phantom.nn.convert_transformer import check_stack_divisible, read_stack
from lightning_phantom.nn.layers import set_group
from conftest import run_ranks
from test_transformer import D, F_, H, L, N, causal, dense_stack, inputs


def svd_errors_and_meta():
    """Output error of the SVD conversion for growing ghosts; a meta-device stack converted."""
    dense = dense_stack(norm_first=True, final_norm=True).eval()
    x, padding, _ = inputs(batch_first=False)
    want = dense(x, mask=causal(), src_key_padding_mask=padding)
    errors = []
    for ghosts in (1, 2, 4, "full"):  # a rank holds d/p = 8 features
        phantom = lp.to_phantom(dense, ghosts=ghosts).eval()
        errors.append((phantom(x, mask=causal(), src_key_padding_mask=padding) - want)[~padding.t()].abs().max()
                      .item())
    with torch.device("meta"):
        meta = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, F_, dtype=torch.float64), 2,
                                     enable_nested_tensor=False)
    shards = lp.to_phantom(meta, ghosts=3)  # init="svd" asked, but there are no weights: random, on meta
    on_meta = all(t.is_meta for t in shards.parameters())
    shards.to_empty(device="cpu")
    for layer in shards.layers:
        layer.reset_parameters()
    y = shards(x)
    return errors, on_meta, bool(torch.isfinite(y).all()), y.std().item(), shards.ghosts


def test_svd_error_falls_as_ghosts_grow_and_is_zero_at_full():
    for errors, on_meta, finite, spread, ghosts in run_ranks(2, svd_errors_and_meta):
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 1e-2 and errors[-1] < 1e-10
        assert on_meta and finite and spread > 0.1
        assert ghosts == [3] * 8


def merge_and_back():
    """A genuine phantom stack (ghosts 2) merged 4 → 2 → 1 and 4 → 1, and to_dense."""
    rank = dist.get_rank()
    dense = dense_stack(norm_first=True, activation="gelu", batch_first=True, dropout=0.15, final_norm=True).eval()
    phantom = lp.to_phantom(dense, ghosts=2).eval()
    x, padding, _ = inputs(batch_first=True)
    kw = dict(mask=causal(), src_key_padding_mask=padding)
    y4 = phantom(x, **kw)
    shards4 = gather_shards(phantom)
    shards2 = lp.merge_shards(shards4, 2)
    pair = dist.new_group([0, 1])
    out = {"ghosts2": shards2[0].ghosts}
    if rank < 2:
        out["err2"] = (set_group(shards2[rank], pair)(x, **kw) - y4).abs().max().item()
    one = lp.merge_shards(shards2, 2)[0]
    out["err1"] = (one(x, **kw) - y4).abs().max().item()
    out["err1_direct"] = (lp.merge_shards(shards4, 4)[0](x, **kw) - y4).abs().max().item()
    back = lp.to_dense(phantom)
    out["dense_err"] = (back(x, **kw) - y4).abs().max().item()
    out["types"] = (type(back), type(back.layers[0]), type(back.norm), back.training)
    layer = back.layers[0]
    out["config"] = (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                     layer.self_attn.dropout, layer.dropout.p, layer.dropout1.p, layer.activation, layer.norm1.eps,
                     layer.self_attn.batch_first, layer.norm_first, back.enable_nested_tensor, back.norm.eps)
    return out


def test_merge_four_to_two_to_one_and_to_dense():
    for rank, res in enumerate(run_ranks(4, merge_and_back)):
        assert res["ghosts2"] == [4] * 8
        assert res["err1"] < 1e-12 and res["err1_direct"] < 1e-12 and res["dense_err"] < 1e-12
        if rank < 2:
            assert res["err2"] < 1e-12
        assert res["types"] == (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.LayerNorm, False)
        assert res["config"] == (D, H, F_, 0.15, 0.15, 0.15, F.gelu, 1e-5, True, True, False, 1e-6)


def round_trip():
    """to_dense(to_phantom(dense, "full")) gives back the dense weights: the QKV permutation is undone."""
    dense = dense_stack(bias=False, activation=nn.GELU(approximate="tanh"))
    back = lp.to_dense(lp.to_phantom(dense, ghosts="full"))
    want, got = dense.state_dict(), back.state_dict()
    return sorted(want) == sorted(got), max((want[k] - got[k]).abs().max().item() for k in want), \
        type(back.layers[1].activation).__name__


def test_to_dense_round_trip_is_exact():
    for same_keys, err, activation in run_ranks(2, round_trip):
        assert same_keys and err < 1e-12 and activation == "GELU"


class MyLayer(nn.TransformerEncoderLayer):
    pass


def _stack(layer: nn.Module) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _with_attention(**kw) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(D, H, F_)
    layer.self_attn = nn.MultiheadAttention(D, H, **kw)
    return _stack(layer)


@pytest.mark.parametrize("build, exc, words", [
    (lambda: read_stack(_with_attention(kdim=8, vdim=8)), ValueError, ["module.layers[0]", "kdim/vdim (8/8)"]),
    (lambda: read_stack(_with_attention(add_bias_kv=True)), ValueError, ["module.layers[0]", "add_bias_kv"]),
    (lambda: read_stack(_with_attention(add_zero_attn=True)), ValueError, ["add_zero_attn"]),
    (lambda: read_stack(_stack(nn.TransformerEncoderLayer(D, H, F_, activation=lambda t: t.softmax(-1)))),
     ValueError, ["module.layers[0].activation", "element"]),
    (lambda: read_stack(_stack(MyLayer(D, H, F_))), ValueError, ["MyLayer", "register_dense_block"]),
    (lambda: check_stack_divisible(read_stack(_stack(nn.TransformerEncoderLayer(D, H, 30)))[1], 4, "enc"),
     ValueError, ["enc.layers[0]", "dim_feedforward (30)", "divisible", "(4)"]),
    (lambda: PhantomTransformerEncoderLayer(D, H, F_, shard=(0, 3)), ValueError, ["nhead (4)", "size (3)", "4 % 3"]),
    (lambda: PhantomSelfAttention(D, 5, shard=(0, 1)), ValueError, ["d_model (16)", "nhead (5)"]),
    (lambda: PhantomTransformerEncoderLayer(D, H, F_, ghosts=9, shard=(0, 2)), ValueError, ["ghosts=9", "= 8"]),
    (lambda: lp.to_phantom(_stack(nn.TransformerEncoderLayer(D, H, F_)), 1, init="pca"), ValueError, ["'pca'"]),
])
def test_unconvertible_stacks_are_refused_with_the_reason(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for word in words:
        assert word in str(info.value), str(info.value)


def _phantom():
    layer = PhantomTransformerEncoderLayer(D, H, F_, dropout=0.0, shard=(0, 1))
    return PhantomTransformerEncoder(layer, 2)


@pytest.mark.parametrize("call, exc, words", [
    (lambda s: s(torch.randn(L, N, D), mask=torch.zeros(L + 1, L)), ValueError, ["attn_mask", "(5, 5)", "(6, 5)"]),
    (lambda s: s(torch.randn(L, N, D), src_key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(3, 5)", "(3, 6)"]),
    (lambda s: s(torch.randn(L, N, D), is_causal=True), RuntimeError, ["is_causal", "generate_square_subsequent"]),
    (lambda s: s(torch.randn(L, N, D + 1)), ValueError, ["(..., 16)", "(5, 3, 17)"]),
])
def test_bad_calls_are_clear_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call(_phantom())
    for word in words:
        assert word in str(info.value), str(info.value)
