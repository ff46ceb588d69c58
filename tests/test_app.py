"""The command-line app, the comparison and the examples, run as a user runs them.

Every run is a real subprocess (``python -m lightning_phantom ...``): with ``trainer.devices=2``
Lightning's own launcher starts the second process, re-running the app under Hydra. Models
are tiny and runs a few steps: the file takes 3-4 minutes on two quiet cores. The processes
import this checkout (tests/conftest.py sets PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
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


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    command = args if args[0].endswith("lightning-phantom") else [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                                  f"--- stderr\n{proc.stderr[-5000:]}")


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def _ranks_measured(run_dir: Path) -> int:
    # Rank 0 gathers every rank's figures over the process group (RunRecorder): one entry per
    # process that Lightning's launcher started and that trained.
    return len(_result(run_dir)["per_rank"])


def _no_empty_files(run_dir: Path) -> None:
    empty = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert not empty, f"empty files in {run_dir}: {empty}"


def _progress(stdout: str, strategy: str) -> list[str]:
    return re.findall(rf"^ *{strategy}: step \d+/\d+, loss \S+, \S+ ms/step.*$", stdout, re.MULTILINE)


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


def test_plot_shows_the_target_and_ticks_where_the_curves_differ(tmp_path):
    from lightning_phantom.app.report import plot

    def run(scale: float) -> dict:  # train loss from 0.9 to 0.11; validations between 0.12 and 0.22
        train = [[s, 0.1 * s, scale * s, 0.11 + 1.0 / (1 + 0.1 * s) ** 2] for s in range(1, 201)]
        val = [[s, 0.1 * s, scale * s, v] for s, v in ((50, 0.2 * scale), (100, 0.16 * scale), (200, 0.12 * scale))]
        return {"train_curve": train, "val_curve": val,
                "config": {"target_loss": 0.15, "model": {"task": "regression"}}}

    fig = plot({"phantom k=16": run(1.0), "tp": run(1.1)}, tmp_path / "c.png", "estimate")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.axes[0].get_xlabel().lower().count("estimate") == 1  # said once, not twice
    title = fig._suptitle.get_text()  # the train curve starts at 0.9, above the validations' range
    assert "clipped: train MSE outside the y range until step 17 (up to 0.936)" in title
    for ax in fig.axes:
        assert ax.get_ylabel().startswith("val MSE")
        assert any(list(line.get_ydata()) == [0.15, 0.15] and line.get_linestyle() == "--" for line in ax.lines)
        low, high = ax.get_ylim()
        assert 0.09 < low < 0.12 and 0.22 < high < 0.3  # the validations' range, not the first train loss
        ticks = [t for t in ax.get_yticks() if low <= t <= high]
        assert len(ticks) >= 4  # labelled ticks inside the range where the curves differ


def _sweep_result(strategy: str, ghosts, sent: int, joules: float) -> dict:
    """A result.json as RunRecorder writes it, for the plots' tests."""
    rank = {"params": 100, "params_sharded": 98, "params_replicated": 2, "rows": 16, "sent_bytes": str(sent),
            "rss_peak": 2**20, "flops": 200}
    return {"strategy": strategy, "world_size": 2, "group_size": 2, "data_parallel": 1, "sizes": [4, 8, 8, 2],
            "ghosts": [ghosts, ghosts] if ghosts else None, "steps": 8, "step_time_s": 0.01, "wall_s": 1.0,
            "final_train_loss": 0.2, "final_val_loss": 0.2, "per_rank": [rank, rank],
            "predicted": {"params": 100, "macs": 100, "sent_bytes": str(sent)},
            "energy": {"meter": "estimate", "J_per_step_median": joules, "total_J": 8 * joules,
                       "energy_to_target": {"energy_J": 8 * joules, "time_s": 0.8, "step": 8, "target": 1.0,
                                            "reached_value": 0.2}},
            "train_curve": [[s, 0.1 * s, joules * s, 1 / s] for s in range(1, 9)],
            "val_curve": [[8, 0.8, 8 * joules, 0.2]],
            "config": {"target_loss": 1.0, "model": {"task": "regression"}}}


def test_sweep_plot_marks_estimates_and_shows_small_byte_counts(tmp_path):
    from lightning_phantom.app.report import plot_against_ghosts

    results = {"phantom k=8": _sweep_result("phantom", 8, 18_000, 1.0),
               "phantom k=32": _sweep_result("phantom", 32, 68_000, 1.2),
               "tp": _sweep_result("tp", None, 1_050_000, 2.0)}
    fig = plot_against_ghosts(results, tmp_path / "sweep_ghosts.png")
    joules, sent, ms, to_target = fig.axes
    for ax in (joules, to_target):  # J on CPU: an estimate, said once per label
        assert ax.get_ylabel().lower().count("estimate") == 1, ax.get_ylabel()
    assert "estimate" not in ms.get_ylabel().lower() + sent.get_ylabel().lower()
    low, high = sent.get_ylim()
    assert sent.get_yscale() == "log" and low < 18_000 and high > 1_050_000

    def height(value: float) -> float:  # where a point sits, as a fraction of the panel's height
        return sent.transAxes.inverted().transform(sent.transData.transform((8, value)))[1]

    assert height(68_000) - height(18_000) > 0.2  # phantom's runs apart, not on TP's zero line (0.05 linear)
    for result in results.values():
        result["energy"]["energy_to_target"] = None
    to_target = plot_against_ghosts(results, tmp_path / "sweep_ghosts.png").axes[3]
    assert [t.get_text() for t in to_target.texts] == ["no run reached\nthe target"] and not to_target.lines


def test_user_config_dir_adds_groups(tmp_path):
    """--config-dir (or hydra.searchpath) puts a user's own groups beside the shipped ones."""
    mine = tmp_path / "mine" / "strategy"
    mine.mkdir(parents=True)
    (mine / "wide_phantom.yaml").write_text("defaults:\n  - phantom\n  - _self_\nghosts: 3\n")
    for extra in (["--config-dir", str(tmp_path / "mine")], [f"hydra.searchpath=[file://{tmp_path / 'mine'}]"]):
        proc = _run(["lightning_phantom", *extra, "strategy=wide_phantom", "data=digits", "--cfg", "job"],
                    cwd=tmp_path)
        _ok(proc)
        assert "ghosts: 3" in proc.stdout and "DigitsDataModule" in proc.stdout  # the user's group and ours
        assert "lightning_phantom.strategy.PhantomStrategy" in proc.stdout


def _sigint_as_in_a_terminal() -> None:
    # A shell starts a background job (`pytest &`, `nohup`) with SIGINT ignored, and every process it
    # starts inherits that: Python then never raises KeyboardInterrupt, and a SIGINT does nothing (the
    # app is right to honour it). Ctrl-C in a terminal meets the default disposition; so does this test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_compare_ctrl_c_stops_every_process(tmp_path):
    """Ctrl-C during a compare run: the run's processes are killed, one line, exit code 130."""
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "lightning_phantom.compare", *TINY, "strategy.ghosts=4",
                             "trainer.max_steps=100000", "progress_every=1", f"hydra.run.dir={out}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        seen = []
        for line in proc.stdout:  # wait until the phantom run trains
            seen.append(line)
            if line.startswith("  phantom: step "):
                break
        assert proc.poll() is None, "".join(seen) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert stderr.strip().splitlines() == [
            "lightning-phantom-compare: interrupted (Ctrl-C); every process of the run was stopped"]
        time.sleep(1)
        assert not _processes_of(out), [_cmdline(pid) for pid in _processes_of(out)]
    finally:  # a failed test leaves nothing running
        proc.kill()
        for pid in _processes_of(out):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _processes_of(run_dir: Path) -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and str(run_dir) in _cmdline(pid)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------ subprocesses: the app

def test_compare_runs_every_strategy_and_counts_what_the_model_predicts(tmp_path):
    """compare runs the app once per strategy (phantom, tp, ddp on 2 processes, single on 1)."""
    out = tmp_path / "cmp"
    proc = _run(["lightning_phantom.compare", *TINY, "strategy.ghosts=4",
                 "compare.strategies=[phantom,tp,ddp,single]", f"hydra.run.dir={out}"], cwd=tmp_path)
    _ok(proc)
    for name in ("compare.md", "compare.csv", "compare.json"):
        assert (out / name).stat().st_size > 0
    for name in ("compare.png", "compare_target.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| phantom | 4 | 2 |" in table and "peak RSS MiB/rank" in table  # the full table
    printed = proc.stdout[proc.stdout.index("run  "):proc.stdout.index("(full table: compare.md")]
    assert max(map(len, printed.splitlines())) <= 100, printed  # the terminal's: headline columns
    assert re.search(r"^phantom k=4 +2 ", printed, re.MULTILINE) and "J to target" in printed
    for i, strategy in enumerate(("phantom", "tp", "ddp", "single"), 1):
        assert f"compare: run {i} of 4: {strategy} on " in proc.stdout  # progress: which run, which strategy
        assert _progress(proc.stdout, strategy), proc.stdout  # the run's own progress lines, relayed
    _no_empty_files(out)
    assert "estimate" in table and "ESTIMATE" in table  # the CPU meter is labelled as such
    assert "Counted bytes equal the model for every rank and strategy." in table

    rows = {row["strategy"]: row for row in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"phantom", "tp", "ddp", "single"}
    for name, row in rows.items():
        assert row["sent_matches_model"] == "True", row
        assert float(row["sent_bytes_per_step"]) == float(row["sent_bytes_model"]), row
        assert int(row["macs_per_step"]) == int(row["macs_model"]), row
        assert int(row["params_per_rank"]) == int(row["params_per_rank_model"]), row
        assert float(row["J_per_step_median"]) > 0 and row["meter"] == "estimate"
        assert row["target_J"] not in ("", None)  # target_loss=10 is reached at the first validation
        assert float(row["step_ms_median"]) > 0 and int(row["rss_peak_bytes_per_rank"]) > 0
    assert float(rows["phantom"]["sent_bytes_per_step"]) < float(rows["tp"]["sent_bytes_per_step"])
    assert float(rows["single"]["sent_bytes_per_step"]) == 0

    for strategy, ranks in (("phantom", 2), ("tp", 2), ("ddp", 2), ("single", 1)):
        result = _result(out / strategy)
        assert result["world_size"] == ranks and len(result["per_rank"]) == ranks
        assert result["config"]["model"]["width"] == 16 and result["steps"] == 8  # the overrides arrived
        assert _ranks_measured(out / strategy) == ranks
        for rank in result["per_rank"]:  # every rank, exactly (Fractions)
            assert Fraction(rank["sent_bytes"]) == Fraction(result["predicted"]["sent_bytes"])
    assert _result(out / "phantom")["ghosts"] == [4, 4]


def test_cli_phantom_on_digits_with_the_console_script(tmp_path):
    script = shutil.which("lightning-phantom") or str(Path(sys.executable).parent / "lightning-phantom")
    if not Path(script).exists():
        pytest.skip("the lightning-phantom console script is not installed")
    run_dir = tmp_path / "run"
    proc = _run([script, "data=digits", "strategy.plan={net: {ghosts: 2}}", "trainer.devices=2", *RUN,
                 "quiet=true", "trainer.enable_checkpointing=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    _ok(proc)
    result = _result(run_dir)
    assert result["strategy"] == "phantom" and result["sizes"] == [64, 16, 16, 16, 10]
    assert result["ghosts"] == [2, 2]  # the plan's, in the run (strategy.ghosts=16 would not fit width 16)
    # The terminal shows the run: no advertisement (litlogger, and litmodels with a checkpoint), no
    # deprecation note from torch about Lightning's code on each rank.
    assert "💡" not in proc.stdout + proc.stderr and "LeafSpec" not in proc.stderr, proc.stderr
    assert result["config"]["data"]["_target_"].endswith("DigitsDataModule")
    assert _ranks_measured(run_dir) == 2
    assert "val_acc" in (run_dir / "logs" / "metrics.csv").read_text()
    assert not _progress(proc.stdout, "phantom") and "validation at step" not in proc.stdout  # quiet=true
    _no_empty_files(run_dir)

    # examples/serve_dense.py serves the app's checkpoint: sizes from it, the digits data for its shape.
    checkpoint, = (run_dir / "logs" / "checkpoints").glob("*.ckpt")
    serve = [sys.executable, str(ROOT / "examples" / "serve_dense.py"), str(checkpoint)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    evaluated = subprocess.run(serve, capture_output=True, text=True, timeout=120, env=env)
    _ok(evaluated)
    assert "64 inputs -> 10 outputs" in evaluated.stdout and "validation accuracy" in evaluated.stdout
    ok = subprocess.run(serve + ["--inputs", json.dumps([[0.5] * 64] * 3)], capture_output=True, text=True,
                        timeout=120, env=env)
    _ok(ok)
    outputs = json.loads(ok.stdout.splitlines()[-1])["outputs"]
    assert len(outputs) == 3 and all(len(row) == 10 for row in outputs)
    wrong = subprocess.run(serve + ["--inputs", "[[1, 2, 3]]"], capture_output=True, text=True, timeout=120,
                           env=env)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "this model takes rows of 64 numbers (its input_size), got 3 numbers per row" in wrong.stderr


def test_cli_tensor_parallel_through_lightnings_launcher(tmp_path):
    """Also: a run shorter than val_check_interval validates at its end; progress by default."""
    run_dir = tmp_path / "run"
    short = [o for o in TINY[1:] if not o.startswith("trainer.val_check_interval")]
    proc = _run(["lightning_phantom", "strategy=tp", "model.width=32", *short, "trainer.devices=2",
                 "trainer.val_check_interval=50", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    _ok(proc)
    result = _result(run_dir)
    assert (result["strategy"], result["group_size"], result["sizes"][1]) == ("tp", 2, 32)
    assert _ranks_measured(run_dir) == 2
    assert "tp: 8 steps" in proc.stdout
    assert [row[0] for row in result["val_curve"]] == [8] and result["final_val_step"] == 8  # once, at the end
    assert result["energy"]["energy_to_target"]["step"] == 8  # target_loss=10: reached at that validation
    lines = _progress(proc.stdout, "tp")
    assert lines and lines[-1].startswith("tp: step 8/8, loss ") and "tp: validation at step 8: val_loss" in proc.stdout
    _no_empty_files(run_dir)


def test_compare_sweep_gathers_one_table(tmp_path):
    sweep = tmp_path / "sweep"  # given relative to the working directory, as Hydra's default is
    proc = _run(["lightning_phantom.compare", "-m", "strategy.ghosts=2,4", *TINY, "hydra.sweep.dir=sweep"],
                cwd=tmp_path)
    _ok(proc)
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    # TP does not depend on ghosts: run by the first job, reused by the second.
    runs = sorted((r["strategy"], r["ghosts"]) for r in rows)
    assert runs == [("phantom", "2"), ("phantom", "4"), ("tp", "")]
    assert "reusing its result" in proc.stdout
    assert all(r["sent_matches_model"] == "True" for r in rows)
    assert len({r["run"] for r in rows}) == 3 and all(Path(r["run"]).is_absolute() for r in rows)
    assert "Sweep, 3 runs:" in proc.stdout and "[job" not in proc.stdout
    for name in ("sweep.png", "sweep_target.png", "sweep_ghosts.png"):  # the README's list of plots
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD = [  # every bad override the README promises to refuse: overrides, what the one line on stderr says
    (["strategy=phantomm"], "strategy=phantomm: no such option of the config group 'strategy'; choose one "
                            "of ddp, phantom, single, tp"),
    (["data=mnist"], "data=mnist: no such option of the config group 'data'; choose one of digits, teacher"),
    (["trainer.precision=bf17-mixed"],
     "trainer (lightning.pytorch.Trainer): Precision 'bf17-mixed' is invalid"),
    (["strategy.data_parallel=fsdpp"], "data_parallel must be one of ('ddp', 'fsdp'), got 'fsdpp'"),
    (["model.activation=swishh"], "model.activation must be one of ['gelu', "),
    (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    (["trainer.max_steps=-5"], "`max_steps` must be a non-negative integer or -1"),
    (["+stratgy=tp"], "unknown key 'stratgy': nothing reads it; did you mean 'strategy'?"),
    (["stratgy=tp"], "stratgy=tp: the configuration has no key 'stratgy'; did you mean 'strategy'?"),
    (["+measure.every=3"], "unknown key 'measure.every': nothing reads it"),
    (["trainer.gradient_clip_val=1"], "'gradient_clip_val' is an argument of lightning.pytorch.Trainer that "
                                      "conf/ does not set; add it with +trainer.gradient_clip_val=1"),
    (["+trainer.gradient_clipval=1"], "unexpected keyword argument 'gradient_clipval'"),
    (["strategy.init=svdd"], "strategy (lightning_phantom.strategy.PhantomStrategy): init must be 'svd' or "
                             "'random', got 'svdd'"),  # not blamed on ghosts
    (["model.width=[1,"], "cannot read the override 'model.width=[1,'"),
    (["model.width=16", "strategy.ghosts=9"], "strategy.ghosts=9 does not fit model.width=16"),
    (["trainer.devices=3", "strategy.phantom_parallel_size=2"],
     "world size (3) is not divisible by phantom(2)"),
]


@pytest.mark.parametrize("program", ["lightning-phantom", "lightning-phantom-compare"])
@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_override_is_one_line_and_exit_code_2_before_any_folder(program, overrides, message, tmp_path,
                                                                      monkeypatch, capsys):
    """Each program's main() as its console script calls it, in this process (no training starts)."""
    from lightning_phantom.app import cli, compare

    def started(*args, **kwargs):
        raise AssertionError(f"{program} {' '.join(overrides)} was not refused: it started to run")

    monkeypatch.setattr(cli, "run", started)  # a bad override that slips through fails here, untrained
    monkeypatch.setattr(compare, "compare", started)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [program, *overrides, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exited:
        (cli if program == "lightning-phantom" else compare).main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"{program}: error: "), stderr
    assert message in stderr
    assert not run_dir.exists()  # checked before Hydra makes the run directory: nothing left behind
    assert "HYDRA_FULL_ERROR" not in os.environ  # Hydra reports as usual once composed


@pytest.mark.parametrize("program", ["lightning-phantom", "lightning-phantom-compare"])
def test_help_says_what_the_command_does(program, monkeypatch, capsys):
    from lightning_phantom.app import cli, compare

    monkeypatch.setattr(sys, "argv", [program, "--help"])
    with pytest.raises(SystemExit) as exited:
        (cli if program == "lightning-phantom" else compare).main()
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith(f"{program}: one ") and "powered by Hydra" not in out, out[:300]
    assert "strategy: ddp, phantom, single, tp" in out and "--hydra-help" in out


def test_the_plan_key_reaches_the_strategy_and_is_checked(compose):
    import hydra

    from lightning_phantom.app.cli import ConfigError, check_config

    cfg = compose("model.width=16", "model.depth=2", "strategy.plan={net: {ghosts: 2, init: random}}")
    assert check_config(cfg).ghosts == [2, 2]  # the plan's, not strategy.ghosts=16 (too many for width 16)
    plan = hydra.utils.instantiate(cfg.strategy).plan
    assert (plan.modules["net"].ghosts, plan.modules["net"].init) == (2, "random")
    with pytest.raises(ConfigError, match=r"strategy.plan=\{'head': \{\}\} does not fit the app's model "
                                          ".*'head' matches no module"):
        check_config(compose("strategy.plan={head: {}}"))


def test_bad_overrides_fail_before_any_process_starts(tmp_path):
    """The console, as a user meets it: each a real process, exit code 2, one line, no folder, no
    process group. (Every case is run in-process above; these three are the kinds, by both programs.)"""
    cases = [("lightning_phantom", ["+stratgy=tp"], "did you mean 'strategy'?"),  # used to train phantom
             ("lightning_phantom", ["strategy=phantomm"], "choose one of ddp, phantom, single, tp"),
             ("lightning_phantom.compare", ["trainer.precision=bf17-mixed"],
              "Precision 'bf17-mixed' is invalid")]
    procs = []
    for i, (module, overrides, _) in enumerate(cases):
        run_dir = tmp_path / f"bad{i}"
        command = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
        procs.append((run_dir, subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True)))
    for (run_dir, proc), (_, _, message) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)  # importing torch and Lightning is most of it
        assert proc.returncode == 2, stdout + stderr
        assert len(stderr.splitlines()) == 1 and message in stderr, stderr
        assert "Initializing distributed" not in stdout + stderr  # no process group, no launched rank
        assert not run_dir.exists()  # checked before Hydra makes the run directory: nothing left behind


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


# ------------------------------------------------ compare's timeout: silence, not length
def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()  # a zombie has stopped
    except FileNotFoundError:
        return False


def test_a_run_is_killed_for_its_silence_not_its_length(tmp_path):
    from lightning_phantom.app.processes import run_logged

    # 7 s in all, never 5 s silent: a slow run that keeps printing its progress finishes.
    slow = [sys.executable, "-c", "import time\nfor i in range(7):\n    print(i, flush=True)\n    time.sleep(1)"]
    seen: list[str] = []
    assert run_logged(slow, tmp_path / "slow.log", 5.0, seen.append) == 0
    assert seen == [str(i) for i in range(7)]
    # A hung run (it and a process it started print nothing more) is killed, with that process.
    hung = [sys.executable, "-c", "import subprocess, sys, time\n"
            "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']).pid, flush=True)\n"
            "time.sleep(120)"]
    said: list[str] = []
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"printed nothing for 5 s and was killed \(hung\?\); see .*hung.log"):
        run_logged(hung, tmp_path / "hung.log", 5.0, said.append)
    assert time.monotonic() - start < 20
    time.sleep(0.5)
    assert len(said) == 1 and not _alive(int(said[0]))


def test_progress_lines_come_at_least_every_heartbeat_on_a_long_run(monkeypatch):
    import io
    from types import SimpleNamespace

    from lightning_phantom.app.callbacks import ProgressLog

    clock = [0.0]
    monkeypatch.setattr("lightning_phantom.app.callbacks.time.perf_counter", lambda: clock[0])
    out = io.StringIO()
    log = ProgressLog(stream=out)  # auto: every 1,000 steps of 10,000
    trainer = SimpleNamespace(global_step=0, max_steps=10_000, is_global_zero=True)
    log.on_train_start(trainer, None)
    for step in range(1, 301):  # one step every 0.5 s: 1,000 steps would take 500 s
        clock[0], trainer.global_step = 0.5 * step, step
        log.on_train_batch_end(trainer, None, 0.1, None, step - 1)
    steps = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == [120, 240]  # every 60 s
    explicit = ProgressLog(every=1000, stream=io.StringIO())  # what the user asked for, exactly
    explicit.on_train_start(trainer, None)
    for step in range(1, 301):
        clock[0], trainer.global_step = 150 + 0.5 * step, step
        explicit.on_train_batch_end(trainer, None, 0.1, None, step - 1)
    assert explicit.stream.getvalue() == ""
