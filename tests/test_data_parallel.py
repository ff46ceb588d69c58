"""The data axis in its two modes, data(2) × phantom(2) on 4 gloo ranks.

The reference ("sync") is the plain synchronous average after backward. ``data_parallel="ddp"``
(the average overlapping backward, bucket by bucket) and ``"fsdp"`` (FSDP2 shards each FFN
over the replicas) must train to its losses and weights, with and without gradient
accumulation; ``"fsdp"`` must hold about half the parameter and optimizer bytes per rank; and
each mode resumes exactly from the other's checkpoints.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from conftest import run_ranks
from scripts.train import job

import lightning_phantom as lp
from lightning_phantom.strategy.data_parallel import DataAxis

STEPS, EVERY = 6, 3
# Clipping on (the norm of the whole model must sum FSDP's parts over the replicas too), and the
# non-finite guard, on by default, reads FSDP's sharded gradients.
RUN = dict(devices=4, phantom=2, steps=STEPS, every=EVERY, rows=64, batch_size=8, clip=0.05)


def both_modes_and_cross_resume(tmp: str) -> dict:
    out = {}
    with mock.patch.object(DataAxis, "attach", lambda self, *args: None):  # no overlap: the plain average
        out["sync"] = job(data_parallel="ddp", **RUN)
        out["sync-acc"] = job(data_parallel="ddp", accumulate=2, **{**RUN, "steps": 3})
    for mode in ("ddp", "fsdp"):
        out[f"{mode}-acc"] = job(data_parallel=mode, accumulate=2, **{**RUN, "steps": 3})
        out[mode] = job(data_parallel=mode, ckpt_dir=f"{tmp}/{mode}", **RUN)
    # Each mode resumes from the other's mid-run checkpoint.
    for mode, other in (("fsdp", "ddp"), ("ddp", "fsdp")):
        out[f"{mode}<-{other}"] = job(data_parallel=mode, resume=f"{tmp}/{other}/step={EVERY}.ckpt", **RUN)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(4, both_modes_and_cross_resume, str(tmp_path_factory.mktemp("modes")), timeout=580)


def _same_run(run: dict, reference: dict) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-5)
    assert run["state"].keys() == reference["state"].keys()
    for name in reference["state"]:
        torch.testing.assert_close(run["state"][name], reference["state"][name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("accumulate", ["", "-acc"])
def test_both_modes_train_to_the_losses_and_weights_of_the_plain_average(runs, mode, accumulate):
    for rank in runs:
        reference = rank[f"sync{accumulate}"]
        assert len(reference["losses"]) == (STEPS if not accumulate else 6)  # batches; 3 steps of 2
        assert reference["losses"][-1] < reference["losses"][0]  # it trains
        _same_run(rank[f"{mode}{accumulate}"], reference)


def test_ddp_overlaps_after_the_first_step(runs):
    for rank in runs:  # the first step averages synchronously and checks every gradient is there
        assert (rank["ddp"]["overlapped"], rank["ddp-acc"]["overlapped"]) == (STEPS - 1, 3 - 1)
        assert rank["sync"]["overlapped"] == rank["fsdp"]["overlapped"] == 0


def test_fsdp_holds_half_the_parameter_and_optimizer_bytes(runs):
    for rank in runs:
        ratio = rank["fsdp"]["storage"] / rank["ddp"]["storage"]
        assert 0.4 < ratio < 0.6, ratio


def test_resume_across_modes_is_exact(runs):
    for rank in runs:
        for mode, other in (("fsdp", "ddp"), ("ddp", "fsdp")):
            resumed, whole = rank[f"{mode}<-{other}"], rank[other]
            assert resumed["step"] == STEPS
            _same_run({**resumed, "losses": [*whole["losses"][:EVERY], *resumed["losses"]]}, whole)


def test_bad_data_parallel_mode_fails_in_the_constructor():
    with pytest.raises(ValueError, match=r"data_parallel must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        lp.PhantomStrategy(data_parallel="zero3")


# ------------------------------------------------ bytes on the data axis, counted against the cost model
SIZES = [4, 6, 8, 2]  # every parameter's first dimension even: FSDP pads nothing on 2 replicas


def data_axis_bytes(mode: str) -> dict:
    """One PhantomFFN (phantom group of one) on data(2): counted collectives of one training step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_phantom.cost.counting import CommCounter
    from lightning_phantom.nn.layers import PhantomFFN
    from lightning_phantom.strategy.data_parallel import shard_over_data
    from lightning_phantom.strategy.grad_buckets import GradientBuckets

    torch.manual_seed(0)
    ffn = PhantomFFN(SIZES, shard=(0, 1))
    params = sum(p.numel() for p in ffn.parameters())
    x = torch.randn(5, SIZES[0]) + dist.get_rank()  # each replica its own batch
    reference = torch.autograd.grad(ffn(x).square().sum(), list(ffn.parameters()))
    reference = [g.clone() for g in reference]
    for g in reference:
        dist.all_reduce(g)
        g.div_(2)
    if mode == "fsdp":
        shard_over_data(ffn, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
    else:
        buckets = GradientBuckets(list(ffn.parameters()), dist.group.WORLD, 2, bucket_numel=40)
        buckets.armed = True
    with CommCounter() as comm:
        ffn(x).square().sum().backward()
        if mode == "ddp":
            buckets.finish(lambda: pytest.fail("the buckets were armed"))
    grads = [p.grad.full_tensor() if mode == "fsdp" else p.grad for p in ffn.parameters()]
    return {"params": params, "sent": comm.sent_bytes, "calls": dict(comm.calls), "grads": grads,
            "phases": {r.phase for r in comm.records},
            "reference": reference, "buckets": None if mode == "fsdp" else len(buckets.buckets)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_axis_bytes_match_the_cost_model(mode):
    from lightning_phantom.cost.data_axis import data_axis_cost

    for rank in run_ranks(2, data_axis_bytes, mode):
        for got, want in zip(rank["grads"], rank["reference"]):
            torch.testing.assert_close(got, want)  # the replicas' mean, in either mode
        cost = data_axis_cost(rank["params"], 2, mode)
        assert rank["sent"] == cost.sent_bytes
        if mode == "ddp":  # one all-reduce per bucket (40 elements or less), the same bytes in all
            assert rank["buckets"] > 1 and rank["calls"] == {"all_reduce": rank["buckets"]}
            assert rank["phases"] == {"backward"}  # started during backward, not after it
        else:  # gathered for forward, again for backward; gradients reduce-scattered once
            assert rank["calls"] == {"all_gather": 2, "reduce_scatter": 1}


# ---------------------------------------------------------------- the buckets themselves
SHAPES = ((40, 2), (3,), (5,))  # a large gradient (80 >= in_place_numel) and two small ones


def buckets_over_two_replicas() -> dict:
    """``GradientBuckets`` on 2 replicas (the data group is the world). Replica r's gradient of
    parameter i is (i + 1)(r + 1) everywhere, so the mean is (i + 1) * 1.5 exactly."""
    from lightning_phantom.strategy.grad_buckets import GradientBuckets

    rank = torch.distributed.get_rank()
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    index = {id(p): i for i, p in enumerate(params)}
    buckets = GradientBuckets(params, None, 2, in_place_numel=64)
    seen = []
    buckets.observe = lambda ps, values: seen.append(([index[id(p)] for p in ps], values.clone()))
    out = {"buckets": [[index[id(p)] for p in b] for b in buckets.buckets]}
    for step in range(2):  # the first step is synchronous (here: a stand-in) and arms the buckets
        sum((i + 1) * (rank + 1) * p.sum() for i, p in enumerate(params)).backward()
        local = [p.grad for p in params]
        buckets.finish(lambda: True)
        if step == 1:
            out["same_object"] = [p.grad is g for p, g in zip(params, local)]
            out["base"] = [p.grad._base is not None and p.grad._base.data_ptr() for p in params]
            out["grads"] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    out["seen"] = seen
    buckets.remove()
    return out


def test_buckets_average_in_place_or_into_views_and_show_the_guard_local_values():
    for rank, out in enumerate(run_ranks(2, buckets_over_two_replicas)):
        assert out["buckets"] == [[2, 1], [0]]  # backward meets the last parameters first
        for i, grad in enumerate(out["grads"]):
            torch.testing.assert_close(grad, torch.full(SHAPES[i], (i + 1) * 1.5), rtol=0, atol=0)
        assert out["same_object"] == [True, False, False]  # the large one in place, no copy
        assert out["base"][1] == out["base"][2] and out["base"][1]  # the small ones: views of one buffer
        # observe saw each bucket once, with this replica's own values divided by the replicas
        assert [indices for indices, _ in out["seen"]] == [[2, 1], [0]]
        for indices, values in out["seen"]:
            want = torch.cat([torch.full(SHAPES[i], (i + 1) * (rank + 1) / 2).flatten() for i in indices])
            torch.testing.assert_close(values.flatten(), want, rtol=0, atol=0)
