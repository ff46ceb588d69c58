"""What only several nodes, NCCL or fp16 exercise, shown on CPU: the default layout across nodes,
one overflow decision for the world under 16-mixed, replicated parameters kept identical, and a
checkpoint folder every rank must see.

The torchrun run on two loopback "nodes" is in tests/test_failures.py (``two_nodes``).
"""

from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_ranks
from lightning.pytorch.callbacks import Callback

import lightning_phantom as lp
from lightning_phantom.app.cli import CONF_DIR, check_config
from lightning_phantom.strategy.layout import PhantomLayout

ROOT = Path(__file__).resolve().parent.parent


def make_trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False)
    return L.Trainer(**{**options, **kwargs})


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("devices, nodes, want", [(2, 2, (2, 2)), (8, 4, (4, 8)), (4, 1, (1, 4))])
def test_default_layout_is_one_phantom_group_per_node(devices, nodes, want):
    """As Lightning's ModelParallelStrategy: phantom = processes per node, data = nodes."""
    layout = make_trainer(devices=devices, num_nodes=nodes, strategy=lp.PhantomStrategy()).strategy.layout
    assert (layout.data, layout.phantom) == want
    assert layout.cross_node_warning() is None
    per_node = [list(range(n * devices, (n + 1) * devices)) for n in range(nodes)]
    assert layout.phantom_groups() == per_node


def test_a_phantom_group_across_nodes_warns_with_the_arithmetic():
    with pytest.warns(UserWarning, match=r"phantom\(4\) > processes per node \(4 ranks / 2 nodes = 2\): each "
                                         r"phantom group spans at least 2 nodes"):
        make_trainer(devices=2, num_nodes=2, strategy=lp.PhantomStrategy(phantom_parallel_size=4))
    with pytest.warns(UserWarning, match=r"processes per node \(6 ranks / 2 nodes = 3\) % phantom\(2\) = 1"):
        make_trainer(devices=3, num_nodes=2, strategy=lp.PhantomStrategy(data_parallel_size=3))
    assert PhantomLayout.resolve(1, "auto", 8, nodes=4).cross_node_warning().endswith(
        "Use a phantom_parallel_size that divides 2, or leave both sizes on 'auto' (phantom(2) × data(4)).")
    assert PhantomLayout.resolve("auto", 2, 8, nodes=2).cross_node_warning() is None  # 2 divides 4
    with pytest.raises(ValueError, match=r"world size \(6\) is not divisible by nodes\(4\) \(6 % 4 = 2\)"):
        PhantomLayout.resolve("auto", "auto", 6, nodes=4)


def test_the_app_resolves_the_same_layout_before_processes_start():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        default = check_config(compose("config", ["trainer.devices=2", "trainer.num_nodes=2", "model.width=64"]))
        across = check_config(compose("config", ["trainer.devices=2", "trainer.num_nodes=2", "model.width=64",
                                                 "strategy.phantom_parallel_size=4"]))
    assert (default.strategy, default.group_size, default.data_parallel) == ("phantom", 2, 2)
    assert (across.group_size, across.data_parallel) == (4, 1)


# ------------------------------------------------------------------ GPU checks, dry run
def test_gpu_cluster_checks_dry_run_trains_and_notices_a_killed_peer(tmp_path, monkeypatch):
    """benchmarks/gpu_cluster_checks.py on CPU/gloo: what benchmarks/gpu.py runs under NCCL."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    checks = importlib.import_module("gpu_cluster_checks")
    results = {r.check: r for r in checks.run_checks(dry_run=True, workdir=tmp_path, timeout=60, hang=False)}
    assert list(results) == ["nccl_training", "dead_peer_sigkill"]
    assert all(r.ok for r in results.values()), {k: r.detail for k, r in results.items()}
    assert results["nccl_training"].facts["ranks"] == 2
    assert "TORCH_DISTRIBUTED_DEBUG" not in os.environ  # set for the job only
    assert results["dead_peer_sigkill"].facts["noticed_after_s"] < 60  # gloo sees the closed socket
    assert re.search(checks.PEER_FAILED, (tmp_path / "dead_peer_sigkill.log").read_text())


# ------------------------------------------------------------------ 16-mixed: one decision for the world
class Overflow(Callback):
    """Rank 1's gradient of ``net.2.compress`` (its shard) becomes Inf at ``step`` (an fp16 overflow on one rank only);
    records per step the loss scale after it and whether the weights moved."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.scales: list[float] = []
        self.moved: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        from scripts.train import inf_gradient_on_rank_1

        inf_gradient_on_rank_1(trainer, pl_module, self.step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        self.moved.append(any(not torch.equal(a, p) for a, p in zip(self._before, pl_module.parameters())))


@contextmanager
def _fp16_on_cpu():
    """16-mixed is refused on CPU (slow there, never the point): lifted while a test runs the CUDA code path."""
    from lightning_phantom.strategy import precision

    refuse = precision.check_precision
    precision.check_precision = lambda plugin: None
    try:
        yield
    finally:
        precision.check_precision = refuse  # the rank pool outlives the test


def replicated_names(module) -> list[str]:
    from lightning_phantom.nn.layers import sharded_parameters

    sharded = {id(p) for p in sharded_parameters(module)}
    return [name for name, p in module.named_parameters() if id(p) not in sharded]


def train_16_mixed(optimizer: str, data: int, clip: float = 0.0, steps: int = 4, overflow_at: int = 1):
    from lightning.pytorch.plugins.precision import MixedPrecision
    from scripts.train import Batches, Regression

    L.seed_everything(0, verbose=False)
    model = Regression(optimizer, lr=0.02)
    loader = Batches(rows=64, batch_size=8, phantom=2 // data)
    overflow = Overflow(overflow_at)
    with _fp16_on_cpu():
        trainer = make_trainer(devices=2, max_steps=steps, callbacks=[overflow], gradient_clip_val=clip,
                               plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", 2.0 ** 10))],
                               strategy=lp.PhantomStrategy(data_parallel_size=data))
    loader.trainer = trainer
    trainer.fit(model, loader)
    return {"scales": overflow.scales, "moved": overflow.moved, "replicated": replicated_names(model),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("optimizer", ["adam", "fused-adam"])
def test_16_mixed_overflow_on_one_rank_is_skipped_by_every_rank(optimizer):
    """Inf in rank 1's gradient only: both ranks skip that step and halve their scale; replicas stay equal.

    With a fused optimizer Lightning does not call ``scaler.unscale_``: ``GradScaler.step`` checks each
    device itself (``_check_inf_per_device``), which must be synchronised too. The guard, on by default,
    leaves the overflow to the scaler.
    """
    ranks = run_ranks(2, train_16_mixed, optimizer, data=1)  # phantom(2): the inf stays in rank 1's shard
    for r in ranks:
        assert r["moved"] == [True, False, True, True]
        assert r["scales"] == [1024.0, 512.0, 512.0, 512.0]
    assert "net.4.bias" in ranks[0]["replicated"]
    for name in ranks[0]["replicated"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


def test_16_mixed_clipping_works_with_a_fused_optimizer():
    """Clipping needs unscaled gradients; a fused optimizer unscales inside its step, so the strategy
    unscales first when (only when) it clips. Same result as the unfused Adam, and clipping did clip."""
    fused, plain, unclipped = (run_ranks(2, train_16_mixed, optimizer, data=1, clip=clip, overflow_at=-1)
                               for optimizer, clip in (("fused-adam", 0.05), ("adam", 0.05), ("fused-adam", 0.0)))
    for a, b, c in zip(fused, plain, unclipped):
        assert a["moved"] == [True] * 4 and a["scales"] == [1024.0] * 4
        for key, value in a["state"].items():
            torch.testing.assert_close(value, b["state"][key], rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(value, c["state"][key]) for key, value in a["state"].items())


# ------------------------------------------------------------------ replicated parameters
class Jitter(Callback):
    """Rank 1's gradient of ``net.4.bias`` (held whole by every phantom rank) is off in the last bits,
    as a nondeterministic GPU kernel would leave it."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            pl_module.net[4].bias.register_hook(lambda grad: grad * (1 + 1e-6) + 1e-7)


def train_with_jitter(steps: int = 5):
    from scripts.train import Batches, Regression

    L.seed_everything(0, verbose=False)
    model = Regression("adam", lr=0.02)
    loader = Batches(rows=64, batch_size=8, phantom=2)
    trainer = make_trainer(devices=2, max_steps=steps, callbacks=[Jitter()], strategy=lp.PhantomStrategy())
    loader.trainer = trainer
    trainer.fit(model, loader)
    return {"replicated": replicated_names(model),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_replicated_parameters_stay_bit_identical_when_one_copy_s_gradient_differs():
    ranks = run_ranks(2, train_with_jitter)
    assert ranks[0]["replicated"] == ranks[1]["replicated"] and "net.4.bias" in ranks[0]["replicated"]
    for name in ranks[0]["replicated"]:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


# ------------------------------------------------------------------ checkpoints need one filesystem
def save_on_node_local_disks(shared: str, local: str):
    """Rank 1 sees another disk at the checkpoint's path, as a node without the shared filesystem would."""
    from lightning_phantom.strategy import checkpoints
    from lightning_phantom.strategy.storage import staging_path
    from scripts.train import Batches, Regression

    L.seed_everything(0, verbose=False)
    model = Regression("sgd", lr=0.1)
    loader = Batches(rows=64, batch_size=8, phantom=2)
    trainer = make_trainer(devices=2, max_steps=1, strategy=lp.PhantomStrategy())
    loader.trainer = trainer
    trainer.fit(model, loader)
    if trainer.global_rank == 1:
        checkpoints.staging_path = lambda path: staging_path(Path(local) / Path(path).name)
    try:
        trainer.save_checkpoint(Path(shared) / "step=1.ckpt")
    except checkpoints.UnsharedFolderError as error:
        return str(error)
    finally:
        checkpoints.staging_path = staging_path  # the rank pool outlives the test
    return None


def test_a_checkpoint_folder_some_ranks_cannot_see_is_an_error_on_every_rank(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "local").mkdir()
    errors = run_ranks(2, save_on_node_local_disks, str(tmp_path / "shared"), str(tmp_path / "local"))
    assert errors[0] == errors[1] and errors[0] is not None
    assert re.search(r"The checkpoint folder '.*/shared' is not the same folder on every rank: rank 1 on \S+ "
                     r"\(writing to '.*/local/\.step=1\.ckpt\.partial'\) of 2 cannot see the file rank 0 \(\S+\) "
                     r"just wrote into '.*/shared/\.step=1\.ckpt\.partial'", errors[0])
    assert "must be on a filesystem shared by all nodes" in errors[0] and "nothing was saved" in errors[0]
    assert not (tmp_path / "shared" / "step=1.ckpt").exists()
