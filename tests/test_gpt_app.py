"""``model=gpt data=text`` in the app and in compare: the checks before any process, and one real
comparison (TP on 2 and 4 processes, DDP, one device) whose counted bytes, multiply-adds and
parameters equal the GPT's cost model.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

GPT = ["model=gpt", "data=text"]
TINY = GPT + ["model.width=16", "model.layers=1", "model.heads=4", "model.mlp_ratio=2", "data.context=16",
              "data.batch_size=4", "data.val_windows=8", "trainer.max_steps=6", "trainer.val_check_interval=3",
              "measure.count_step=2", "measure.warmup_steps=1", "energy=estimate", "target_loss=10"]


@pytest.fixture()
def compose():
    from hydra import compose, initialize_config_dir

    from lightning_phantom.app.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides, name="config": compose(config_name=name, overrides=list(overrides))


def test_check_config_plans_the_gpt(compose):
    from lightning_phantom.app.cli import check_config

    plan = check_config(compose(*GPT, "strategy=tp"))
    assert (plan.strategy, plan.world_size, plan.group_size, plan.data_parallel) == ("tp", 2, 2, 1)
    assert plan.sizes == [256, 128, 128, 256] and plan.ghosts is None  # [vocab, d per block, vocab]
    assert check_config(compose(*GPT, "strategy=ddp")).data_parallel == 2
    assert check_config(compose(*GPT, "strategy=single")).world_size == 1
    assert check_config(compose(*GPT, "strategy=tp", "trainer.devices=4")).group_size == 4
    plan = check_config(compose(*GPT, "strategy=phantom", "strategy.ghosts=8"))  # 2 blocks, 4 phantom layers each
    assert (plan.strategy, plan.group_size, plan.data_parallel, plan.ghosts) == ("phantom", 2, 1, [8] * 8)
    assert check_config(compose(*GPT, "strategy=phantom", "model.compile=true")).strategy == "phantom"


@pytest.mark.parametrize("overrides, message", [
    (["model=gpt"], "model=gpt learns next-byte prediction on data=text, got data._target_="),
    (["data=text"], "data=text is a byte corpus for the language model; add model=gpt"),
    ([*GPT, "model.width=100", "model.heads=8"], "model.width=100 is not divisible by model.heads=8"),
    ([*GPT, "strategy=tp", "model.width=96", "model.heads=3"],
     "strategy=tp splits model.heads = 3 over its 2 ranks, but 3 % 2 = 1; use a multiple of 2"),
    ([*GPT, "strategy=tp", "trainer.devices=4", "model.heads=2"],
     "strategy=tp splits model.heads = 2 over its 4 ranks, but 2 % 4 = 2; use a multiple of 4"),
    ([*GPT, "model.tp_head=gathered"], "model.tp_head must be one of replicated, vocab_parallel, got 'gathered'"),
    ([*GPT, "model.dropout=1.5"], "model.dropout must be a number in [0, 1), got 1.5"),
    ([*GPT, "model.context=32"], "model.vocab=256 and model.context=32 must hold the data's tokens (data.vocab=256) "
     "and windows (data.context=128)"),
    ([*GPT, "strategy=phantom", "model.width=96", "model.heads=3"],
     "strategy=phantom splits model.heads = 3 over its 2 ranks, but 3 % 2 = 1; use a multiple of 2"),
    ([*GPT, "strategy=phantom", "strategy.ghosts=65"],
     "strategy.ghosts=65 does not fit model=gpt (4 phantom layers per block, reading 128, 128, 128 and 512 "
     "features) on phantom groups of 2: ghosts=65 is too large for gpt.blocks, phantom layer 1: a rank holds "
     "n_in/p = 128/2 = 64 neurons"),
    ([*GPT, "strategy=phantom", "strategy.plan={gpt.head: {}}"],
     "strategy.plan={'gpt.head': {}} does not fit the app's GPT (its blocks are 'gpt.blocks') on phantom groups "
     "of 2: plan pattern names 'gpt.head', which cannot be sharded"),
])
def test_check_config_says_what_to_fix_for_the_gpt(compose, overrides, message):
    from lightning_phantom.app.cli import ConfigError, check_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(*overrides))


def test_compare_gpt_plans_the_same_gpt_for_phantom_on_2_and_tp_on_2_and_4_ranks(compose):
    from omegaconf import OmegaConf

    from lightning_phantom.app.compare import plan_runs

    planned = plan_runs(compose(name="compare_gpt"), [])
    assert {name: (plan.strategy, plan.world_size) for name, (_, _, plan) in planned.items()} == {
        "phantom-2": ("phantom", 2), "tp-2": ("tp", 2), "tp-4": ("tp", 4)}
    assert planned["phantom-2"][2].ghosts == [16] * 8  # 2 blocks of 4 phantom layers
    configs = [cfg for _, cfg, _ in planned.values()]
    for key in ("model", "data", "seed", "target_loss", "trainer.max_steps"):
        assert len({json.dumps(OmegaConf.to_container(OmegaConf.select(c, key), resolve=True)
                               if OmegaConf.is_config(OmegaConf.select(c, key)) else OmegaConf.select(c, key))
                    for c in configs}) == 1, key


def test_compare_gpt_runs_phantom_tp_ddp_and_one_device_and_counts_what_the_model_predicts(tmp_path):
    from lightning_phantom.cost.gpt import GPTShape, gpt_cost

    out = tmp_path / "cmp"
    runs = ("compare.runs=[{name:phantom-2,overrides:['strategy=phantom','trainer.devices=2','strategy.ghosts=2']},"
            "{name:tp-2,overrides:['strategy=tp','trainer.devices=2']},"
            "{name:tp-4,overrides:['strategy=tp','trainer.devices=4']},"
            "{name:ddp-2,overrides:['strategy=ddp','trainer.devices=2']},"
            "{name:single-1,overrides:['strategy=single']}]")
    proc = subprocess.run([sys.executable, "-m", "lightning_phantom.compare", "--config-name", "compare_gpt", *TINY,
                           runs, f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {row["name"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert {name: (row["strategy"], row["ranks"]) for name, row in rows.items()} == {
        "phantom-2": ("phantom", 2), "tp-2": ("tp", 2), "tp-4": ("tp", 4), "ddp-2": ("ddp", 2),
        "single-1": ("single", 1)}
    for name, row in rows.items():
        assert row["sent_matches_model"] is True, (name, row)
        assert row["macs_per_step"] == row["macs_model"] and row["params_per_rank"] == row["params_per_rank_model"]
        assert math.isfinite(row["final_val_loss"]) and row["final_val_bpc"] == pytest.approx(
            row["final_val_loss"] / math.log(2))
        assert row["sizes"] == "gpt d=16 L=1 h=4 f=32 T=16 V=256"
        result = json.loads((Path(row["run"]) / "result.json").read_text())
        assert result["data"]["sha256"] and result["data"]["bytes"] == {"train": 1444262, "val": 123585}
        assert result["loss_name"] == "cross-entropy, nats/char"
        for rank in result["per_rank"]:
            assert Fraction(rank["sent_bytes"]) == Fraction(result["predicted"]["sent_bytes"])
            # Every rank computes on its share of the cores, as Lightning gives DDP's ranks (without
            # it ModelParallelStrategy's other ranks each took every core).
            share = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // row["ranks"])
            assert rank["threads"] == int(share), (name, rank)
    # One dense GPT, four layouts: the whole model's parameters are the same; TP splits them.
    assert len({row["params_model"] for name, row in rows.items() if name != "phantom-2"}) == 1
    # The phantom GPT is a smaller model: both ranks' shards, and once what each holds a copy of
    # (token and position embeddings, final norm, head: V·d + T·d + 2d + d·V + V).
    replicated = 256 * 16 + 16 * 16 + 2 * 16 + 16 * 256 + 256
    assert rows["phantom-2"]["params_model"] == 2 * rows["phantom-2"]["params_per_rank"] - replicated
    assert rows["phantom-2"]["params_model"] < rows["single-1"]["params_model"]
    assert rows["single-1"]["params_per_rank"] == rows["single-1"]["params_model"]
    assert rows["tp-4"]["params_per_rank"] < rows["tp-2"]["params_per_rank"] < rows["single-1"]["params_model"]
    assert rows["single-1"]["sent_bytes_per_step"] == 0
    # TP sends 4 all-reduces of rows·d per block, ring 2(p-1)/p: 4 ranks send 3/2 of what 2 send.
    assert Fraction(rows["tp-4"]["sent_bytes_per_step"]) / Fraction(rows["tp-2"]["sent_bytes_per_step"]) == \
        Fraction(3, 2)
    # Phantom on the same 2 ranks sends less than TP by the factor of the cost model (ghosts 2 of d/p = 8).
    shape, (batch, seq) = GPTShape(256, 16, 1, 4, 32, 16), (4, 16)
    factor = gpt_cost(shape, batch, seq, 2, scheme="phantom", ghosts=2).sent_bytes / gpt_cost(shape, batch, seq, 2).sent_bytes
    assert Fraction(rows["phantom-2"]["sent_bytes_per_step"]) / Fraction(rows["tp-2"]["sent_bytes_per_step"]) == \
        factor < 1
    assert rows["phantom-2"]["ghosts"] == "2" and rows["phantom-2"]["params_per_rank"] < rows["single-1"]["params_model"]
    table = (out / "compare.md").read_text()
    assert "val bpc" in table and "nats per character" in table and "ESTIMATE" in table
