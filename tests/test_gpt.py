"""The GPT (``model=gpt``): the tensor-parallel GPT is the dense GPT, and costs what the model says.

At p = 2 in float64 the TP GPT (``parallelize_gpt``, head replicated or vocab-parallel) has the
dense GPT's loss and every gradient; the collectives DTensor issues, the multiply-adds each rank
runs and the parameters it holds equal ``lightning_phantom.cost.gpt``, and the test's own
arithmetic (4 all-reduces of rows·d per block, Megatron's count).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import run_ranks

from lightning_phantom.cost.gpt import GPTShape, gpt_cost

# vocab, width, layers, heads, mlp ratio, context: small, every width divisible by p = 2
SHAPE = dict(vocab=16, width=8, layers=2, heads=4, mlp_ratio=2, context=6)
BATCH, SEQ = 3, 6


def _dense(dtype=torch.float64):
    from lightning_phantom.app.gpt import GPT

    torch.manual_seed(0)
    return GPT(**SHAPE).to(dtype)


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), generator=g),
            torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), generator=g))


def _tp_step(head: str) -> dict:
    """Dense step and TP step (through GPTModule's loss and backward hook) on every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_phantom.app.language_model import GPTModule
    from lightning_phantom.app.tensor_parallel import parallelize_gpt
    from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode

    p = dist.get_world_size()
    dense = _dense()
    tokens, targets = _batch()
    dense_loss = F.cross_entropy(dense(tokens).flatten(0, 1), targets.flatten())
    dense_loss.backward()

    module = GPTModule(**SHAPE, tp_head=head)
    module.gpt = copy.deepcopy(dense)
    module.gpt.zero_grad(set_to_none=True)
    parallelize_gpt(module.gpt, init_device_mesh("cpu", (p,)), head)
    module._vocab_parallel = head == "vocab_parallel"  # what configure_model sets
    with CommCounter() as comm, LocalFlopCounterMode(display=False) as flops:
        loss = module._loss((tokens, targets))
        module.backward(loss)
    # Every parameter a DTensor (the replicated ones too): fused AdamW takes them in one step.
    all_dtensors = all(isinstance(q, DTensor) for q in module.gpt.parameters())
    module.configure_optimizers().step()
    grads = {}
    for (name, pd), pt in zip(dense.named_parameters(), module.gpt.parameters()):
        g = pt.grad.full_tensor() if isinstance(pt.grad, DTensor) else pt.grad
        grads[name] = (g - pd.grad).abs().max().item()
    return {"loss": abs(loss.item() - dense_loss.item()), "plain_loss": not isinstance(loss, DTensor),
            "all_dtensors": all_dtensors,
            "grads": grads, "payloads": sorted((r.op, r.numel, r.phase) for r in comm.records),
            "sent": comm.sent_bytes, "macs": flops.get_total_flops() // 2,
            "params": sum((q.to_local() if isinstance(q, DTensor) else q).numel() for q in module.gpt.parameters())}


@pytest.mark.parametrize("head", ["replicated", "vocab_parallel"])
def test_tp_gpt_is_the_dense_gpt_and_costs_what_the_model_says(head):
    p, e = 2, 8
    shape = GPTShape(SHAPE["vocab"], SHAPE["width"], SHAPE["layers"], SHAPE["heads"],
                     SHAPE["mlp_ratio"] * SHAPE["width"], SHAPE["context"])
    cost = gpt_cost(shape, BATCH, SEQ, p, head, element_size=e)
    for rank in run_ranks(p, _tp_step, head):
        assert rank["loss"] < 1e-12 and rank["plain_loss"] and rank["all_dtensors"]
        assert max(rank["grads"].values()) < 1e-12, rank["grads"]
        assert len(rank["grads"]) == len(list(_dense().parameters()))  # every parameter compared
        assert rank["payloads"] == cost.payloads()
        assert rank["sent"] == cost.sent_bytes and rank["macs"] == cost.macs and rank["params"] == cost.params

        # The test's own arithmetic: per block, all-reduces of rows·d after out and fc2 (forward)
        # and before q/k/v and fc1 (backward); a vocab-parallel head adds one backward all-reduce of
        # rows·d and the loss three of rows (max, sum of exponentials, target logit).
        d, f, V, L, rows = SHAPE["width"], SHAPE["mlp_ratio"] * SHAPE["width"], SHAPE["vocab"], SHAPE["layers"], \
            BATCH * SEQ
        ring = Fraction(2 * (p - 1), p) * e
        expected = [("all_reduce", rows * d, "backward")] * (2 * L) + [("all_reduce", rows * d, "forward")] * (2 * L)
        if head == "vocab_parallel":
            expected = sorted(expected + [("all_reduce", rows * d, "backward")] + [("all_reduce", rows, "forward")] * 3)
        assert rank["payloads"] == sorted(expected)
        assert rank["sent"] == sum(ring * n for _, n, _ in expected)
        head_macs = 3 * rows * d * V // (p if head == "vocab_parallel" else 1)
        assert rank["macs"] == L * (3 * rows * (4 * d * d + 2 * d * f) // p + 7 * rows * SEQ * d // p) + head_macs


def test_dense_gpt_costs_what_the_model_says_on_one_process():
    from lightning_phantom.cost.counting import LocalFlopCounterMode

    dense = _dense()
    tokens, targets = _batch()
    with LocalFlopCounterMode(display=False) as flops:
        F.cross_entropy(dense(tokens).flatten(0, 1), targets.flatten()).backward()
    shape = GPTShape(SHAPE["vocab"], SHAPE["width"], SHAPE["layers"], SHAPE["heads"],
                     SHAPE["mlp_ratio"] * SHAPE["width"], SHAPE["context"])
    cost = gpt_cost(shape, BATCH, SEQ)
    assert flops.get_total_flops() == 2 * cost.macs and cost.sent_bytes == 0
    assert cost.params == shape.params == sum(q.numel() for q in dense.parameters())


def test_gpt_is_causal_and_refuses_bad_settings():
    from lightning_phantom.app.gpt import GPT

    gpt = _dense()
    tokens, _ = _batch()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % SHAPE["vocab"]
    with torch.no_grad():  # a later token changes no earlier prediction
        assert torch.equal(gpt(tokens)[:, :-1], gpt(changed)[:, :-1])
    with pytest.raises(ValueError, match=r"model.width=10 is not divisible by model.heads=4"):
        GPT(16, 10, 1, 4)
    with pytest.raises(ValueError, match=r"at most model.context=6 tokens, got 7"):
        gpt(torch.zeros(1, 7, dtype=torch.long))


def test_cost_model_refuses_what_tp_cannot_split():
    shape = GPTShape(15, 8, 1, 4, 12, 8)
    with pytest.raises(ValueError, match="heads = 4 is not divisible by p = 3"):
        gpt_cost(shape, 1, 8, p=3)
    with pytest.raises(ValueError, match="vocab = 15 is not divisible by p = 2"):
        gpt_cost(shape, 1, 8, p=2, head="vocab_parallel")
    with pytest.raises(ValueError, match="seq 9 is longer than the GPT's context 8"):
        gpt_cost(shape, 1, 9)
    assert math.isclose(gpt_cost(shape, 1, 8, p=2).sent_bytes, 4 * 8 * 8 * 4)  # 4 all-reduces, ring 2(p-1)/p = 1


def _benchmark():
    """benchmarks/transformer.py as a module."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import transformer

    return transformer


def _block_benchmark(argv: list[str]) -> list[dict]:
    import torch.distributed as dist

    bench = _benchmark()
    args = bench.parse_args(argv)
    return [bench.summarise(w, bench.measure(w, args), args, dist.get_world_size()) for w in args.widths]


def _head_benchmark(argv: list[str]) -> dict:
    bench = _benchmark()
    return bench.measure_heads(bench.parse_args(argv))


def test_transformer_benchmark_times_every_case_and_counts_what_the_model_says():
    """benchmarks/transformer.py's measurement on 2 ranks, tiny: every case timed; PP's, TP's and the dense
    block's bytes and multiply-adds equal cost.transformer's one block; the whole GPT's head replicated
    against vocab-parallel (--gpt) differs by what cost.gpt says."""
    argv = ["--widths", "32", "--heads", "4", "--seq", "8", "--batch", "2", "--reps", "1", "--warmup", "0",
            "--ghosts", "3"]
    row, = run_ranks(2, _block_benchmark, argv)[0]
    assert row["counts_match_model"] and row["TP_sent_bytes"] == 4 * 2 * 8 * 32 * 4  # 4 all-reduces, ring = 1
    # PP: 4 ghost all-gathers forward and 4 reduce-scatters backward of (p-1)·rows·k values, and the 2 norms'
    # all-reduces of 2 statistics per row each way: a quarter of TP's bytes here.
    assert row["PP_sent_bytes"] == 8 * 16 * 3 * 4 + 4 * 2 * 16 * 4 and row["bytes_ratio_pp_tp"] == 0.25
    assert row["flop_ratio_tp_dense_train"] == 0.5 and 0 < row["flop_ratio_pp_tp_train"] < 1
    for side in ("PP", "TP", "dense", "scores"):
        for mode in ("train", "forward"):
            assert row[f"{side}_{mode}_ms"] > 0 and row[f"{side}_{mode}_cpu_ms"] >= 0
    transformer = _benchmark()
    assert "counted bytes and multiply-adds = model: True" in transformer.report([row], transformer.parse_args(argv))
    heads = run_ranks(2, _head_benchmark, argv + ["--gpt", "--layers", "1"])[0]
    rep, vp = heads["replicated"], heads["vocab_parallel"]
    assert vp["sent_bytes"] == rep["sent_bytes"] + 2 * 8 * 32 * 4 + 3 * 2 * 8 * 4  # + rows·d back, 3 × rows
    assert rep["macs"] - vp["macs"] == 3 * 2 * 8 * 32 * 256 // 2  # half the head's multiply-adds
    assert "vocab-parallel / replicated" in transformer.report_heads(heads, transformer.parse_args(argv))
    for bad in (["--heads", "3"], ["--widths", "100"], ["--p", "1"], ["--widths", "32", "--ghosts", "17"]):
        with pytest.raises(SystemExit):
            transformer.parse_args(bad)
