"""What only several nodes, NCCL or fp16 exercise, shown on CPU: the default layout across nodes,
one overflow decision for the world under 16-mixed, replicated parameters kept identical, and a
checkpoint folder every rank must see.

The torchrun run on two loopback "nodes" is in tests/test_failures.py (``two_nodes``).
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import lightning as L
import pytest

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
