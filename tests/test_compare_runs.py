"""compare with runs of their own settings (``compare.runs``): fewer ranks beside more.

The configuration tests run in-process (Hydra's compose, no process started); one comparison
runs for real: two tiny runs on different numbers of processes (2 and 1), stopped at the target.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["model.width=16", "model.depth=2", "data.batch_size=16", "trainer.max_steps=40",
        "trainer.val_check_interval=4", "trainer.log_every_n_steps=2", "measure.count_step=2",
        "measure.warmup_steps=1", "energy=estimate", "target_loss=10", "stop_at_target=true"]


@pytest.fixture()
def compose():
    from hydra import compose, initialize_config_dir

    from lightning_phantom.app.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda name, *overrides: compose(config_name=name, overrides=list(overrides))


def test_fewer_ranks_config_plans_phantom_on_fewer_ranks_than_tp(compose):
    from lightning_phantom.app.compare import plan_runs

    planned = plan_runs(compose("compare_fewer_ranks"), ["data=digits"])
    (phantom, (p_over, p_cfg, p_plan)), (tp, (t_over, t_cfg, t_plan)) = planned.items()
    assert (phantom, p_plan.strategy, p_plan.world_size) == ("phantom-2", "phantom", 2)
    assert (tp, t_plan.strategy, t_plan.world_size) == ("tp-4", "tp", 4)
    # Same width, data, seed and target for both; the command's data=digits reached both.
    for key in ("model.width", "seed", "target_loss", "data._target_", "stop_at_target"):
        assert _get(p_cfg, key) == _get(t_cfg, key)
    assert _get(p_cfg, "data._target_").endswith("DigitsDataModule")
    assert p_plan.sizes == t_plan.sizes
    # strategy.ghosts (in compare.overrides) reaches the phantom run only: TP has no such key.
    assert any(o.startswith("strategy.ghosts=") for o in p_over)
    assert not any(o.startswith("strategy.ghosts=") for o in t_over)
    # The run's own overrides come last, so they win over the shared ones.
    assert p_over[-2:] == ["strategy=phantom", "trainer.devices=2"]


def _get(cfg, dotted: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted)


@pytest.mark.parametrize("override, message", [
    ("compare.runs.1.overrides=['strategy=tp','trainer.devices=3']",
     "run 'tp-4' (compare.runs[1]): strategy=tp cannot shard"),
    ("compare.runs.0.overrides=['strategy=phantom','strategy.ghosts=9999']",
     "run 'phantom-2' (compare.runs[0]): strategy.ghosts=9999 does not fit"),
    ("compare.runs.0.overrides=['strategy=nope']", "run 'phantom-2' (compare.runs[0])"),
    ("compare.runs.0.name=tp-4", "compare.runs[1].name='tp-4' must be unique"),
    ("compare.overrides=[7]", "compare.overrides must be a list of Hydra overrides"),
])
def test_a_bad_run_is_named_before_any_run(compose, override, message):
    from lightning_phantom.app.cli import ConfigError
    from lightning_phantom.app.compare import plan_runs

    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_runs(compose("compare_fewer_ranks", override), [])


def test_compare_strategies_still_one_run_per_strategy(compose):
    from lightning_phantom.app.compare import plan_runs

    planned = plan_runs(compose("compare", "strategy.ghosts=8"), ["strategy.ghosts=8"])
    assert list(planned) == ["phantom", "tp"]
    assert {p.world_size for _, _, p in planned.values()} == {2}


def test_fewer_ranks_command_fails_with_exit_2_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    start = time.perf_counter()
    command = [sys.executable, "-m", "lightning_phantom.compare", "--config-name", "compare_fewer_ranks",
               "compare.runs.1.overrides=['strategy=tp','trainer.devices=3']", f"hydra.run.dir={out}"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "run 'tp-4' (compare.runs[1]): strategy=tp cannot shard" in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr
    assert not (out / "phantom-2").exists() and not (out / "tp-4").exists()
    assert time.perf_counter() - start < 120


def test_two_runs_on_different_ranks_in_one_comparison(tmp_path):
    """phantom on 2 processes beside one device, digits data, each stopped at the target."""
    out = tmp_path / "cmp"
    runs = ("compare.runs=[{name:phantom-2,overrides:['strategy=phantom','trainer.devices=2',"
            "'strategy.ghosts=2']},{name:single-1,overrides:['strategy=single']}]")
    proc = subprocess.run([sys.executable, "-m", "lightning_phantom.compare", "data=digits", *TINY, runs,
                           f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {row["name"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    phantom, single = rows["phantom-2"], rows["single-1"]
    assert (phantom["strategy"], phantom["ranks"]) == ("phantom", 2)
    assert (single["strategy"], single["ranks"]) == ("single", 1)
    # Same width, but the phantom model is smaller: diagonal blocks plus ghosts instead of whole layers.
    assert single["params_model"] == single["params_per_rank"]  # one device holds the whole model
    # A phantom group's ranks hold distinct blocks; only the output bias (10 classes) is on both.
    per_rank = json.loads((Path(phantom["run"]) / "result.json").read_text())["per_rank"]
    assert phantom["params_model"] == sum(r["params"] for r in per_rank) - 10
    assert phantom["params_model"] < single["params_model"]
    for row in (phantom, single):
        # Stopped at the first validation (step 4 of a 40-step budget): val_loss <= 10 at once.
        assert row["target_step"] == 4 and row["target_J"] is not None
        assert row["target_rank_s"] == pytest.approx(row["target_s"] * row["ranks"])
        assert 0 <= row["final_val_acc"] <= 1  # digits: accuracy beside the loss
        assert json.loads((Path(row["run"]) / "result.json").read_text())["steps"] == 4
    table = (out / "compare.md").read_text()
    assert table.startswith("| run | strategy |") and "| phantom-2 | phantom |" in table
    assert "val acc" in table
    assert (out / "compare_target.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "phantom-2" / "result.json").exists() and (out / "single-1" / "result.json").exists()
