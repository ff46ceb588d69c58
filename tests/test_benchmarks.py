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
    block, = steps["per_rank_compute"]["block_rows"]  # the transformer block, PP and TP, the same way
    assert (block["kind"], block["p"], block["width"]) == ("block", 2, 32) and 0 < block["flop_ratio"] < 1
    for side in ("PP", "TP"):
        assert block[side]["measured"]["seconds"] > 0 and block[side]["comm_s"] > 0
    assert report["stopped_early"] == [] and report["budget_s"] == 330
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


def test_gpu_script_keeps_to_its_budget_and_writes_what_it_has_when_stopped(tmp_path, monkeypatch):
    import signal
    import time

    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    # The budget runs out after per_rank_compute's first case: the others are listed, not run.
    ctx = gpu.Context(True, torch.device("cpu"), tmp_path, [64, 128], [2], 4, 16, 1, seq=8, block_widths=[32])
    ctx.save = lambda: setattr(ctx, "deadline", 0.0)
    out = gpu.per_rank_compute(ctx)
    assert [r["width"] for r in out["rows"]] == [64] and out["block_rows"] == []
    assert out["stopped_early"] == ["ffn p=2 n=128", "block p=2 d=32"]

    def measuring(ctx):  # a job's time limit arrives mid-step
        ctx.partial["rows"] = ["measured"]
        ctx.save()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    def later(ctx):
        raise AssertionError("a step ran after the signal")

    monkeypatch.setattr(gpu, "all_steps", lambda: [("measuring", measuring), ("later", later)])
    before = signal.getsignal(signal.SIGTERM)
    assert gpu.main(["--dry-run", "--p", "2", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["steps"]["measuring"]["error"] == "stopped by SIGTERM"
    assert report["steps"]["measuring"]["rows"] == ["measured"] and report["stopped_early"] == ["later"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert gpu.main(["--dry-run", "--p", "2", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["steps"] == {} and report["stopped_early"] == ["measuring", "later"]


def _data_axis_blocks(argv: list[str]) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    import data_axis

    args = data_axis.parse_args(argv)
    sizes = [args.d_in] + [args.width] * (args.layers + 1) + [args.d_out]
    return {"sizes": sizes, "blocks": {side: [data_axis.run_block(side, sizes, args)] * (3 if side == "TP" else 1)
                                       for side in data_axis.SIDES}}


def test_data_axis_benchmark_counts_each_axis_as_the_cost_model_says(monkeypatch):
    """benchmarks/data_axis.py's blocks on data(2) x model(2): bytes counted on each process group
    and the memory each rank holds agree with phantom_cost/tp_cost and data_axis_cost."""
    from conftest import run_ranks

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import data_axis

    argv = ["--width", "64", "--ghosts", "4", "--steps", "1", "--warmup", "0", "--batch", "16"]
    raw = run_ranks(4, _data_axis_blocks, argv)[0]
    result = data_axis.summarise(raw["sizes"], raw["blocks"], data_axis.parse_args(argv))
    for side in data_axis.SIDES:
        measured, model = result["measured"][side], result["model"][side]
        for key in ("model_bytes", "data_bytes", "memory"):
            # FSDP2 pads a parameter's flat shard to a multiple of the replicas: a few bytes more.
            assert abs(measured[key] - model[key]) <= 0.01 * model[key] + 64, (side, key, measured, model)
        assert measured["model_bytes"] > 0 and measured["data_bytes"] > 0
    ddp, fsdp = result["measured"]["PP ddp"], result["measured"]["PP fsdp"]
    assert abs(fsdp["memory"] / ddp["memory"] - 0.5) < 0.02  # FSDP2 halves what each replica holds
    assert abs(fsdp["data_bytes"] / ddp["data_bytes"] - 1.5) < 0.02  # 2 all-gathers + reduce-scatter
    table = data_axis.table(result)
    assert "PP fsdp" in table and "PP/TP" in table


def test_data_axis_ratios_and_arguments(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import pytest

    import data_axis

    rows = {"TP": {"step_s": 2.0, "model_bytes": 100.0, "data_bytes": 300.0, "memory": 40.0},
            "PP ddp": {"step_s": 1.0, "model_bytes": 10.0, "data_bytes": 90.0, "memory": 60.0}}
    r = data_axis.ratios(rows)["PP ddp"]
    assert r == {"step_s": 0.5, "model_bytes": 0.1, "data_bytes": 0.3, "total_bytes": 0.25, "memory": 1.5}
    sizes = [64, 256, 256, 256, 1]
    ddp, fsdp = (data_axis.predicted(s, sizes, 8, 32) for s in ("PP ddp", "PP fsdp"))
    assert fsdp["memory"] == ddp["memory"] / 2 and fsdp["data_bytes"] == 1.5 * ddp["data_bytes"]
    assert ddp["model_bytes"] == fsdp["model_bytes"] < data_axis.predicted("TP", sizes, 8, 32)["model_bytes"]
    for bad in (["--width", "130"], ["--ghosts", "65", "--width", "128"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            data_axis.parse_args(bad)


def test_no_benchmark_shadows_a_standard_library_module():
    """``python benchmarks/x.py`` puts benchmarks/ first on sys.path: a benchmarks/operator.py would
    replace the standard library's ``operator`` for every script there (seen: gpu.py crashed)."""
    clashes = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clashes, f"rename benchmarks/{clashes[0]}.py: it shadows the standard library's {clashes[0]}"


def test_overheads_benchmark_times_every_feature_and_what_the_strategy_always_does():
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "overheads.py"), "--widths", "64", "--steps", "16",
                           "--data-parallel", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    variants = [r["variant"] for r in rows]
    always = ["batch check (every step)", "buffer broadcast (every step)"]
    assert variants == ["baseline", "guard", "guard, max-abs pass", "energy", *always,
                        "replicated-gradient average (every step)", "cost log line (per fit)", "baseline",
                        "data-parallel average: in place, per tensor", "guard (summing in the buckets' pass)",
                        *always, "data-parallel buckets (every step)", "replicated-gradient average (every step)"]
    by_name = {r["variant"]: r for r in rows[:8]}
    # each feature's hooks ran while it was on, and what the strategy does every step: the batch
    # check on phantom(2), and the replicated-gradient all-reduce
    for name in ("guard", "guard, max-abs pass", "energy", "batch check (every step)",
                 "replicated-gradient average (every step)"):
        assert by_name[name]["in_hooks_ms"] > 0, name
    assert rows[9]["in_hooks_ms"] > 0 and rows[10]["in_hooks_ms"] > 0 and rows[13]["in_hooks_ms"] > 0
    assert rows[11]["in_hooks_ms"] == 0  # data(2) x phantom(1): no phantom group to check
    assert subprocess.run([sys.executable, str(BENCHMARKS / "overheads.py"), "--steps", "6"], env=env,
                          capture_output=True, text=True).returncode == 2  # too few steps: a clear refusal
