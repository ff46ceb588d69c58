"""The analytic cost model (lightning_phantom.cost.model) and its check against counted bytes and FLOPs.

The table tests hold ``cost`` to the cost table of docs/operator.md §8; the distributed tests hold it to
what ``CommCounter`` and ``FlopCounterMode`` count for one forward + backward of a
``PhantomFFN`` on gloo ranks. The TP side is checked in test_tensor_parallel.py.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import run_ranks

from lightning_phantom.cost.model import compare, phantom_cost, tp_cost

# (n, p, k): hidden width, group size, ghosts per rank
TABLE = [(64, 4, 2), (64, 2, 1), (96, 4, 8), (128, 8, 3), (36, 3, 12), (32, 4, 8)]


@pytest.mark.parametrize("n,p,k", TABLE)
def test_hidden_layer_reproduces_the_table(n, p, k):
    rows, e = 7, 8  # the table counts values: an element size the partial sums are added in too
    cmp = compare([5, n, n, n, n, n, 3], p, k, rows, e)
    hidden = range(1, 5)  # phantom layers; TP alternates Rowwise and Colwise over them
    for layer in hidden:
        ratio = cmp.per_layer[layer]
        assert ratio.communication == Fraction(p * k, n)
        assert ratio.arithmetic == Fraction(1, p) + Fraction(p * k, n)
        pp, tp = cmp.phantom.per_layer[layer], cmp.tensor.per_layer[layer]
        # Absolute entries of the table, per input row (bias left out as the table does).
        assert Fraction(pp.macs_fwd, rows) == Fraction(n * n, p * p) + n * k
        assert pp.params - n // p == Fraction(n * n, p * p) + n * k
        assert Fraction(tp.macs_fwd, rows) == Fraction(n * n, p)
        assert pp.sent_bytes / (rows * e) == 2 * (p - 1) * k
        assert tp.sent_bytes / (rows * e) == Fraction(2 * (p - 1) * n, p)
        assert pp.macs_bwd == 2 * pp.macs_fwd and tp.macs_bwd == 2 * tp.macs_fwd


def test_half_precision_partial_sums_are_counted_in_float32():
    """Under bfloat16 only the ghost all-gather sends 2-byte values; the collectives that add partial
    sums send float32 (ops.comm.accumulation_dtype), TP's all at 2 bytes but the input gradient."""
    from lightning_phantom.cost.model import accumulation_size

    assert [accumulation_size(e) for e in (2, 4, 8)] == [4, 4, 8]
    sizes, p, k, rows = [6, 16, 16, 16, 5], 4, 2, 3
    pp = phantom_cost(sizes, p, k, rows, 2, input_requires_grad=True, norms={1: "layernorm"})
    assert (pp.element_size, pp.accumulation_size, pp.input_element_size) == (2, 4, 2)
    first, norm, hidden, _, last = pp.per_layer
    assert first.element_sizes_bwd == (4,) and first.sent_bytes_bwd == Fraction(2 * 3 * rows * 6 * 4, 4)
    assert norm.element_sizes_fwd == norm.element_sizes_bwd == (4,)
    assert (hidden.element_sizes_fwd, hidden.element_sizes_bwd) == ((2,), (4,))
    assert hidden.sent_bytes == 3 * rows * k * (2 + 4)  # all-gather of bf16 ghosts, reduce-scatter in fp32
    assert last.element_sizes_fwd == (4,) and last.sent_bytes_fwd == Fraction(2 * 3 * rows * 5 * 4, 4)
    assert pp.payloads(element_sizes=True)[0] == ("all_gather", rows * k, 2, "forward")
    # Per hidden layer, PP/TP bytes are 3/2 of the table's p·k/n in values: TP sums in bfloat16.
    n = 16
    assert compare(sizes, p, k, rows, 2).per_layer[1].communication == Fraction(3 * p * k, 2 * n)
    tp = tp_cost(sizes, p, rows, 2, input_requires_grad=True, input_element_size=4)
    assert [x.element_sizes_bwd for x in tp.per_layer] == [(4,), (), (2,), ()]  # float32 data's gradient
    assert {e for x in tp.per_layer for e in x.element_sizes_fwd} == {2}
    assert tp.accumulation_size == 2


def test_first_and_last_layers():
    sizes, p, rows, e = [10, 16, 24, 7], 4, 3, 4
    for grad in (False, True):
        first, _, last = phantom_cost(sizes, p, 2, rows, e, input_requires_grad=grad).per_layer
        assert (first.kind, first.params, first.macs_fwd) == ("column", 4 * 10 + 4, rows * 4 * 10)
        assert first.collectives_fwd == () and first.sent_bytes_fwd == 0
        assert first.macs_bwd == (2 if grad else 1) * first.macs_fwd
        assert first.collectives_bwd == ((("all_reduce", rows * 10),) if grad else ())
        assert first.sent_bytes_bwd == (Fraction(2 * 3 * rows * 10 * e, 4) if grad else 0)
        assert (last.kind, last.params, last.macs_fwd, last.macs_bwd) == ("row", 7 * 6 + 7, rows * 7 * 6,
                                                                        2 * rows * 7 * 6)
        assert last.collectives_fwd == (("all_reduce", rows * 7),) and last.collectives_bwd == ()
        assert last.sent_bytes_fwd == Fraction(2 * 3 * rows * 7 * e, 4) and last.sent_bytes_bwd == 0

    # TP with an odd layer count ends in a Colwise layer whose output is all-gathered.
    tp = tp_cost([10, 16, 24, 8], p, rows, e)
    first, mid, last = tp.per_layer
    assert [first.kind, mid.kind, last.kind] == ["colwise", "rowwise", "colwise_gather"]
    assert first.collectives_bwd == () and first.macs_bwd == first.macs_fwd
    assert mid.params == 24 * 4 + 24 and mid.collectives_fwd == (("all_reduce", rows * 24),)
    assert last.collectives_fwd == (("all_gather", rows * 2),) and last.sent_bytes_fwd == 3 * rows * 2 * e
    assert last.collectives_bwd == (("all_reduce", rows * 24),)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("make", [
    lambda g: phantom_cost([9, 32, 48, 16, 5], 4, [3, 5], 6, 8, input_requires_grad=g),
    lambda g: tp_cost([9, 32, 48, 16, 5], 4, 6, 8, input_requires_grad=g),
    lambda g: tp_cost([9, 32, 48, 16], 4, 6, 2, input_requires_grad=g),
])
def test_per_layer_sums_are_the_totals(make, grad):
    step = make(grad)
    layers = step.per_layer
    assert step.params == sum(layer.params for layer in layers)
    assert step.macs == sum(layer.macs for layer in layers)
    assert step.flops == 2 * step.macs == sum(layer.flops for layer in layers)
    assert step.sent_bytes == sum(layer.sent_bytes for layer in layers)
    assert step.sent_bytes_fwd == sum(layer.sent_bytes_fwd for layer in layers)
    assert sum(step.calls.values()) == sum(len(x.collectives_fwd) + len(x.collectives_bwd) for x in layers)


def test_width_growth_at_fixed_ghosts():
    """PP's hidden-layer traffic depends on ghosts, not width; TP's grows with the width."""
    narrow, wide = compare([8, 32, 32, 32, 8], 4, 2, 5), compare([8, 128, 128, 128, 8], 4, 2, 5)
    for layer in (1, 2):
        assert narrow.phantom.per_layer[layer].sent_bytes == wide.phantom.per_layer[layer].sent_bytes
        assert wide.tensor.per_layer[layer].sent_bytes == 4 * narrow.tensor.per_layer[layer].sent_bytes
    assert wide.communication < narrow.communication


def test_group_of_one_and_describe():
    single = compare([8, 16, 16, 4], 1, 2, 3)
    assert single.phantom.sent_bytes == single.tensor.sent_bytes == 0
    assert single.communication is None and not single.phantom.calls
    assert single.phantom.params == single.tensor.params  # p=1: the phantom layer is a plain Linear
    line = compare([16, 64, 64, 64, 8], 4, 2, 10).describe()
    assert "\n" not in line and "params/rank" in line and "x)" in line and "n/a" in single.describe()


@pytest.mark.parametrize("call,words", [
    (lambda: phantom_cost([8, 30, 32, 4], 4, 2, 1), "sizes[1] = 30 is not divisible by p = 4 (30 % 4 = 2)"),
    (lambda: phantom_cost([8, 32, 32, 4], 4, 0, 1), "1 <= ghosts <= n_in/p = 32/4 = 8, got 0"),
    (lambda: phantom_cost([8, 32, 32, 4], 4, 9, 1), "32/4 = 8, got 9"),
    (lambda: phantom_cost([8, 32, 32, 32, 4], 4, [2], 1), "ghosts has 1 entries"),
    (lambda: phantom_cost([8, 32, 32, 4], 4, 2.5, 1), "ghosts must be 'auto', 'full', a positive int"),
    (lambda: phantom_cost([8, 32, 32, 4], 0, 2, 1), "p must be an integer >= 1, got 0"),
    (lambda: phantom_cost([8, 4], 2, 1, 1), "at least 2 Linear layers"),
    (lambda: phantom_cost([8, 32, 32, 4], 4, 2, 0), "rows must be an integer >= 1"),
    (lambda: tp_cost([8, 32, 32, 6], 4, 1), "sizes[3] = 6 is not divisible by p = 4"),
    (lambda: tp_cost([8, 32, 30, 6, 2], 4, 1), "sizes[2] = 30"),
    (lambda: compare([8, 32, 32, 4], -1, 2, 1), "p must be"),
])
def test_validation(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert words in str(err.value)


# --- counted against the model ----------------------------------------------------------

def _phantom_step(sizes, ghosts, rows, dtype, input_requires_grad, seed=0, autocast=False, layernorm=False):
    """One forward + backward, counted; ``autocast``: under bfloat16 autocast (float32 weights and
    input); ``layernorm``: a PhantomLayerNorm after the first layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
    from lightning_phantom.nn.layers import PhantomFFN
    from lightning_phantom.nn.norms import PhantomLayerNorm

    torch.manual_seed(seed)
    ffn = PhantomFFN(sizes, ghosts, dtype=dtype)
    if layernorm:
        ffn.insert(1, PhantomLayerNorm(sizes[1], dtype=dtype))
    x = torch.randn(rows, sizes[0], dtype=dtype, requires_grad=input_requires_grad)
    with CommCounter() as comm, FlopCounterMode(display=False) as plain, LocalFlopCounterMode() as flops, \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        ffn(x).float().square().sum().backward()
    return {
        "sent_bytes": comm.sent_bytes,
        "sent_fwd": comm.summary("forward").sent_bytes,
        "sent_bwd": comm.summary("backward").sent_bytes,
        "calls": comm.calls,
        "payloads": sorted((r.op, r.numel, r.phase) for r in comm.records),
        "sized": sorted((r.op, r.numel, r.element_size, r.phase) for r in comm.records),
        "hidden_sent": sum(r.sent_bytes for r in comm.records if r.op in ("all_gather", "reduce_scatter")),
        "flops": flops.get_total_flops(),
        "plain_flops": plain.get_total_flops(),
    }


PHANTOM_CASES = [
    (2, [6, 8, 12, 8, 5], [2, 3], torch.float32, False),
    (2, [6, 8, 12, 8, 5], [2, 3], torch.float64, True),
    (2, [6, 8, 12, 4], 1, torch.float64, False),
    (4, [6, 8, 12, 8, 5], [1, 2], torch.float32, True),
    (4, [6, 8, 12, 8, 5], [2, 3], torch.float64, False),
]


@pytest.mark.parametrize("p,sizes,ghosts,dtype,input_requires_grad", PHANTOM_CASES)
def test_counted_phantom_step_equals_model(p, sizes, ghosts, dtype, input_requires_grad):
    rows = 5
    cost = phantom_cost(sizes, p, ghosts, rows, torch.tensor([], dtype=dtype).element_size(),
                        input_requires_grad=input_requires_grad)
    for rank, r in enumerate(run_ranks(p, _phantom_step, sizes, ghosts, rows, dtype, input_requires_grad)):
        assert r["payloads"] == cost.payloads(), f"rank {rank}"
        assert r["sized"] == cost.payloads(element_sizes=True)
        assert r["calls"] == cost.calls
        assert r["sent_bytes"] == cost.sent_bytes
        assert (r["sent_fwd"], r["sent_bwd"]) == (cost.sent_bytes_fwd, cost.sent_bytes_bwd)
        assert r["flops"] == cost.flops, f"rank {rank}: counted {r['flops']} FLOPs, model {cost.flops}"
        # torch's FlopCounterMode has no formula for the operator's in-place addmm_ (counts 0).
        assert r["plain_flops"] <= cost.flops


@pytest.mark.parametrize("p,autocast,dtype,layernorm", [(2, True, torch.float32, True),
                                                      (4, False, torch.bfloat16, False)])
def test_counted_bfloat16_step_sends_partial_sums_in_float32(p, autocast, dtype, layernorm):
    """bf16 autocast over float32 weights and data, and bfloat16 weights and data: each call's
    bytes per element and the totals are the model's with element_size=2 (input_element_size: the
    data's), not 2 bytes everywhere."""
    sizes, ghosts, rows = [6, 8, 12, 8, 5], [2, 3], 5
    cost = phantom_cost(sizes, p, ghosts, rows, 2, input_requires_grad=True,
                        input_element_size=dtype.itemsize, norms={1: "layernorm"} if layernorm else None)
    assert cost.sent_bytes > phantom_cost(sizes, p, ghosts, rows, 2).sent_bytes  # what was undercounted
    for rank, r in enumerate(run_ranks(p, _phantom_step, sizes, ghosts, rows, dtype, True, autocast=autocast,
                                       layernorm=layernorm)):
        assert r["sized"] == cost.payloads(element_sizes=True), f"rank {rank}"
        assert (r["sent_fwd"], r["sent_bwd"]) == (cost.sent_bytes_fwd, cost.sent_bytes_bwd)


@pytest.mark.parametrize("p", [2, 4])
def test_counted_phantom_traffic_does_not_grow_with_width(p):
    rows, ghosts = 4, 2
    narrow = run_ranks(p, _phantom_step, [8, 16, 16, 16, 8], ghosts, rows, torch.float32, False)[0]
    wide = run_ranks(p, _phantom_step, [8, 64, 64, 64, 8], ghosts, rows, torch.float32, False)[0]
    assert narrow["hidden_sent"] == wide["hidden_sent"] == 2 * 2 * (p - 1) * rows * ghosts * 4
    # With d_in and d_out fixed (and no input gradient) the whole step sends the same bytes,
    # while TP's traffic grows with the width.
    assert narrow["sent_bytes"] == wide["sent_bytes"]
    assert tp_cost([8, 64, 64, 64, 8], p, rows).sent_bytes > tp_cost([8, 16, 16, 16, 8], p, rows).sent_bytes


# --- the counter itself ----------------------------------------------------------------

def _counter_checks():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_phantom.cost.counting import CommCounter

    rank, p = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(p)]  # every rank takes part in every new_group
    original = dist.all_reduce
    t = torch.ones(6, dtype=torch.float64)
    with CommCounter() as outer:
        with CommCounter() as inner:
            dist.all_reduce(t, group=singles[rank])  # a group of one: recorded, 0 bytes
            # The deprecated name calls all_gather_single inside: counted once, as what was called.
            dist.all_gather_into_tensor(torch.empty(6 * p), torch.ones(6), async_op=True).wait()
        dist.all_to_all_single(torch.empty(4 * p), torch.ones(4 * p))
        # DTensor redistributes b inside its own dispatch (Shard(0) @ Shard(0)): still counted.
        mesh = init_device_mesh("cpu", (p,))
        a = distribute_tensor(torch.ones(2 * p, 4), mesh, [Shard(0)])
        b = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
        c = a @ b
    return {
        "restored": dist.all_reduce is original,
        "inner": [(r.op, r.group_size, r.sent_bytes) for r in inner.records],
        "outer_calls": outer.calls,
        "outer_apis": [r.api for r in outer.records],
        "c": c.full_tensor().sum().item(),
    }


def test_comm_counter_records_and_restores():
    p = 2
    for r in run_ranks(p, _counter_checks):
        assert r["restored"]
        assert r["inner"] == [("all_reduce", 1, 0), ("all_gather", p, (p - 1) * 6 * 4)]
        assert r["outer_calls"]["all_to_all"] == 1 and r["outer_calls"]["all_reduce"] == 1
        apis = ["dist.all_reduce", "dist.all_gather_into_tensor", "dist.all_to_all_single"]
        assert r["outer_apis"][:3] == apis
        assert any(api.startswith("_c10d_functional.") for api in r["outer_apis"][3:]), r["outer_apis"]
        assert r["c"] == 2 * p * 3 * 4
