"""The command-line app, the comparison and the examples, run as a user runs them.

Every run is a real subprocess (``python -m lightning_phantom ...``): with ``trainer.devices=2``
Lightning's own launcher starts the second process, re-running the app under Hydra. Models
are tiny and runs a few steps: the file takes 2-3 minutes on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = [  # 8 steps, validated twice; target_loss=10 is reached at the first validation
    "model.width=16", "model.depth=2", "data.batch_size=16", "trainer.max_steps=8",
    "trainer.val_check_interval=4", "trainer.log_every_n_steps=2", "measure.count_step=2",
    "measure.warmup_steps=1", "energy=estimate", "target_loss=10",
]
TINY = RUN + ["data.train_size=512", "data.val_size=128"]  # width 16 on 2 ranks: ghosts <= 8


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    command = args if args[0].endswith("lightning-phantom") else [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                                  f"--- stderr\n{proc.stderr[-5000:]}")


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def _launched_rank_1(run_dir: Path) -> bool:
    # Lightning's launcher re-runs the app for rank 1 with hydra.job.name=train_ddp_process_1 in the
    # parent's run directory (lightning/fabric/strategies/launchers/subprocess_script.py).
    return (run_dir / "train_ddp_process_1.log").exists()


# ------------------------------------------------------------------ in-process: config checks

@pytest.fixture()
def compose():
    from hydra import compose, initialize_config_dir

    from lightning_phantom.app.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides, name="config": compose(config_name=name, overrides=list(overrides))


def test_check_config_resolves_layouts(compose):
    from lightning_phantom.app.cli import check_config

    plan = check_config(compose("model.width=64", "strategy.ghosts=8"))
    assert (plan.strategy, plan.world_size, plan.group_size, plan.data_parallel) == ("phantom", 2, 2, 1)
    assert plan.ghosts == [8] * 4 and plan.sizes == [32] + [64] * 5 + [8]
    plan = check_config(compose("trainer.devices=4", "strategy.phantom_parallel_size=2"))
    assert (plan.group_size, plan.data_parallel) == (2, 2)
    plan = check_config(compose("strategy=phantom", "strategy.ghosts=auto", "model.width=32"))
    assert plan.ghosts == [16] * 4
    assert check_config(compose("strategy=tp")).group_size == 2
    assert check_config(compose("strategy=single")).world_size == 1  # strategy=single sets trainer.devices=1
    assert check_config(compose("strategy=ddp", "data=digits")).data_parallel == 2


@pytest.mark.parametrize("overrides, message", [
    (["strategy=single", "trainer.devices=2"], "strategy=single runs on one device"),
    (["strategy=tp", "model.width=15"], "is not divisible by p = 2"),
    (["strategy=tp", "strategy.tensor_parallel_size=4"],
     "data_parallel_size(1) * tensor_parallel_size(4) != "),
    (["model.depth=0"], "needs at least one hidden width -> width layer"),
    (["model.width=15"], "model.width=15 is not divisible by the phantom group size 2"),
    (["strategy.ghosts=[4,4]"], "ghosts has 2 entries"),
    (["trainer.devices=4", "strategy.phantom_parallel_size=3"], "not divisible by phantom(3)"),
    (["energy=nvml"], "energy=nvml measures NVIDIA GPUs, but trainer=cpu"),
])
def test_check_config_says_what_to_fix(compose, overrides, message):
    from lightning_phantom.app.cli import ConfigError, check_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(*overrides))


def test_compare_passes_strategy_options_only_where_they_exist(compose):
    from lightning_phantom.app.compare import overrides_for

    compose()  # Hydra initialised, as inside the compare app
    given = ["strategy.ghosts=8", "model.width=64", "compare.timeout_s=5", "strategy=ddp", "hydra.run.dir=x"]
    assert overrides_for("phantom", given) == ["strategy.ghosts=8", "model.width=64", "strategy=phantom"]
    assert overrides_for("tp", given) == ["model.width=64", "strategy=tp"]


# ------------------------------------------------------------------ subprocesses: the app

def test_compare_runs_every_strategy_and_counts_what_the_model_predicts(tmp_path):
    """compare runs the app once per strategy (phantom, tp, ddp on 2 processes, single on 1)."""
    out = tmp_path / "cmp"
    proc = _run(["lightning_phantom.compare", *TINY, "strategy.ghosts=4",
                 "compare.strategies=[phantom,tp,ddp,single]", f"hydra.run.dir={out}"], cwd=tmp_path)
    _ok(proc)
    for name in ("compare.md", "compare.csv", "compare.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert table in proc.stdout and "| phantom | 4 | 2 |" in table
    assert "estimate" in table and "ESTIMATE" in table  # the CPU meter is labelled as such
    assert "Counted bytes equal the model for every rank and strategy." in table

    rows = {row["strategy"]: row for row in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"phantom", "tp", "ddp", "single"}
    for name, row in rows.items():
        assert row["sent_matches_model"] == "True", row
        assert float(row["sent_bytes_per_step"]) == float(row["sent_bytes_model"]), row
        assert int(row["macs_per_step"]) == int(row["macs_model"]), row
        assert int(row["params_per_rank"]) == int(row["params_model"]), row
        assert float(row["J_per_step_median"]) > 0 and row["meter"] == "estimate"
        assert row["target_J"] not in ("", None)  # target_loss=10 is reached at the first validation
        assert float(row["step_ms_median"]) > 0 and int(row["rss_peak_bytes_per_rank"]) > 0
    assert float(rows["phantom"]["sent_bytes_per_step"]) < float(rows["tp"]["sent_bytes_per_step"])
    assert float(rows["single"]["sent_bytes_per_step"]) == 0

    for strategy, ranks in (("phantom", 2), ("tp", 2), ("ddp", 2), ("single", 1)):
        result = _result(out / strategy)
        assert result["world_size"] == ranks and len(result["per_rank"]) == ranks
        assert result["config"]["model"]["width"] == 16 and result["steps"] == 8  # the overrides arrived
        assert _launched_rank_1(out / strategy) == (ranks == 2)
        for rank in result["per_rank"]:  # every rank, exactly (Fractions)
            assert Fraction(rank["sent_bytes"]) == Fraction(result["predicted"]["sent_bytes"])
    assert _result(out / "phantom")["ghosts"] == [4, 4]


def test_cli_phantom_on_digits_with_the_console_script(tmp_path):
    script = shutil.which("lightning-phantom") or str(Path(sys.executable).parent / "lightning-phantom")
    if not Path(script).exists():
        pytest.skip("the lightning-phantom console script is not installed")
    run_dir = tmp_path / "run"
    proc = _run([script, "data=digits", "strategy.ghosts=2", "trainer.devices=2", *RUN,
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    _ok(proc)
    result = _result(run_dir)
    assert result["strategy"] == "phantom" and result["sizes"] == [64, 16, 16, 16, 10]
    assert result["config"]["data"]["_target_"].endswith("DigitsDataModule")
    assert _launched_rank_1(run_dir)
    assert "val_acc" in (run_dir / "logs" / "metrics.csv").read_text()


def test_cli_tensor_parallel_through_lightnings_launcher(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["lightning_phantom", "strategy=tp", "model.width=32", *TINY[1:], "trainer.devices=2",
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    _ok(proc)
    result = _result(run_dir)
    assert (result["strategy"], result["group_size"], result["sizes"][1]) == ("tp", 2, 32)
    assert _launched_rank_1(run_dir)
    assert "tp: 8 steps" in proc.stdout


def test_compare_sweep_gathers_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["lightning_phantom.compare", "-m", "strategy.ghosts=2,4", *TINY, f"hydra.sweep.dir={sweep}"],
                cwd=tmp_path)
    _ok(proc)
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    # TP does not depend on ghosts: run by the first job, reused by the second.
    runs = sorted((r["strategy"], r["ghosts"]) for r in rows)
    assert runs == [("phantom", "2"), ("phantom", "4"), ("tp", "")]
    assert "reusing its result" in proc.stdout
    assert all(r["sent_matches_model"] == "True" for r in rows)
    assert (sweep / "sweep.md").read_text() in proc.stdout and (sweep / "sweep.png").exists()


BAD = [  # overrides, what stderr must say
    (["strategy=nope"], "Could not find 'strategy/nope'"),
    (["data=nope"], "Could not find 'data/nope'"),
    (["model.width=16", "strategy.ghosts=9"], "strategy.ghosts=9 is too large for model.width=16"),
    (["trainer.devices=3", "strategy.phantom_parallel_size=2"],
     "world size (3) is not divisible by phantom(2)"),
]


def test_bad_overrides_fail_before_any_process_starts(tmp_path):
    procs = []
    for i, (overrides, _) in enumerate(BAD + [(["model.width=16", "strategy.ghosts=9"], None)]):
        module = "lightning_phantom.compare" if i == len(BAD) else "lightning_phantom"
        run_dir = tmp_path / f"bad{i}"
        command = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
        procs.append((run_dir, subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True), time.perf_counter()))
    messages = [message for _, message in BAD] + ["strategy.ghosts=9 is too large for model.width=16"]
    for (run_dir, proc, start), message in zip(procs, messages):
        stdout, stderr = proc.communicate(timeout=120)
        elapsed = time.perf_counter() - start
        assert proc.returncode != 0, stdout + stderr
        assert message in stderr, stderr
        assert "Initializing distributed" not in stdout + stderr  # no process group, no launched rank
        assert not _launched_rank_1(run_dir) and not (run_dir / "result.json").exists()
        assert not (run_dir / "phantom").exists()  # compare: checked before its first run
        assert elapsed < 60, f"{message}: took {elapsed:.0f} s"


# ------------------------------------------------------------------ the examples

def test_examples_train_then_serve_the_dense_model(tmp_path):
    env_cwd = tmp_path
    train = subprocess.run([sys.executable, str(ROOT / "examples" / "train_phantom.py"), "--width", "32",
                            "--depth", "2", "--steps", "20", "--out", str(tmp_path / "ex")],
                           cwd=env_cwd, capture_output=True, text=True, timeout=240)
    _ok(train)
    final = float(re.search(r"final val_loss (\S+) at step 20", train.stdout).group(1))
    assert "energy (estimate)" in train.stdout
    serve = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_dense.py"),
                            str(tmp_path / "ex" / "phantom.ckpt")], cwd=env_cwd, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    _ok(serve)
    mse = float(re.search(r"validation MSE (\S+)", serve.stdout).group(1))
    # The dense model computes what the phantom model computed when it was validated at the end of training.
    assert mse == pytest.approx(final, rel=1e-4)
