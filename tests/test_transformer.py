"""Phantom transformer stacks against torch's dense ``nn.TransformerEncoder`` (docs/operator.md §10).

Sizes are tiny (d = 16, h = 4, f = 32, 2 layers, 5 tokens, batch 3) and everything is float64,
so "equal" means to 1e-10. At ``ghosts="full"`` a phantom stack IS the dense stack, split; in
training mode, from the same RNG state, its dropout masks are the dense ones.

Padded positions: with a key-padding mask the phantom stack computes at a padded query
position what torch's ordinary path computes there (that query attends to the unpadded keys).
torch's nested-tensor fast path (eval, no grad, ``enable_nested_tensor``) writes zeros there
instead, so only the positions that are not padding are compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_phantom as lp
from lightning_phantom.nn import PhantomTransformerEncoder
from conftest import run_ranks

D, H, F_, LAYERS, L, N = 16, 4, 32, 2, 5, 3


def dense_stack(norm_first=False, activation="relu", batch_first=False, dropout=0.0, final_norm=False,
                bias=True, seed=0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, H, F_, dropout=dropout, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first, bias=bias, dtype=torch.float64)
    norm = nn.LayerNorm(D, eps=1e-6, dtype=torch.float64) if final_norm else None
    stack = nn.TransformerEncoder(layer, LAYERS, norm=norm, enable_nested_tensor=False)
    with torch.no_grad():  # layers differ, and norms and biases are not at their 1/0 start
        for p in stack.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return stack


def inputs(batch_first: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (N, L, D) if batch_first else (L, N, D)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, 3:] = True  # sequence 0 has 3 tokens, sequence 2 has 4
    padding[2, 4:] = True
    return x, padding, g


def causal(dtype=torch.float64):
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)


# name: (stack settings, call settings, training)
CASES = {
    "post-relu-seq": (dict(), dict(), False),
    "pre-gelu-batch-causal": (dict(norm_first=True, activation="gelu", batch_first=True), dict(mask="causal"), False),
    "post-gelu-batch-is_causal-dropout": (dict(activation="gelu", batch_first=True, dropout=0.2),
                                         dict(mask="causal", is_causal=True), True),
    "pre-relu-seq-padding-final_norm": (dict(norm_first=True, final_norm=True), dict(padding="bool"), False),
    "pre-batch-head_mask-padding-dropout": (dict(norm_first=True, batch_first=True, dropout=0.2),
                                            dict(mask="heads", padding="float"), True),
    "post-seq-bool_causal-padding-dropout": (dict(dropout=0.2), dict(mask="bool_causal", padding="bool"), True),
    "pre-nobias-gelu_tanh-causal_hint": (dict(norm_first=True, bias=False, activation=nn.GELU(approximate="tanh")),
                                         dict(mask="causal", is_causal=True), False),
    "post-batch-unbatched-causal-padding-dropout": (dict(batch_first=True, dropout=0.2),
                                                   dict(mask="causal", padding="bool", unbatched=True), True),
}


def call_args(settings: dict, batch_first: bool, seed: int = 1):
    x, padding, g = inputs(batch_first, seed)
    kw = {}
    mask = settings.get("mask")
    if mask == "causal":
        kw["mask"] = causal()
    elif mask == "bool_causal":
        kw["mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif mask == "heads":  # a different additive mask per (sequence, head): (N·h, L, S)
        kw["mask"] = torch.randn(N * H, L, L, dtype=torch.float64, generator=g)
    if "is_causal" in settings:
        kw["is_causal"] = settings["is_causal"]
    if settings.get("padding") == "bool":
        kw["src_key_padding_mask"] = padding
    elif settings.get("padding") == "float":
        kw["src_key_padding_mask"] = torch.zeros(N, L, dtype=torch.float64).masked_fill(padding, float("-inf"))
    keep = ~padding if "padding" in settings else torch.ones(N, L, dtype=torch.bool)
    keep = keep if batch_first else keep.t()
    if settings.get("unbatched"):  # one sequence, (L, d), its padding mask (S,)
        x, keep = (x[0], keep[0]) if batch_first else (x[:, 0], keep[:, 0])
        if "src_key_padding_mask" in kw:
            kw["src_key_padding_mask"] = kw["src_key_padding_mask"][0]
    return x, kw, keep


def forward_cases(names):
    """max |phantom − dense| over the non-padded positions, per case, twice in training (two RNG states)."""
    errors = {}
    for name in names:
        build, call, training = CASES[name]
        dense = dense_stack(**build)
        phantom = lp.to_phantom(dense, ghosts="full")
        assert isinstance(phantom, PhantomTransformerEncoder)
        dense.train(training), phantom.train(training)
        x, kw, keep = call_args(call, build.get("batch_first", False))
        worst = 0.0
        for seed in (3, 4) if training else (3,):
            torch.manual_seed(seed)
            want = dense(x, **kw)
            torch.manual_seed(seed)
            got = phantom(x, **kw)
            worst = max(worst, (got - want)[keep].abs().max().item())
            if training:  # the masks are drawn: the outputs differ between seeds
                assert not torch.equal(want, dense_stack(**build).train()(x, **kw))
        errors[name] = worst
    return errors


def always_causal():
    """Blocks that attend causally by themselves (a GPT block's ``causal=True``) equal the dense stack given
    the causal mask, alone, with key padding, and with a per-head mask added."""
    dense = dense_stack(norm_first=True).eval()
    phantom = lp.to_phantom(dense, ghosts="full").eval()
    for layer in phantom.layers:
        layer.self_attn.causal = True
    x, padding, g = inputs(batch_first=False)
    heads = torch.randn(N * H, L, L, dtype=torch.float64, generator=g)
    keep = ~padding.t()
    return [(phantom(x) - dense(x, mask=causal())).abs().max().item(),
            (phantom(x, src_key_padding_mask=padding) - dense(x, mask=causal(), src_key_padding_mask=padding))[keep]
            .abs().max().item(),
            (phantom(x, mask=heads) - dense(x, mask=heads + causal())).abs().max().item()]


def test_always_causal_blocks_equal_dense_with_the_causal_mask():
    for errors in run_ranks(2, always_causal):
        assert max(errors) < 1e-10, errors


@pytest.mark.parametrize("p", [2, 4])
def test_full_ghosts_stack_equals_dense(p):
    for rank_errors in run_ranks(p, forward_cases, list(CASES)):
        assert set(rank_errors) == set(CASES)
        for name, err in rank_errors.items():
            assert err < 1e-10, f"{name}: {err}"


def directional_check(training: bool, build: dict, call: dict, one_rank_at_a_time: bool, h: float = 1e-6):
    """Every parameter tensor of every rank, and the input: analytic gradient · v against the central
    difference of the loss along a random direction v.

    ``one_rank_at_a_time``: one rank moves its tensor while all run forward, so each rank's gradient
    is checked alone. Otherwise every rank moves its own tensor of that name at once (p times fewer
    forwards) and the difference is checked against Σ_ranks gradient · v, all-reduced: a wrong
    gradient on any rank changes that sum unless its error is orthogonal to a random direction.
    """
    rank, p = dist.get_rank(), dist.get_world_size()
    phantom = lp.to_phantom(dense_stack(**build), ghosts="full").train(training)
    assert phantom.layers[0].self_attn.training == training
    x, kw, _ = call_args(call, build.get("batch_first", False))
    x.requires_grad_(True)
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss():
        torch.manual_seed(7)  # the same dropout masks at every evaluation
        return (phantom(x, **kw) * weights).sum()

    def central(move, v) -> float:
        move(h * v)
        up = loss().item()
        move(-2 * h * v)
        down = loss().item()
        move(h * v)
        return (up - down) / (2 * h)

    loss().backward()
    params = list(phantom.named_parameters())
    g = torch.Generator().manual_seed(100 + rank)
    worst, checked = 0.0, 0
    with torch.no_grad():
        for owner in range(p) if one_rank_at_a_time else [None]:
            for name, param in params:
                mine = owner in (None, rank)
                v = torch.randn(param.shape, dtype=param.dtype, generator=g) if mine else torch.zeros_like(param)
                fd = central(param.add_, v)
                exact = torch.tensor((param.grad * v).sum().item() if mine else 0.0, dtype=torch.float64)
                if owner is None:
                    dist.all_reduce(exact)
                if mine:
                    worst = max(worst, abs(fd - exact.item()) / max(1.0, abs(fd)))
                    checked += 1
        v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(6))  # replicated: all move
        input_err = abs(central(x.add_, v) - (x.grad * v).sum().item())
    return worst, checked, len(params), input_err


@pytest.mark.parametrize("p, training, build, call", [
    (2, True, dict(dropout=0.2, batch_first=True), dict(mask="causal", padding="bool")),  # math attention
    (4, False, dict(norm_first=True, final_norm=True), dict(mask="causal", is_causal=True)),  # SDPA
])
def test_gradients_match_finite_differences(p, training, build, call):
    for worst, checked, n_params, input_err in run_ranks(p, directional_check, training, build, call, p == 2):
        assert checked == n_params >= 40  # 2 layers × (4 phantom linears × 4 tensors + 2 norms × 2)
        assert worst < 1e-7 and input_err < 1e-7
