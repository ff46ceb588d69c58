"""The benchmark scripts must not rot: ``benchmarks/gpu.py --dry-run`` runs all its steps on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_script_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--dry-run", "--p", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] and set(steps) >= {"per_rank_compute", "energy_meter", "autocast_p1", "nccl_world1"}
    assert all(step["ok"] for step in steps.values()), {k: v.get("error") for k, v in steps.items()}
    rows = steps["per_rank_compute"]["rows"]
    assert [(r["p"], r["width"]) for r in rows] == [(2, 64), (2, 128)]
    for r in rows:  # measured compute and the α–β network both enter the projection
        for side in ("PP", "TP"):
            assert r[side]["measured"]["seconds"] > 0 and r[side]["comm_s"] > 0
            assert r[side]["projected_s"] > r[side]["measured"]["seconds"]
        assert 0 < r["flop_ratio"] < 1
    assert steps["energy_meter"]["monitor_J"] > 0 and steps["energy_meter"]["sampled_power_J"] > 0
    assert steps["nccl_world1"]["steps"] == 4 and steps["nccl_world1"]["all_reduce_ok"]
    assert (tmp_path / "gpu.png").stat().st_size > 0


def test_gpu_script_takes_the_cluster_checks_steps(monkeypatch):
    import types

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    extra = types.ModuleType("gpu_cluster_checks")
    extra.gpu_steps = lambda: [("cluster", lambda ctx: {"seen": ctx.dry_run})]
    monkeypatch.setitem(sys.modules, "gpu_cluster_checks", extra)
    assert [name for name, _ in gpu.all_steps()][-1] == "cluster"
    assert [name for name, _ in gpu.all_steps()][:4] == [name for name, _ in gpu.STEPS]
