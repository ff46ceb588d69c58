"""One batch per phantom group: DataLoader workers seeded by data-parallel rank, and every step checked.

The ranks of a phantom group must multiply the same batch. ``seed_everything(workers=True)``
seeds workers by global rank in Lightning; the strategy seeds them by data-parallel rank
(a real program with DataLoader workers, which the daemonic rank pool cannot start). Any
other cause of different batches (here: a sampler that shards by global rank) stops every
rank with ``BatchMismatchError`` before the optimizer step, under automatic and manual
optimization, with the guard on or off, from one phantom group to every replica.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

import lightning_phantom as lp
from conftest import run_ranks
from lightning_phantom.cost.counting import CommCounter
from lightning_phantom.strategy.batches import BatchCheck, BatchMismatchError, fingerprint, hash_bits
from scripts.train import Regression, dataset

SCRIPT = Path(__file__).parent / "scripts" / "noisy_batches.py"


def test_workers_of_a_phantom_group_draw_the_same_augmentation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=SCRIPT.parent.parent, env=env, timeout=240,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    digests = {(int(r), int(s)): d for r, s, d in re.findall(r"^rank (\d) step (\d+) batch (.*)$", run.stdout,
                                                             re.MULTILINE)}
    assert sorted(digests) == [(r, s) for r in (0, 1) for s in range(3)]
    for step in range(3):  # the noise drawn in the workers is the same on both ranks of the group
        assert digests[(0, step)] == digests[(1, step)]
    assert len({digests[(0, s)] for s in range(3)}) == 3 and "rank 0 done" in run.stdout


# ------------------------------------------------------------------ the check
class ShardByGlobalRank(Sampler):
    """A user's sampler that ignores the strategy: rows i ≡ r (mod world) on global rank r, except where
    ``same`` maps a rank to another (that rank then reads the other's rows)."""

    def __init__(self, rows: int, same: dict) -> None:
        self.rows, self.same = rows, same

    def __iter__(self):
        rank = self.same.get(dist.get_rank(), dist.get_rank())
        return iter(range(rank, self.rows, dist.get_world_size()))

    def __len__(self) -> int:
        return self.rows // dist.get_world_size()


class Manual(Regression):
    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()
        return loss


def fit_with_sampler(same: dict, manual: bool, detect: bool, check: bool = True) -> dict:
    L.seed_everything(0)
    x, y = dataset(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, sampler=ShardByGlobalRank(64, same))
    model = Manual() if manual else Regression(optimizer="sgd", lr=0.1)
    strategy = lp.PhantomStrategy(phantom_parallel_size=2, detect_non_finite=detect)
    trainer = L.Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=strategy, max_steps=2,
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    steps = []

    initial = {}

    class Count(L.Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not check:
                trainer.strategy._batch_check = None
            self.counter = CommCounter().__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.counter.__exit__(None, None, None)
            self.counter, counted = None, self.counter
            steps.append((dict(counted.calls), counted.payload_bytes))

    count = Count()
    trainer.callbacks.append(count)
    try:
        trainer.fit(model, loader)
        error = None
    except BatchMismatchError as e:
        error = {"message": str(e), "step": e.step}
    finally:  # a step stopped by the error never reaches on_train_batch_end: leave no dispatch mode behind
        if getattr(count, "counter", None) is not None:
            count.counter.__exit__(None, None, None)
    state = model.state_dict()
    return {"error": error, "step": trainer.global_step, "steps": steps, "state": state,
            "untouched": all(torch.equal(state[k], v) for k, v in initial.items())}


def different_batches_on_two_ranks() -> dict:
    apart = {1: 0}  # rank 1 reads rank 0's rows: the one group sees one batch
    return {"automatic": fit_with_sampler({}, manual=False, detect=True),
            "manual, no guard": fit_with_sampler({}, manual=True, detect=False),
            "same, checked": fit_with_sampler(apart, manual=False, detect=False),
            "same, unchecked": fit_with_sampler(apart, manual=False, detect=False, check=False)}


def test_different_batches_in_a_phantom_group_stop_every_rank_before_the_step():
    for rank in run_ranks(2, different_batches_on_two_ranks):
        for name in ("automatic", "manual, no guard"):
            error = rank[name]["error"]
            assert error is not None and error["step"] == 0 and rank[name]["step"] == 0, name
            assert rank[name]["untouched"]  # the optimizer step never ran
            assert "The ranks of 1 of 1 phantom group(s) trained on different batches at global step 0 " \
                   "(epoch 0, batch 0)" in error["message"]
            assert "before this optimizer step" in error["message"] and "seed_everything" in error["message"]
        checked, unchecked = rank["same, checked"], rank["same, unchecked"]
        assert checked["error"] is None and checked["step"] == 2
        for name in checked["state"]:
            torch.testing.assert_close(checked["state"][name], unchecked["state"][name], rtol=0, atol=0)
        # The hashes ride on the replicated-gradient all-reduce: the same collectives, 12 float32 more.
        for (calls, payload), (calls_off, payload_off) in zip(checked["steps"], unchecked["steps"]):
            assert calls == calls_off and payload - payload_off == 12 * 4


def one_group_differs_of_two() -> dict:
    return fit_with_sampler({0: 0, 1: 0, 2: 1}, manual=False, detect=False)  # rank 3 alone reads its own rows


def test_one_phantom_group_with_different_batches_stops_every_replica():
    for result in run_ranks(4, one_group_differs_of_two):
        assert result["error"] is not None and result["step"] == 0
        assert "The ranks of 1 of 2 phantom group(s) trained on different batches" in result["error"]["message"]


# ------------------------------------------------------------------ the arithmetic
@pytest.mark.parametrize("dtype, phantom", [(torch.float32, 2), (torch.float32, 8), (torch.float32, 64),
                                            (torch.float64, 4)])
def test_the_group_verdict_is_exact_in_the_buffer_dtype(dtype, phantom):
    """p ranks' riders summed and divided by p as the replicated average does: equal batches pass, a batch
    differing in one bit of one element on one rank fails, and every sum stays an exact integer."""
    batch = (torch.randn(16, 6), torch.arange(16))
    flipped = batch[0].clone()
    flipped.view(torch.int32)[5, 3] ^= 1
    assert not torch.equal(flipped, batch[0])
    for differing in (None, (flipped, batch[1]), (batch[0], batch[1].flip(0)), (batch[0][:15], batch[1][:15])):
        riders = []
        for r in range(phantom):
            check = BatchCheck(phantom)
            check.add(differing if differing is not None and r == phantom - 1 else batch)
            riders.append(check.riders(dtype, torch.device("cpu")))
        summed = torch.stack(riders).sum(0) / phantom
        assert torch.equal(summed, summed.round()) and summed.max() < 2 ** {torch.float32: 24, torch.float64: 53}[dtype]
        assert check.mismatch(summed).item() == (differing is not None)
    assert 4 <= hash_bits(dtype, phantom) <= 16


def test_fingerprints_see_order_shape_and_every_element():
    x = torch.randn(8, 5)
    base = fingerprint((x, {"y": torch.ones(3, dtype=torch.bool)})).item()
    changes = [(x.flip(1), {"y": torch.ones(3, dtype=torch.bool)}),  # a horizontal flip
               (x.view(5, 8), {"y": torch.ones(3, dtype=torch.bool)}),
               (x, {"y": torch.tensor([True, False, True])}), (x.double(), {"y": torch.ones(3, dtype=torch.bool)})]
    assert all(fingerprint(c).item() != base for c in changes)
    assert fingerprint((x.clone(), {"y": torch.ones(3, dtype=torch.bool)})).item() == base
    assert fingerprint(["no tensors"]) is None
    # Three whole periods of the position weights (2^16 8-byte words, 2^17 float32) and a tail: two
    # periods that trade places change it (the periods are folded in order).
    period = 1 << 17
    big = torch.randn(3 * period + 100)
    swapped = torch.cat([big[period:2 * period], big[:period], big[2 * period:]])
    assert fingerprint(swapped).item() != fingerprint(big).item() == fingerprint(big.clone()).item()
