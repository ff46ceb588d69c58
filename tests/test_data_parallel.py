"""The data axis in its two modes, data(2) × phantom(2) on 4 gloo ranks.

The reference ("sync") is the plain synchronous average after backward. ``data_parallel="ddp"``
(the average overlapping backward, bucket by bucket) and ``"fsdp"`` (FSDP2 shards each FFN
over the replicas) must train to its losses and weights, with and without gradient
accumulation; ``"fsdp"`` must hold about half the parameter and optimizer bytes per rank; and
each mode resumes exactly from the other's checkpoints.
"""

from __future__ import annotations

import time
from unittest import mock

import lightning as L
import pytest
import torch

from conftest import run_ranks
from scripts.train import Batches, Regression, job

import lightning_phantom as lp
from lightning_phantom.strategy.data_parallel import DataAxis

STEPS, EVERY = 6, 3
# Clipping on (the norm of the whole model must sum FSDP's parts over the replicas too), and the
# non-finite guard, on by default, reads FSDP's sharded gradients. Adam and clipping would hide a
# gradient off by a constant factor from the losses and weights: each step's averaged gradients
# (before clipping) are compared too.
RUN = dict(devices=4, phantom=2, steps=STEPS, every=EVERY, rows=64, batch_size=8, clip=0.05, grads=True)


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
    assert len(run["grads"]) == len(reference["grads"]) > 0
    for step, (grads, expected) in enumerate(zip(run["grads"], reference["grads"])):
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


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
            _same_run({**resumed, "losses": [*whole["losses"][:EVERY], *resumed["losses"]],
                       "grads": [*whole["grads"][:EVERY], *resumed["grads"]]}, whole)


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


# ---------------------------------------------------------------- manual optimization
class TwoBackwards(Regression):
    """Manual optimization: two ``manual_backward`` calls (the batch's two halves) before each step."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.automatic_optimization = False
        self.means: list[dict] = []  # per step: the plain mean over the replicas of this rank's gradients
        self.stepped: list[dict] = []  # per step: the gradients the optimizer stepped with

    def training_step(self, batch, batch_idx):
        import torch.nn.functional as F

        optimizer = self.optimizers()
        optimizer.zero_grad()
        halves = [F.mse_loss(self(x), y) for x, y in zip(batch[0].chunk(2), batch[1].chunk(2))]
        params = dict(self.named_parameters())
        # The reference, without touching .grad: the sum of both backwards' gradients, averaged over
        # the replicas of this rank's shard by a plain all-reduce.
        local = torch.autograd.grad(sum(halves), list(params.values()), retain_graph=True)
        group = self.trainer.strategy.data_parallel_group
        means = {}
        for name, g in zip(params, local):
            g = g.clone()
            torch.distributed.all_reduce(g, group=group)
            means[name] = g / torch.distributed.get_world_size(group)
        self.means.append(means)
        for loss in halves:
            self.manual_backward(loss)
        optimizer.step()

    def on_before_optimizer_step(self, optimizer):
        self.stepped.append({n: p.grad.clone() for n, p in self.named_parameters()})


def manual_optimization_gradients() -> list:
    L.seed_everything(0)
    model = TwoBackwards()
    loader = Batches(rows=64, batch_size=8, phantom=2)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2),
                        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader.trainer = trainer
    trainer.fit(model, loader)
    return [(means, stepped) for means, stepped in zip(model.means, model.stepped)]


def test_manual_optimization_steps_with_the_mean_of_every_backward():
    for rank in run_ranks(4, manual_optimization_gradients):
        assert len(rank) == 3
        for means, stepped in rank:  # steps 2 and 3 are where overlapped buckets lost the second backward
            assert means.keys() == stepped.keys()
            for name in means:
                torch.testing.assert_close(stepped[name], means[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- gradients on some replicas only
class SometimesUnused(Regression):
    """``head`` gets no gradient on data replica 1 at global step 2 (ranks 2 and 3): after the first step
    armed the overlapped buckets."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.head = torch.nn.Linear(4, 4)
        self.started = 0.0

    def training_step(self, batch, batch_idx):
        import torch.nn.functional as F

        y = self(batch[0])
        if not (self.trainer.global_step == 2 and self.global_rank >= 2):
            y = self.head(y)
        return F.mse_loss(y, batch[1])

    def on_train_batch_start(self, batch, batch_idx):
        self.started = time.monotonic()


def gradient_on_some_replicas_only() -> dict:
    from lightning_phantom.strategy.step import MissingGradientError

    L.seed_everything(0)
    model = SometimesUnused()
    loader = Batches(rows=64, batch_size=8, phantom=2)
    strategy = lp.PhantomStrategy(phantom_parallel_size=2, timeout=30)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader.trainer = trainer
    try:
        trainer.fit(model, loader)
        return {"error": None}
    except MissingGradientError as e:
        return {"error": str(e), "step": e.step, "shapes": e.shapes, "seconds": time.monotonic() - model.started,
                "overlapped": strategy.data_axis.overlapped_steps}


def test_a_gradient_missing_on_some_replicas_stops_every_rank_at_once():
    for rank in run_ranks(4, gradient_on_some_replicas_only, timeout=120):
        assert rank["error"] is not None and rank["step"] == 2 and rank["overlapped"] == 2
        assert rank["shapes"] == {2: [(4,), (4, 4)], 3: [(4,), (4, 4)]}  # head.bias, head.weight (bucket order)
        assert "at global step 2 (epoch 0, batch 2) parameters got none on some replicas only" in rank["error"]
        assert rank["seconds"] < 10  # not the 30 s collective timeout


# ---------------------------------------------------------------- buffers
class Normalised(Regression):
    """BatchNorm1d outside the FFN (replicated over the phantom group) and inside it (sharded)."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__(optimizer="sgd", lr=0.1)
        self.norm = nn.BatchNorm1d(6)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                 nn.Linear(8, 4))
        self.seen: list[dict] = []  # each step's floating buffers as its forward is about to start

    def forward(self, x):
        return self.net(self.norm(x))

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in self.named_buffers() if v.is_floating_point()})


def buffers_across_replicas(tmp: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = {}
    for name, model in (("plain", Regression(optimizer="sgd")), ("batchnorm", Normalised())):
        L.seed_everything(0)
        loader = Batches(rows=64, batch_size=8, phantom=2)
        checkpoint = ModelCheckpoint(dirpath=f"{tmp}/{name}", filename="{step}", every_n_train_steps=3)
        trainer = L.Trainer(accelerator="cpu", devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2),
                            max_steps=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        loader.trainer = trainer
        trainer.fit(model, loader)
        out[name] = {"broadcasts": trainer.strategy._buffers.broadcasts, "seen": getattr(model, "seen", None),
                     "final": {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}}
    keys = trainer.strategy.shard_keys()
    saved = {f"model::{keys.get(k, k)}": torch.empty_like(v) for k, v in out["batchnorm"]["final"].items()}
    dcp.load(saved, checkpoint_id=f"{tmp}/batchnorm/step=3.ckpt", no_dist=True)
    out["saved"] = {k.split("::")[1].split("|")[0]: v for k, v in saved.items()}
    return out


def test_buffers_are_rank_0s_before_every_forward_and_in_the_checkpoint(tmp_path):
    ranks = run_ranks(4, buffers_across_replicas, str(tmp_path))
    for first, replica in ((0, 2), (1, 3)):  # the two replicas of each phantom rank
        seen = [ranks[r]["batchnorm"]["seen"] for r in (first, replica)]
        for step in range(3):  # equal before every forward; from step 2 on, after different batches
            assert seen[0][step].keys() == {"norm.running_mean", "norm.running_var", "net.3.running_mean",
                                            "net.3.running_var"}
            for name, value in seen[0][step].items():
                torch.testing.assert_close(seen[1][step][name], value, rtol=0, atol=0)
        assert not torch.equal(seen[0][1]["net.3.running_mean"], seen[0][0]["net.3.running_mean"])  # they train
        for rank in (first, replica):  # the checkpoint holds rank 0's, and so does every replica after it
            for name, value in ranks[first]["batchnorm"]["final"].items():
                torch.testing.assert_close(ranks[rank]["saved"][name], value, rtol=0, atol=0)
                torch.testing.assert_close(ranks[rank]["batchnorm"]["final"][name], value, rtol=0, atol=0)
    for rank in ranks:
        assert rank["plain"]["broadcasts"] == 0  # no floating buffers: nothing sent
        assert rank["batchnorm"]["broadcasts"] == 3  # before steps 2 and 3, and before the checkpoint


# ---------------------------------------------------------------- bf16-mixed and to_dense under fsdp
def bf16_in_both_modes_then_export() -> dict:
    run = dict(devices=4, phantom=2, steps=4, rows=64, batch_size=8, precision="bf16-mixed", optimizer="sgd", lr=0.1)
    return {mode: job(data_parallel=mode, export=True, **run) for mode in ("ddp", "fsdp")}


def test_bf16_mixed_under_fsdp_trains_as_under_ddp_and_exports_to_dense():
    for rank in run_ranks(4, bf16_in_both_modes_then_export):
        ddp, fsdp = rank["ddp"], rank["fsdp"]
        assert len(fsdp["losses"]) == 4 and all(torch.isfinite(torch.tensor(fsdp["losses"])))
        # The same bfloat16 arithmetic; only the float32 gradient sums are ordered differently.
        torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-3, atol=1e-4)
        for name, value in ddp["state"].items():
            torch.testing.assert_close(fsdp["state"][name], value, rtol=1e-3, atol=1e-4)
        for mode in (ddp, fsdp):  # to_dense of what each mode trained computes what the shards compute
            assert mode["export_error"] < 1e-5
