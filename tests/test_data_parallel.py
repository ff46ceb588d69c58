"""The data axis in its two modes, data(2) × phantom(2) on 4 gloo ranks.

``data_parallel="ddp"`` (whole shards per replica, gradients averaged) is the reference;
``"fsdp"`` (FSDP2 shards each FFN over the replicas) must train to the same losses and
weights, hold about half the parameter and optimizer bytes per rank, and read and write
checkpoints that the other mode resumes from exactly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_ranks
from scripts.train import job

import lightning_phantom as lp

STEPS, EVERY = 6, 3
# Clipping on (the norm of the whole model must sum FSDP's parts over the replicas too), and the
# non-finite guard, on by default, reads FSDP's sharded gradients.
RUN = dict(devices=4, phantom=2, steps=STEPS, every=EVERY, rows=64, batch_size=8, clip=0.05)


def both_modes_and_cross_resume(tmp: str) -> dict:
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = job(data_parallel=mode, ckpt_dir=f"{tmp}/{mode}", **RUN)
    # Each mode resumes from the other's mid-run checkpoint.
    for mode, other in (("fsdp", "ddp"), ("ddp", "fsdp")):
        out[f"{mode}<-{other}"] = job(data_parallel=mode, resume=f"{tmp}/{other}/step={EVERY}.ckpt", **RUN)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(4, both_modes_and_cross_resume, str(tmp_path_factory.mktemp("modes")), timeout=400)


def test_fsdp_trains_to_the_losses_and_weights_of_ddp(runs):
    for rank in runs:
        ddp, fsdp = rank["ddp"], rank["fsdp"]
        assert len(ddp["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-5)
        assert ddp["losses"][-1] < ddp["losses"][0]  # it trains
        assert ddp["state"].keys() == fsdp["state"].keys()
        for name in ddp["state"]:
            torch.testing.assert_close(fsdp["state"][name], ddp["state"][name], rtol=1e-5, atol=1e-5)


def test_fsdp_holds_half_the_parameter_and_optimizer_bytes(runs):
    for rank in runs:
        ratio = rank["fsdp"]["storage"] / rank["ddp"]["storage"]
        assert 0.4 < ratio < 0.6, ratio


def test_resume_across_modes_is_exact(runs):
    for rank in runs:
        for mode, other in (("fsdp", "ddp"), ("ddp", "fsdp")):
            resumed, whole = rank[f"{mode}<-{other}"], rank[other]
            assert resumed["step"] == STEPS
            torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"][EVERY:]),
                                       rtol=1e-5, atol=1e-5)
            for name in whole["state"]:
                torch.testing.assert_close(resumed["state"][name], whole["state"][name], rtol=1e-5, atol=1e-5)


def test_bad_data_parallel_mode_fails_in_the_constructor():
    with pytest.raises(ValueError, match=r"data_parallel must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        lp.PhantomStrategy(data_parallel="zero3")
