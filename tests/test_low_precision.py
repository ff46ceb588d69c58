"""Partial sums are added in float32 under bfloat16 (issue 16, item 4).

Three collectives add partial sums over a phantom group: the row-parallel end's forward
all-reduce, the ghost-gradient reduce-scatter of every phantom layer, and the
column-parallel end's input-gradient all-reduce. Added in bfloat16 inside the collective,
a sum of p partial results is rounded p − 1 times; added in float32, once.

Each layer runs in bfloat16 (autocast over float32 parameters, or a bfloat16 input for
the column-parallel end) and is compared with float64 arithmetic on the very operands the
bfloat16 run sees (inputs and parameters rounded to bfloat16 first), so what is measured
is the error of the arithmetic alone. The same run with ``accumulation_dtype`` patched to
keep bfloat16 is the behaviour before the change. p = 4: with two ranks a sum of two
partials is rounded once either way.
"""

from __future__ import annotations

import copy
from unittest import mock

import torch

from conftest import run_ranks


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16, held in its own dtype (so float64 sees the same numbers)."""
    return t.detach().to(torch.bfloat16).to(t.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _run(layer, x: torch.Tensor, weight: torch.Tensor, autocast: bool):
    """Output and gradients of ``(layer(x) * weight).sum()``."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.double() * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def reduction_errors(seed: int = 0) -> dict:
    """Relative errors of each reduced quantity, with sums in float32 and in bfloat16."""
    from lightning_phantom.nn.layers import ColumnParallelLinear, PhantomLinear, RowParallelLinear
    from lightning_phantom.ops import comm

    torch.manual_seed(seed)
    n, rows = 256, 128
    cases = {  # quantity -> layer, input, autocast?, output width, what to read off
        "ghost reduce-scatter (compress grad)": (PhantomLinear(n, n, 8), torch.randn(rows, n // 4), True, n // 4,
                                                 lambda out, gx, g: g["compress"]),
        "row-parallel all-reduce (output)": (RowParallelLinear(n, n), torch.randn(rows, n // 4), True, n,
                                             lambda out, gx, g: out),
        "copy-to-phantom all-reduce (input grad)": (ColumnParallelLinear(n, n).to(torch.bfloat16),
                                                    torch.randn(rows, n, dtype=torch.bfloat16), False, n // 4,
                                                    lambda out, gx, g: gx),
    }
    errors = {}
    for name, (layer, x, autocast, width, read) in cases.items():
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(_bf16_exact(p))
        x = _bf16_exact(x)
        weight = _bf16_exact(torch.randn(rows, width, dtype=torch.float64))
        exact = read(*_run(copy.deepcopy(layer).double(), x.double(), weight, autocast=False))
        errors[name, "float32"] = _rel(read(*_run(layer, x, weight, autocast)), exact)
        layer.zero_grad()
        with mock.patch.object(comm, "accumulation_dtype", lambda dtype: dtype):
            errors[name, "bfloat16"] = _rel(read(*_run(layer, x, weight, autocast)), exact)
    return errors


def test_partial_sums_in_float32_are_closer_to_float64():
    for rank, errors in enumerate(run_ranks(4, reduction_errors)):
        for (name, acc), error in errors.items():
            if acc == "float32":
                before = errors[name, "bfloat16"]
                assert error < 0.95 * before, f"rank {rank}, {name}: {error:.3g} in float32, {before:.3g} before"


def rms_norm_under_autocast() -> float:
    """Relative difference of a phantom FFN with RMSNorm (ghosts="full": exact) from the dense one,
    both under bfloat16 autocast, on small activations (where an eps of bfloat16's 7.8e-3 instead
    of float32's, nn.RMSNorm's default under bfloat16, changes the function)."""
    import lightning_phantom as lp
    from torch import nn

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16, bias=False), nn.RMSNorm(16), nn.GELU(), nn.Linear(16, 16, bias=False),
                          nn.RMSNorm(16), nn.GELU(), nn.Linear(16, 4))
    ffn = lp.to_phantom(dense, ghosts="full")
    x = 1e-3 * torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = dense(x).float(), ffn(x).float()
    return ((got - want).norm() / want.norm()).item()


def test_rms_norm_keeps_its_float32_eps_under_bfloat16():
    for rank, error in enumerate(run_ranks(2, rms_norm_under_autocast)):
        assert error < 0.03, f"rank {rank}: phantom differs from dense by {error:.1%} under bf16"
