"""The TP baseline: ``parallelize_ffn`` is the dense FFN, and costs exactly what ``tp_cost`` says.

Each case runs one forward + backward of a DTensor-sharded FFN on gloo ranks under
``CommCounter`` and the FLOP counters, and compares outputs and full gradients with the
dense module run on one process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_ranks
from torch import nn

from lightning_phantom.cost.model import tp_cost

SIZES = {
    "even": [6, 8, 12, 8, 5],  # 4 Linear layers: two Colwise/Rowwise pairs
    "odd": [6, 8, 12, 8],  # 3 Linear layers: the last Colwise gathers its output
    "single": [6, 8],  # 1 Linear layer: Colwise with output gathered
}


def _dense(sizes, dtype) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=dtype))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(0.0)]
    return nn.Sequential(*layers)


def _tp_step(sizes, rows, dtype, input_requires_grad, seed=0, autocast=False):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
    from lightning_phantom.app.tensor_parallel import parallelize_ffn

    p = dist.get_world_size()
    mesh = init_device_mesh("cpu", (p,), mesh_dim_names=("tensor_parallel",))
    torch.manual_seed(seed)  # same dense weights and data on every rank
    dense = _dense(sizes, dtype)
    x = torch.randn(rows, sizes[0], dtype=dtype)
    out_weight = torch.randn(rows, sizes[-1], dtype=dtype)  # a loss whose gradient is not all ones

    xd = x.clone().requires_grad_(input_requires_grad)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        yd = dense(xd)
    (yd * out_weight).sum().backward()

    tp = parallelize_ffn(copy.deepcopy(dense), mesh)
    tp.zero_grad(set_to_none=True)
    xt = x.clone().requires_grad_(input_requires_grad)
    with CommCounter() as comm, LocalFlopCounterMode(display=False) as local_flops:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            yt = tp(xt)
        (yt * out_weight).sum().backward()
    # A second step under plain FlopCounterMode (global DTensor shapes); gradients accumulate.
    with FlopCounterMode(display=False) as global_flops:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            yt2 = tp(x.clone().requires_grad_(input_requires_grad))
        (yt2 * out_weight).sum().backward()

    grads = {}
    for (name, pd), pt in zip(dense.named_parameters(), tp.parameters()):
        g = pt.grad.full_tensor() if isinstance(pt.grad, DTensor) else pt.grad
        grads[name] = (g / 2 - pd.grad).abs().max().item()  # two accumulated steps
    return {
        "out": (torch.as_tensor(yt) - yd).abs().max().item(),
        "x_grad": (xt.grad - xd.grad).abs().max().item() if input_requires_grad else 0.0,
        "grads": grads,
        "sent_bytes": comm.sent_bytes,
        "sent_fwd": comm.summary("forward").sent_bytes,
        "sent_bwd": comm.summary("backward").sent_bytes,
        "calls": comm.calls,
        "payloads": sorted((r.op, r.numel, r.phase) for r in comm.records),
        "sized": sorted((r.op, r.numel, r.element_size, r.phase) for r in comm.records),
        "apis": {r.api for r in comm.records},
        "local_flops": local_flops.get_total_flops(),
        "global_flops": global_flops.get_total_flops(),
    }


CASES = [
    (1, "even", torch.float32, True),  # a mesh of one: DTensor issues no collective
    (2, "even", torch.float32, False),
    (2, "even", torch.float64, True),
    (2, "odd", torch.float32, True),
    (2, "odd", torch.float64, False),
    (2, "single", torch.float32, True),
    (4, "even", torch.float64, True),
    (4, "odd", torch.float32, False),
]


@pytest.mark.parametrize("p,shape,dtype,input_requires_grad", CASES)
def test_tp_ffn_matches_dense_and_cost_model(p, shape, dtype, input_requires_grad):
    sizes, rows = SIZES[shape], 5
    results = run_ranks(p, _tp_step, sizes, rows, dtype, input_requires_grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    cost = tp_cost(sizes, p, rows, torch.tensor([], dtype=dtype).element_size(),
                   input_requires_grad=input_requires_grad)
    for rank, r in enumerate(results):
        assert r["out"] < tol, f"rank {rank}: output differs from dense by {r['out']}"
        assert r["x_grad"] < tol, f"rank {rank}: input gradient differs by {r['x_grad']}"
        assert max(r["grads"].values()) < tol, f"rank {rank}: parameter gradients differ: {r['grads']}"
        # Communication: exactly the model, call by call and phase by phase.
        assert r["apis"] <= {"_c10d_functional.all_reduce", "_c10d_functional.all_gather_into_tensor"}
        assert r["payloads"] == cost.payloads()
        assert r["sized"] == cost.payloads(element_sizes=True)
        assert r["calls"] == cost.calls
        assert r["sent_bytes"] == cost.sent_bytes
        assert (r["sent_fwd"], r["sent_bwd"]) == (cost.sent_bytes_fwd, cost.sent_bytes_bwd)
        # Arithmetic: each rank's own mm/addmm FLOPs are the model's; plain FlopCounterMode
        # counts DTensor matmuls at their logical shape, p times that.
        assert r["local_flops"] == cost.flops
        assert r["global_flops"] == p * cost.flops


@pytest.mark.parametrize("shape,dtype,autocast", [("even", torch.float32, True),
                                                  ("odd", torch.bfloat16, False)])
def test_tp_under_bfloat16_sums_in_bfloat16_but_the_input_gradient(shape, dtype, autocast):
    """Measured, not assumed: DTensor adds its partial sums in bfloat16 (2 bytes a value), under
    autocast and with bfloat16 weights; only the first layer's input-gradient all-reduce sums in the
    input's dtype (float32 data under autocast). ``tp_cost(..., 2, input_element_size=...)`` says so."""
    sizes, rows, p = SIZES[shape], 5, 2
    cost = tp_cost(sizes, p, rows, 2, input_requires_grad=True, input_element_size=dtype.itemsize)
    for rank, r in enumerate(run_ranks(p, _tp_step, sizes, rows, dtype, True, autocast=autocast)):
        assert r["out"] < 0.05 and max(r["grads"].values()) < 0.05, f"rank {rank}: {r['out']}, {r['grads']}"
        assert r["sized"] == cost.payloads(element_sizes=True), f"rank {rank}"
        assert r["sent_bytes"] == cost.sent_bytes


def test_tp_bytes_grow_with_width():
    """TP's traffic is proportional to the hidden width (the contrast with test_cost's PP check)."""
    narrow, wide = tp_cost([8, 16, 16, 16, 8], 2, 4), tp_cost([8, 32, 32, 32, 8], 2, 4)
    hidden = slice(1, 3)
    doubled = [2 * a.sent_bytes for a in narrow.per_layer[hidden]]
    assert doubled == [b.sent_bytes for b in wide.per_layer[hidden]]


def _bad_ffn(case):
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_phantom.app.tensor_parallel import parallelize_ffn

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
    modules = {
        "width": nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 4)),
        "norm": nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4)),
        "chain": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 4)),
        "empty": nn.Sequential(nn.ReLU()),
        "not_sequential": nn.Linear(4, 8),
    }
    try:
        parallelize_ffn(modules[case], mesh)
    except (TypeError, ValueError) as err:
        return type(err).__name__, str(err)
    return None


@pytest.mark.parametrize("case,kind,words", [
    ("width", "ValueError", "7 % 2 = 1"),
    ("norm", "TypeError", "LayerNorm"),
    ("chain", "ValueError", "does not take the 8 outputs"),
    ("empty", "ValueError", "no nn.Linear"),
    ("not_sequential", "TypeError", "nn.Sequential"),
])
def test_parallelize_ffn_rejects_non_ffns(case, kind, words):
    result = run_ranks(2, _bad_ffn, case)[0]
    assert result is not None and result[0] == kind and words in result[1], result


def _lightning_tp_step(sizes, rows):
    """One manual-optimisation step of Lightning's ModelParallelStrategy with parallelize_ffn."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_phantom.cost.counting import CommCounter
    from lightning_phantom.app.tensor_parallel import parallelize_ffn

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # so that backward runs inside the counter
            self.ffn = _dense(sizes, torch.float32)

        def configure_model(self):
            parallelize_ffn(self.ffn, self.device_mesh["tensor_parallel"])

        def training_step(self, batch, _):
            with CommCounter() as comm:
                self.manual_backward(self.ffn(batch).square().sum())
            self.counted = (comm.sent_bytes, comm.calls)
            self.optimizers().step()  # manual optimisation: max_steps counts these

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(rows, sizes[0]), batch_size=rows)
    model = Model()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    return model.counted


def test_lightning_model_parallel_strategy_counts_as_modelled():
    sizes, rows = SIZES["even"], 5
    cost = tp_cost(sizes, 2, rows)
    for sent, calls in run_ranks(2, _lightning_tp_step, sizes, rows, timeout=120):
        assert (sent, calls) == (cost.sent_bytes, cost.calls)
