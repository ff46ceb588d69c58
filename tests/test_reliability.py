"""Unusual modules handed to conversion: correct handling or a clear error naming the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_phantom as lp
from conftest import run_ranks


def unusual_but_valid():
    """Linear without bias (all or some), non-contiguous weights, dropout and a leading activation convert exactly."""
    torch.manual_seed(0)
    no_bias = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Tanh(),
                            nn.Linear(8, 3, bias=False)).double()
    mixed = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)).double()
    strided = nn.Sequential(nn.Tanh(), nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 8), nn.SiLU(),
                            nn.Linear(8, 3)).double()
    with torch.no_grad():  # a weight that is a transposed view (as after some weight-tying tricks)
        strided[3].weight = nn.Parameter(strided[3].weight.detach().t().contiguous().t())
    assert not strided[3].weight.is_contiguous()
    strided.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    errors = []
    for dense in (no_bias, mixed, strided):
        phantom = lp.to_phantom(dense, ghosts=4).eval()  # ghosts = a: exact
        errors.append((phantom(x) - dense(x)).abs().max().item())
    biases = [m.bias for m in lp.to_phantom(no_bias, ghosts=1) if hasattr(m, "bias")]
    return errors, biases


def test_unusual_modules_convert_exactly():
    for errors, biases in run_ranks(2, unusual_but_valid):
        assert max(errors) < 1e-12
        assert biases and all(b is None for b in biases)


def test_tied_weights_are_refused():
    shared = nn.Linear(8, 8)
    seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"module\[4\]\.weight is the same tensor as module\[2\]\.weight"):
        lp.to_phantom(seq, ghosts=2)


def test_linear_inside_custom_module_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    seq = nn.Sequential(nn.Linear(6, 8), Block(), nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"module\[1\] is Block"):
        lp.to_phantom(seq, ghosts=2)


def test_unknown_init_is_refused():
    seq = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="init must be 'svd' or 'random', got 'zeros'"):
        lp.to_phantom(seq, ghosts=2, init="zeros")
