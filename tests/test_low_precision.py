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


# ------------------------------------------------ the loss scaler with FSDP's DTensor and plain gradients
def scaler_with_dtensor_and_plain_gradients() -> list:
    """``data_parallel="fsdp"``'s gradients under ``16-mixed`` (CUDA-only in the strategy; the scaler itself
    runs on CPU): an FFN's are DTensors sharded over the replicas, a head's plain tensors, in one optimizer.
    Step 0 is clean; at step 1 one element of rank 1's shard is Inf."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lightning_phantom.strategy.precision import SyncedGradScaler

    def whole(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    fully_shard(model[0], mesh=init_device_mesh("cpu", (2,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = SyncedGradScaler("cpu", init_scale=4.0)
    rank, out = torch.distributed.get_rank(), []
    for step in range(2):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4) + rank).square().sum()).backward()
        if step == 1 and rank == 1:
            model[0].weight.grad.to_local()[0, 0] = float("inf")
        scaled = {n: whole(p.grad) for n, p in model.named_parameters()}
        before = {n: whole(p) for n, p in model.named_parameters()}
        kinds = {n: type(p.grad).__name__ for n, p in model.named_parameters()}
        scaler.unscale_(optimizer)  # as clipping does; else step() unscales
        unscaled = {n: whole(p.grad) for n, p in model.named_parameters()}
        scaler.step(optimizer)
        scaler.update()
        out.append({"kinds": kinds, "scaled": scaled, "unscaled": unscaled, "before": before,
                    "after": {n: whole(p) for n, p in model.named_parameters()}, "scale": scaler.get_scale()})
    return out


def test_synced_scaler_unscales_dtensor_and_plain_gradients_and_skips_together():
    for rank, (clean, poisoned) in enumerate(run_ranks(2, scaler_with_dtensor_and_plain_gradients)):
        assert set(clean["kinds"].values()) == {"DTensor", "Tensor"}
        for name, scaled in clean["scaled"].items():  # unscaled exactly (a power of two), then stepped
            torch.testing.assert_close(clean["unscaled"][name], scaled / 4, rtol=0, atol=0)
            torch.testing.assert_close(clean["after"][name], clean["before"][name] - 0.5 * scaled / 4)
        assert clean["scale"] == 4.0
        # Rank 1's Inf: every rank skips the step and halves its scale.
        assert all(torch.equal(poisoned["after"][n], poisoned["before"][n]) for n in poisoned["before"])
        assert poisoned["scale"] == 2.0, rank
