"""torch.compile of phantom FFNs (issue 12): one graph, forward and backward, equal to eager.

Every phantom layer kind is in the FFN: column-parallel first layer, phantom hidden
layers (the fused operator with its ghost all-gather and reduce-scatter), row-parallel
last layer, and sharded dropout between them (the ``aot_eager`` runs, whose random ops
draw what eager draws from the same seed). ``torch._dynamo.explain`` counts graph breaks; ``fullgraph=True`` would
raise on one. Compiling is slow on this machine's two cores, so shapes are tiny and the
variants share one process pool: ``aot_eager`` (Dynamo + AOTAutograd: the traced forward
and backward graphs, run op by op) covers p = 2 and 4 with overlap on and off; inductor
(generated C++ kernels, collectives lowered by the compiler) runs once, at p = 2.
"""

from __future__ import annotations

import copy

import pytest

from conftest import run_ranks

SIZES = [6, 8, 12, 8, 5]  # first, two phantom hidden layers, last
GHOSTS = [2, 3]


def _step(model, x, params):
    import torch

    torch.manual_seed(1)  # the same dropout masks for eager and compiled (each draws the dense mask)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters()}


def compiled_matches_eager(backend: str, overlaps, convert: bool = False):
    """Eager and ``torch.compile(fullgraph=True)`` forward + backward on this rank, per overlap."""
    import torch._dynamo

    from lightning_phantom.nn.convert import to_phantom
    from lightning_phantom.nn.layers import PhantomFFN

    torch._dynamo.reset()
    out = []
    for overlap in overlaps:
        torch.manual_seed(0)
        if convert:  # a user's dense FFN, converted (svd)
            dense = torch.nn.Sequential(*[m for i in range(len(SIZES) - 1) for m in (
                torch.nn.Linear(SIZES[i], SIZES[i + 1]), torch.nn.GELU())][:-1])
            eager = to_phantom(dense, GHOSTS, overlap=overlap)
        else:
            eager = PhantomFFN(SIZES, GHOSTS, activation="tanh", dropout=0.25, overlap=overlap)
        compiled_module = copy.deepcopy(eager)
        x = torch.randn(3, 4, SIZES[0])  # leading dimensions (B × T × d) are kept
        explained = torch._dynamo.explain(compiled_module)(x.clone().requires_grad_(True))
        compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
        ref, got = _step(eager, x, eager), _step(compiled, x, compiled_module)
        out.append({
            "overlap": overlap,
            "graph_breaks": explained.graph_break_count,
            "graphs": explained.graph_count,
            "out": (got[0] - ref[0]).abs().max().item(),
            "x_grad": (got[1] - ref[1]).abs().max().item(),
            "grads": {n: (got[2][n] - g).abs().max().item() for n, g in ref[2].items()},
            "grads_nonzero": all(g.abs().sum() > 0 for g in ref[2].values()),
        })
    return out


def _check(results):
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            assert (r["graph_breaks"], r["graphs"]) == (0, 1), f"rank {rank}: {r}"
            assert r["out"] <= 1e-5, f"rank {rank}: {r}"
            assert r["x_grad"] <= 1e-4 and max(r["grads"].values()) <= 1e-4, f"rank {rank}: {r}"
            assert r["grads_nonzero"]


@pytest.mark.parametrize("p", [2, 4])
def test_fullgraph_forward_backward_equals_eager(p):
    _check(run_ranks(p, compiled_matches_eager, "aot_eager", [True, False], timeout=600))


def test_converted_ffn_compiles_with_inductor():
    _check(run_ranks(2, compiled_matches_eager, "inductor", [True], convert=True, timeout=900))


# --- PhantomStrategy(compile=...) ------------------------------------------------------

def strategy_fit(compile_request):
    """Four SGD steps of a plain user module under PhantomStrategy; the losses and how ``net`` ended up."""
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_phantom as lp
    from test_strategy import Recorder, Regression, dataset, make_trainer

    L.seed_everything(0)
    model, recorder = Regression(), Recorder()
    trainer = make_trainer(devices=2, strategy=lp.PhantomStrategy(ghosts=2, compile=compile_request), max_steps=4,
                           callbacks=[recorder])
    trainer.fit(model, DataLoader(dataset(), batch_size=8))
    return {"losses": recorder.losses, "compiled": getattr(model.net, "_compiled_call_impl", None) is not None,
            "ffn": type(model.net).__name__, "keys": sorted(model.state_dict())}


def test_strategy_compiles_each_phantom_ffn_after_sharding():
    eager = run_ranks(2, strategy_fit, False)
    compiled = run_ranks(2, strategy_fit, {"backend": "aot_eager"}, timeout=600)
    for e, c in zip(eager, compiled):
        assert (e["ffn"], c["ffn"]) == ("PhantomFFN", "PhantomFFN")
        assert (e["compiled"], c["compiled"]) == (False, True)
        assert c["keys"] == e["keys"]  # compiled in place: checkpoints see the same names
        assert c["losses"] == pytest.approx(e["losses"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("request_, exc, words", [
    ("yes", TypeError, ["compile must be True, False or a dict", "'yes'"]),
    ({"fullgrph": True}, ValueError, ["['fullgrph']", "torch.compile does not take", "fullgraph"]),
])
def test_bad_compile_request_fails_in_the_constructor(request_, exc, words):
    import lightning_phantom as lp

    with pytest.raises(exc) as info:
        lp.PhantomStrategy(compile=request_)
    for word in words:
        assert word in str(info.value)


def test_compile_options():
    from lightning_phantom.nn.compiling import compile_options

    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"fullgraph": True}
    assert compile_options({"mode": "max-autotune", "fullgraph": False}) == {"mode": "max-autotune",
                                                                             "fullgraph": False}
