"""The cost of a transformer stack (lightning_phantom.cost.transformer, docs/operator.md §10.6, §10.8):
the table's entries, PP/TP traffic per block p·k/d, and the bytes and multiply-adds counted on gloo
ranks for a whole step, block by block, equal to the model."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
from lightning_phantom.cost.transformer import compare_stacks, stack_cost
from conftest import run_ranks


@pytest.mark.parametrize("d, h, f, p, k", [(16, 4, 32, 2, 3), (64, 8, 256, 4, 5), (96, 12, 96, 3, 7)])
def test_block_reproduces_the_table(d, h, f, p, k):
    batch, seq, e = 3, 5, 2
    rows = batch * seq
    linears = ("qkv", "out", "fc1", "fc2")
    fp32 = compare_stacks(d, h, f, 2, p, batch, seq, k, 4, norm_first=True)
    for pp, tp in zip(fp32.phantom.blocks, fp32.tensor.blocks):
        pp_sent = sum(pp.part(x).sent_bytes for x in linears)
        tp_sent = sum(tp.part(x).sent_bytes for x in linears)
        assert pp_sent / tp_sent == Fraction(p * k, d)  # §10.6: norms aside
        assert tp.sent_bytes == tp_sent  # TP's norms are replicated and send nothing
    cmp = compare_stacks(d, h, f, 2, p, batch, seq, k, e, norm_first=True)
    for pp, tp in zip(cmp.phantom.blocks, cmp.tensor.blocks):
        pp_sent = sum(pp.part(x).sent_bytes for x in linears)
        # §10.6 in values per row: 8(p-1)k ghosts (4 sent at half size, 4 summed in float32), 2 norms × 2 × 2(p-1)/p × 2
        assert pp_sent == (p - 1) * rows * k * (4 * e + 4 * 4)
        assert pp.sent_bytes - pp_sent == 2 * 2 * Fraction(2 * (p - 1), p) * 2 * rows * 4
        # §10.8, forward multiply-adds per row.
        assert Fraction(pp.part("qkv").macs_fwd, rows) == Fraction(3 * d * d, p * p) + Fraction(k * d, p) + Fraction(
            3 * (p - 1) * k * d, p)
        assert Fraction(pp.part("out").macs_fwd, rows) == Fraction(d * d, p * p) + k * d
        assert Fraction(pp.part("fc1").macs_fwd, rows) == Fraction(d * f, p * p) + Fraction(k * d + (p - 1) * k * f, p)
        assert Fraction(pp.part("fc2").macs_fwd, rows) == Fraction(f * d, p * p) + Fraction(k * f + (p - 1) * k * d, p)
        assert [Fraction(tp.part(x).macs_fwd, rows) for x in linears] == [Fraction(n, p) for n in
                                                                           (3 * d * d, d * d, d * f, f * d)]
        assert pp.part("attention") == tp.part("attention")
        assert pp.part("attention").macs_fwd == 2 * batch * (h // p) * seq * seq * (d // h)


def test_input_gradient_and_ends():
    kw = dict(d_model=16, heads=4, dim_feedforward=32, layers=2, p=4, batch=2, seq=3, ghosts=2)
    rows = 6
    for grad in (False, True):
        pp, tp = stack_cost("phantom", **kw, input_requires_grad=grad), stack_cost("tensor", **kw,
                                                                                   input_requires_grad=grad)
        entry = pp.part("entry")
        assert entry.collectives_bwd == ((("all_gather", rows * 4),) if grad else ())
        assert pp.part("exit").collectives_fwd == (("all_gather", rows * 4),)
        # Post-norm: the first QKV reads the input itself; TP all-reduces its input gradient only if needed.
        assert tp.blocks[0].part("qkv").collectives_bwd == ((("all_reduce", rows * 16),) if grad else ())
        assert tp.blocks[1].part("qkv").collectives_bwd == (("all_reduce", rows * 16),)
        first, second = pp.blocks[0].part("qkv"), pp.blocks[1].part("qkv")
        assert (first.macs_bwd == second.macs_bwd) == grad
    single = compare_stacks(16, 4, 32, 2, 1, 2, 3)
    assert single.phantom.sent_bytes == single.tensor.sent_bytes == 0 and single.communication is None
    assert single.phantom.params == single.tensor.params and "n/a" in single.describe()


def test_sdpa_on_cpu_is_counted():
    q, k, v = (torch.randn(3, 2, 5, 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain, LocalFlopCounterMode() as local:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    per_product = 2 * 3 * 2 * 5 * 5 * 4  # FLOPs of one (N·h) × L × e × S product
    assert local.get_total_flops() == (2 + 5) * per_product
    assert plain.get_total_flops() == 0  # torch 2.13 lists no formula for the CPU kernel


D, H, FF, LAYERS, BATCH, SEQ = 16, 4, 32, 2, 3, 5


def counted_stack_step(dtype, ghosts, norm_first, final_norm, input_requires_grad):
    """One forward + backward of a phantom stack: every collective and the multiply-adds, per block."""
    from lightning_phantom.nn import PhantomLayerNorm, PhantomTransformerEncoder, PhantomTransformerEncoderLayer

    torch.manual_seed(0)
    layer = PhantomTransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           ghosts=ghosts, dtype=dtype)
    stack = PhantomTransformerEncoder(layer, LAYERS, PhantomLayerNorm(D, dtype=dtype) if final_norm else None)
    x = torch.randn(BATCH, SEQ, D, dtype=dtype, requires_grad=input_requires_grad)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(SEQ, dtype=dtype)
    with CommCounter() as comm, LocalFlopCounterMode(display=False) as flops:
        stack(x, mask=mask).square().sum().backward()
    counts = flops.get_flop_counts()
    per_block = [sum(counts[f"PhantomTransformerEncoder.layers.{b}"].values()) // 2 for b in range(LAYERS)]
    return {"payloads": sorted((r.op, r.numel, r.phase) for r in comm.records), "sent_fwd":
            comm.summary("forward").sent_bytes, "sent_bwd": comm.summary("backward").sent_bytes,
            "macs": flops.get_total_flops() // 2, "per_block": per_block}


@pytest.mark.parametrize("p, dtype, ghosts, norm_first, final_norm, grad", [
    (2, torch.float64, [1, 2, 3, 9], False, False, False),
    (4, torch.float32, [1, 2, 3, 5], True, True, True),
])
def test_counted_stack_step_equals_model(p, dtype, ghosts, norm_first, final_norm, grad):
    e = torch.tensor([], dtype=dtype).element_size()
    cost = stack_cost("phantom", D, H, FF, LAYERS, p, BATCH, SEQ, ghosts * LAYERS, e, norm_first=norm_first,
                      final_norm=final_norm, input_requires_grad=grad)
    for rank, r in enumerate(run_ranks(p, counted_stack_step, dtype, ghosts, norm_first, final_norm, grad)):
        assert r["payloads"] == cost.payloads(), f"rank {rank}"
        assert (r["sent_fwd"], r["sent_bwd"]) == (cost.sent_bytes_fwd, cost.sent_bytes_bwd)
        assert r["per_block"] == [block.macs for block in cost.blocks], f"rank {rank}"
        assert r["macs"] == cost.macs
