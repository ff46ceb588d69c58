"""Checkpoints under failure: every rank stops together, the last good checkpoint stays loadable.

Saving and loading alternate collectives with steps that one rank takes alone; each such step
is made to fail on one rank (patched in that rank's process), and every rank must raise the
same error within seconds, never wait for the process-group timeout.
"""

from __future__ import annotations

import time
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_phantom as lp
from conftest import run_ranks
from lightning_phantom.strategy import checkpoints
from scripts.train import Batches, Regression


def fitted(steps: int, ckpt: str = None, **strategy) -> tuple:
    L.seed_everything(0, verbose=False)
    model = Regression(optimizer="sgd", lr=0.1)
    loader = Batches(rows=64, batch_size=8, phantom=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(timeout=60, **strategy),
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader.trainer = trainer
    trainer.fit(model, loader, ckpt_path=ckpt)
    return trainer, model


# one rank's step -> (rank, what to patch, the patch)
FAILURES = {
    "discard": (0, "discard", mock.Mock(side_effect=PermissionError("Permission denied: '.last.ckpt.partial'"))),
    "mkdir": (1, "Path.mkdir", mock.Mock(side_effect=OSError("Read-only file system"))),
    "meta.pt": (0, "save_durably", mock.Mock(side_effect=OSError("No space left on device"))),
    "publish": (0, "publish", mock.Mock(side_effect=OSError("Stale file handle"))),
    "is_checkpoint": (1, "is_checkpoint", mock.Mock(return_value=False)),
    "read_meta": (1, "read_meta", mock.Mock(side_effect=EOFError("Ran out of input"))),
}


def one_rank_fails(tmp: str) -> dict:
    trainer, model = fitted(2)
    path = Path(tmp) / "last.ckpt"
    trainer.save_checkpoint(path)  # the last good one
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the weights move on
        for p in model.parameters():
            p.add_(1.0)
    out = {}
    for name, (rank, target, patch) in FAILURES.items():
        owner, _, attribute = target.rpartition(".")
        where = Path if owner == "Path" else checkpoints
        start = time.monotonic()
        try:
            with mock.patch.object(where, attribute, patch) if dist.get_rank() == rank else mock.MagicMock():
                if name in ("is_checkpoint", "read_meta"):
                    trainer.strategy.load_checkpoint(path)
                else:
                    trainer.save_checkpoint(path)
            out[name] = None
        except Exception as error:  # noqa: BLE001
            out[name] = (type(error).__name__, str(error), time.monotonic() - start)
    _, resumed = fitted(2, ckpt=str(path))  # the last good checkpoint, after every failure
    out["good"] = all(torch.equal(resumed.state_dict()[k], v) for k, v in good.items())
    out["other format"] = load_another_format(path, Path(tmp) / "v-next.ckpt")
    return out


def load_another_format(path: Path, other: Path) -> str:
    """The same checkpoint, its meta.pt saying the next format version: resuming must refuse it."""
    import shutil

    if dist.get_rank() == 0:
        shutil.copytree(path, other)
        meta = torch.load(other / "meta.pt", weights_only=True)
        meta["phantom"]["format"] = checkpoints.FORMAT_VERSION + 1
        torch.save(meta, other / "meta.pt")
    dist.barrier()
    try:
        fitted(2, ckpt=str(other))
    except ValueError as error:
        return str(error)
    return "loaded"


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> tuple[list, Path]:
    tmp = tmp_path_factory.mktemp("failures")
    return run_ranks(2, one_rank_fails, str(tmp), timeout=150), tmp


def test_a_checkpoint_of_another_format_is_refused(failures):
    version = checkpoints.FORMAT_VERSION
    for rank in failures[0]:
        assert f"v-next.ckpt' is in PhantomStrategy checkpoint format {version + 1}; this version of " \
               f"lightning-phantom reads format {version}" in rank["other format"]


def test_a_step_failing_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(failures):
    ranks, tmp_path = failures
    expected = {  # every rank raises the failed rank's error type, with what failed where
        "discard": ("PermissionError", "Removing what an interrupted save left at", 0),
        "mkdir": ("OSError", "Creating the checkpoint folder", 1),
        "meta.pt": ("OSError", "Writing", 0),
        "publish": ("OSError", "Publishing the checkpoint at", 0),
        "is_checkpoint": ("ValueError", "Reading the checkpoint at", 1),
        "read_meta": ("EOFError", "Reading the checkpoint at", 1),
    }
    for rank in ranks:
        for name, (kind, what, failed) in expected.items():
            assert rank[name] is not None, name
            got_kind, message, seconds = rank[name]
            assert got_kind == kind and message.startswith(what), (name, message)
            assert f"failed on rank(s) {failed} of 2, so every rank stopped here: rank {failed}: " in message
            assert seconds < 10, (name, seconds)  # not the 60 s timeout
        assert rank["good"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.ckpt", "v-next.ckpt"]


# ------------------------------------------------ a cut between the two renames, where the swap is unavailable
def crash_between_the_renames(tmp: str) -> dict:
    """NFS, Lustre: no RENAME_EXCHANGE, so publishing last.ckpt moves the old one aside, then the new one in;
    the run dies between the two at step 6. Then the user resumes with ckpt_path="last"."""
    import os

    from lightning_phantom.strategy import storage
    from scripts.train import job

    rename = os.rename

    def cut(a, b):
        if Path(b).name == "last.ckpt" and storage.previous_path(b).exists():
            raise OSError("power cut between the renames")
        rename(a, b)

    with mock.patch.object(storage, "_exchange", lambda a, b: False), mock.patch.object(os, "rename", cut):
        try:
            job(steps=6, every=3, ckpt_dir=tmp)
            crashed = None
        except OSError as error:
            crashed = str(error)
    left = sorted(p.name for p in Path(tmp).iterdir() if "last" in p.name)
    resumed = job(steps=6, every=3, ckpt_dir=tmp, resume="last")
    return {"crashed": crashed, "left": left, "resumed": resumed, "whole": job(steps=6),
            "after": sorted(p.name for p in Path(tmp).iterdir() if "last" in p.name)}


def test_resume_from_last_finds_the_checkpoint_a_cut_between_renames_left(tmp_path):
    for rank in run_ranks(2, crash_between_the_renames, str(tmp_path)):
        assert rank["crashed"] is not None and "power cut between the renames" in rank["crashed"]
        assert rank["left"] == [".last.ckpt.partial", "last.previous.ckpt"]  # no last.ckpt
        resumed, whole = rank["resumed"], rank["whole"]
        assert resumed["step"] == 6 and resumed["losses"] == whole["losses"][3:]  # from step 3, not from scratch
        for name, value in whole["state"].items():
            assert torch.equal(resumed["state"][name], value), name
        assert rank["after"] == ["last.ckpt"]  # the next save cleaned up


# ------------------------------------------------ the RNG, for dropout
def resume_with_dropout(tmp: str) -> dict:
    from scripts.train import job

    whole = job(steps=6, every=3, ckpt_dir=tmp, dropout=0.3)
    return {"whole": whole, "resumed": job(steps=6, resume=f"{tmp}/step=3.ckpt", dropout=0.3)}


def test_a_resumed_run_draws_the_dropout_masks_of_the_uninterrupted_one(tmp_path):
    for rank in run_ranks(2, resume_with_dropout, str(tmp_path)):
        whole, resumed = rank["whole"], rank["resumed"]
        assert resumed["losses"] == whole["losses"][3:]
        for name, value in whole["state"].items():
            assert torch.equal(resumed["state"][name], value), name
    rng = torch.load(tmp_path / "step=3.ckpt" / "meta.pt", weights_only=True)["phantom"]["rng"]
    assert len(rng) == 2 and rng[0]["cpu"].dtype == torch.uint8


def test_rng_states_are_each_rank_s_own_or_rank_0_s():
    from lightning_phantom.strategy.checkpoints import restore_rng, rng_states

    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(rng_states())
    expected = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected[seed] = torch.rand(3)
    restore_rng(saved, 1, 2)  # the world size saved: rank 1's own
    assert torch.equal(torch.rand(3), expected[2])
    restore_rng(saved, 3, 4)  # another world size: rank 0's
    assert torch.equal(torch.rand(3), expected[1])


# ------------------------------------------------ what a user's module and optimizer add to a checkpoint
class Tracker(nn.Module):
    """State that is not a tensor (``get_extra_state``): a count of the batches trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def get_extra_state(self) -> dict:
        return {"batches": self.batches}

    def set_extra_state(self, state: dict) -> None:
        self.batches = state["batches"]


class CountingSGD(torch.optim.SGD):
    """SGD with momentum (a tensor per parameter) and a Python int per parameter in its state."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["calls"] = self.state[p].get("calls", 0) + 1
        return loss


class Tracked(Regression):
    def __init__(self, scale: bool = False, groups: int = 1) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.tracker, self.groups = Tracker(), groups
        self.scale = nn.Parameter(torch.ones(())) if scale else None  # a parameter the checkpoint lacks

    def forward(self, x):
        out = super().forward(x)
        return out if self.scale is None else out * self.scale

    def training_step(self, batch, batch_idx):
        self.tracker.batches += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        params = list(self.parameters())
        if self.groups == 1:
            return CountingSGD(params, lr=0.1, momentum=0.9)
        return CountingSGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.1, momentum=0.9)


def tracked(**kwargs) -> Tracked:
    L.seed_everything(0, verbose=False)  # one initialisation for every run
    return Tracked(**kwargs)


def fit_tracked(model: Tracked, steps: int, ckpt: str = None, save_to: str = None) -> L.Trainer:
    """Train; (``save_to``) checkpoint there at step 2, mid-epoch, as ModelCheckpoint does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    loader = Batches(rows=64, batch_size=8, phantom=2)
    saving = [ModelCheckpoint(dirpath=save_to, filename="{step}", every_n_train_steps=2, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(timeout=60),
                        max_steps=steps, logger=False, enable_checkpointing=bool(save_to),
                        callbacks=saving if save_to else None, enable_progress_bar=False,
                        enable_model_summary=False)
    loader.trainer = trainer
    trainer.fit(model, loader, ckpt_path=ckpt)
    return trainer


def _refusal(model: Tracked, ckpt: Path) -> tuple:
    start = time.monotonic()
    try:
        fit_tracked(model, 3, str(ckpt))
    except Exception as error:  # noqa: BLE001 - the test reads what every rank raised
        return type(error).__name__, str(error), time.monotonic() - start
    return None


def resume_what_users_add(tmp: str) -> dict:
    path = Path(tmp) / "step=2.ckpt"
    whole, resumed = tracked(), tracked()
    straight = fit_tracked(whole, 3, save_to=tmp)
    again = fit_tracked(resumed, 3, str(path))
    out = {
        "batches": (resumed.tracker.batches, whole.tracker.batches),
        "weights": all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items()
                       if isinstance(v, torch.Tensor)),
        "calls": sorted({s["calls"] for s in again.optimizers[0].state.values()}),
        "momentum": all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in
                        zip(again.optimizers[0].state.values(), straight.optimizers[0].state.values())),
        "extra parameter": _refusal(tracked(scale=True), path),
        "other groups": _refusal(tracked(groups=2), path),
    }
    # The same shards, with a meta.pt that another strategy wrote (no "phantom" entry).
    foreign = Path(tmp) / "foreign.ckpt"
    if dist.get_rank() == 0:
        import shutil

        shutil.copytree(path, foreign)
        meta = torch.load(foreign / "meta.pt", weights_only=True)
        del meta["phantom"]
        torch.save(meta, foreign / "meta.pt")
    dist.barrier()
    out["not phantom"] = _refusal(tracked(), foreign)
    return out


def test_a_user_s_extra_state_and_non_tensor_optimizer_state_resume_and_mismatches_are_refused(tmp_path):
    for rank in run_ranks(2, resume_what_users_add, str(tmp_path), timeout=200):
        assert rank["batches"] == (3, 3)  # get_extra_state came back, then one more batch
        assert rank["weights"] and rank["momentum"]
        assert rank["calls"] == [3]  # the ints in the optimizer's state, every parameter
        expected = {
            "extra parameter": ("RuntimeError", "missing keys ['scale']", "Set `strict_loading = False`"),
            "other groups": ("ValueError", "The optimizer's parameter groups differ from those saved",
                             "configure_optimizers() must build the same groups"),
            "not phantom": ("ValueError", "foreign.ckpt' was not written by PhantomStrategy",
                            "no 'phantom' entry"),
        }
        for name, (kind, what, fix) in expected.items():
            assert rank[name] is not None, name
            got, message, seconds = rank[name]
            assert got == kind and what in message and fix in message, (name, message)
            assert seconds < 20, (name, seconds)  # every rank raised: none waited for the 60 s timeout
