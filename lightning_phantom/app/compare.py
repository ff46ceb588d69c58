"""Phantom against tensor parallelism, side by side: ``python -m lightning_phantom.compare``.

    python -m lightning_phantom.compare                              # CPU, 2 processes, teacher data
    python -m lightning_phantom.compare model.width=2048 trainer.max_steps=400 data=digits
    python -m lightning_phantom.compare 'compare.strategies=[phantom,tp,ddp]'
    python -m lightning_phantom.compare -m strategy.ghosts=8,32,128  # one table for the sweep

How it works. Every strategy in ``compare.strategies`` gets the same configuration (conf/, with
this command's overrides), composed and checked by the app *before* any run starts. Then each
runs, one after the other, as the ordinary app, ``python -m lightning_phantom ... strategy=S``,
in ``<run dir>/S/``: Lightning's launcher starts its processes, ``RunRecorder``
(``app.recorder``) measures inside every rank and rank 0 writes ``result.json``. This process
only reads the results and writes ``compare.md``, ``compare.csv``, ``compare.png`` and
``compare.json`` (``app.report``). A ``strategy.KEY=...`` override goes to every compared strategy whose config has KEY (ghosts: phantom
only). In a sweep, a run whose composed configuration equals one already done in the sweep
(TP does not depend on ghosts) is reused, and ``GatherSweep`` puts every job's rows in
``sweep.md`` / ``sweep.csv`` / ``sweep.png`` at the end.

Runs with settings of their own: ``compare.runs`` (``conf/compare_fewer_ranks.yaml``), a list of
``{name, overrides}``, replaces the one-run-per-strategy list; each run gets ``compare.overrides``,
this command's overrides and its own, later winning, so that any key (``trainer.devices``,
``model.width``, ``strategy.ghosts``) may differ between runs. Its folder and its label in every
table and plot are its name::

    python -m lightning_phantom.compare --config-name compare_fewer_ranks   # phantom on 2, TP on 4

What each rank measures: see ``lightning_phantom.app.recorder``. Tables and plots:
``lightning_phantom.app.report``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from lightning_phantom.app.cli import CONF_DIR, RESULT_FILE, check_config
from lightning_phantom.app.objects import check_keys
from lightning_phantom.app.overrides import ConfigError, composed, exit_on_config_error, run_hydra_app
from lightning_phantom.app.processes import run_app_subprocess
from lightning_phantom.app.report import plot_against_ghosts, run_label, terminal_table, write_outputs


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def overrides_for(strategy: str, overrides: list[str]) -> list[str]:
    """This command's overrides that apply to ``strategy``'s run (see the module docstring)."""
    from hydra import compose

    own = compose(config_name="config", overrides=[f"strategy={strategy}"]).strategy
    kept = []
    for o in overrides:
        key = _key(o)
        if key == "strategy" or key.startswith(("compare", "hydra")):
            continue  # compare decides the strategy; compare.* and hydra.* are this command's own
        if key.startswith("strategy.") and key.split(".")[1] not in own and not o.startswith("+"):
            continue  # an option of another strategy (ghosts: phantom only)
        kept.append(o)
    return kept + [f"strategy={strategy}"]


def _config_key(cfg: DictConfig) -> str:
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reusable(sweep_dir: Path, strategy: str, key: str) -> Optional[Path]:
    for path in sorted(sweep_dir.glob(f"*/{strategy}/config_key.txt")):
        if path.read_text().strip() == key and (path.parent / RESULT_FILE).exists():
            return path.parent
    return None


def plan_runs(cfg: DictConfig, task_overrides: list[str]) -> dict[str, tuple[list[str], DictConfig, Any]]:
    """Every run's overrides, composed configuration and checked plan, before any run starts.

    Runs are ``compare.runs`` where given (each its own settings, ``plan_named_runs``), else one
    per strategy of ``compare.strategies``; keyed by the run's name (the strategy's, for the latter).
    """
    from hydra import compose

    if cfg.compare.get("runs"):
        return plan_named_runs(cfg.compare, task_overrides)
    strategies = list(cfg.compare.strategies)
    if not strategies:
        raise ConfigError("compare.strategies is empty; list at least one of phantom, tp, ddp, single")
    planned = {}
    for s in strategies:
        try:
            overrides = overrides_for(s, task_overrides)
            composed = compose(config_name="config", overrides=overrides)
        except Exception as e:  # noqa: BLE001 - Hydra's own errors name the bad override
            raise ConfigError(f"compare, strategy={s}: {e}") from None
        planned[s] = (overrides, composed, check_config(composed))
    return planned


def _override_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not OmegaConf.is_list(value) or not all(isinstance(o, str) and "=" in o for o in value):
        raise ConfigError(f"{where} must be a list of Hydra overrides like [strategy=tp, trainer.devices=4], "
                          f"got {OmegaConf.to_container(value) if OmegaConf.is_config(value) else value!r}")
    return [str(o) for o in value]


def plan_named_runs(compare_cfg: DictConfig, task_overrides: list[str]
                    ) -> dict[str, tuple[list[str], DictConfig, Any]]:
    """``compare.runs``: each run is ``python -m lightning_phantom`` with, in this order (later wins),
    ``compare.overrides`` (every run), this command's overrides and the run's own ``overrides``.

    Any key may differ between runs (devices, width, ghosts, strategy): that is how a comparison
    puts a phantom model on fewer ranks beside a TP model on more. As with ``compare.strategies``,
    a ``strategy.KEY`` override common to all runs goes only to the runs whose strategy has KEY.
    """
    from hydra import compose

    common = _override_list(compare_cfg.get("overrides"), "compare.overrides")
    task = [o for o in task_overrides
            if _key(o) != "strategy" and not _key(o).startswith(("compare", "hydra"))]
    planned = {}
    for i, entry in enumerate(compare_cfg.runs):
        where = f"compare.runs[{i}]"
        if not OmegaConf.is_dict(entry) or set(entry) - {"name", "overrides"} or "overrides" not in entry:
            raise ConfigError(f"{where} must be {{name: NAME, overrides: [KEY=VALUE, ...]}}, got "
                              f"{OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else entry!r}")
        own = _override_list(entry.overrides, f"{where}.overrides")
        name = str(entry.get("name") or "_".join(o.split("=", 1)[1] for o in own) or f"run{i}")
        if name in planned or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"{where}.name={name!r} must be unique and made of letters, digits, '-', '_' "
                              "or '.' (it names the run's folder)")
        try:
            selection = [o for o in common + own if _key(o) == "strategy"][-1:]  # the run's strategy
            strategy = compose(config_name="config", overrides=selection).strategy
            shared = [o for o in common + task  # strategy.KEY only where the run's strategy has KEY
                      if not (_key(o).startswith("strategy.") and not o.startswith("+")
                              and _key(o).split(".")[1] not in strategy)]
            overrides = shared + own
            composed = compose(config_name="config", overrides=overrides)
        except Exception as e:  # noqa: BLE001 - Hydra's own errors name the bad override
            raise ConfigError(f"compare, run {name!r} ({where}): {e}") from None
        try:
            planned[name] = (overrides, composed, check_config(composed))
        except ConfigError as e:
            raise ConfigError(f"compare, run {name!r} ({where}): {e}") from None
    return planned


class CheckComparison(HydraCallback):
    """``plan_runs`` before Hydra makes the run directory: a rejected comparison leaves no folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        composed()
        exit_on_config_error("lightning-phantom-compare", check_keys, config, CONF_DIR, "compare")
        exit_on_config_error("lightning-phantom-compare", plan_runs, config,
                             [str(o) for o in config.hydra.overrides.task])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        composed()  # each job is checked as it starts (compare)


def compare(cfg: DictConfig) -> str:
    """Run every strategy of ``cfg.compare.strategies`` (see the module docstring); returns the table."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir).resolve()
    planned = plan_runs(cfg, list(hc.overrides.task))
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN and cfg.compare.reuse else None
    results, runs = {}, {}
    for i, (s, (overrides, composed, plan)) in enumerate(planned.items(), 1):
        run_dir, key = out_dir / s, _config_key(composed)
        head = f"compare: run {i} of {len(planned)}: {s}"
        reused = _reusable(sweep_dir, s, key) if sweep_dir is not None else None
        if reused is not None:
            print(f"{head}: same configuration as {reused}, reusing its result", flush=True)
            run_dir = reused.resolve()
        else:
            print(f"{head} on {plan.world_size} process(es): python -m lightning_phantom "
                  f"{' '.join(overrides)}", flush=True)
            start = time.perf_counter()
            relay = None if cfg.get("quiet", False) else _progress_relay(plan.strategy)
            # The run prints its progress whatever quiet says (compare.quiet only stops the relay):
            # compare.timeout_s takes a run that stays silent that long for a hung one.
            rc = run_app_subprocess([*overrides, "quiet=false"], run_dir, run_dir / "run.log",
                                    cfg.compare.timeout_s, relay)
            if rc or not (run_dir / RESULT_FILE).exists():
                sys.stderr.write((run_dir / "run.log").read_text()[-6000:])
                raise RuntimeError(f"compare: the {s} run failed (exit code {rc}); see {run_dir / 'run.log'}")
            (run_dir / "config_key.txt").write_text(key + "\n")
            print(f"{head} done in {time.perf_counter() - start:.1f} s", flush=True)
        result = json.loads((run_dir / RESULT_FILE).read_text())
        if cfg.compare.get("runs"):  # a named run keeps its name in every table and plot
            result["name"] = s
        label = result.get("name") or run_label(result)
        results[label], runs[label] = result, str(run_dir)
    write_outputs(results, out_dir, "compare", runs)
    table = terminal_table(results)
    print(f"{table}\n\n(full table: compare.md; also compare.csv, compare.json, compare.png, "
          f"compare_target.png in {out_dir})", flush=True)
    return table


def _progress_relay(strategy: str):
    """Echo the run's progress lines (``ProgressLog``'s, prefixed with the strategy), indented."""
    prefix = f"{strategy}: "

    def relay(line: str) -> None:
        if line.startswith(prefix):
            print("  " + line, flush=True)

    return relay


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


class GatherSweep(HydraCallback):
    """At the end of a multirun: every job's runs in one ``sweep.md``/``.csv``/``.png``/``.json``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results, runs, jobs = {}, {}, {}
        jobs_dirs = sorted((p.parent for p in sweep_dir.glob("*/compare.json")),
                           key=lambda d: (len(d.name), d.name))  # 0, 1, ..., 10 in job order
        overrides = {d: _job_overrides(d) for d in jobs_dirs}
        common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
        for job_dir in jobs_dirs:  # a job is named by what sets it apart from the others
            job = " ".join(o for o in overrides[job_dir] if o not in common) or job_dir.name
            for label, run_dir in json.loads((job_dir / "compare.json").read_text())["runs"].items():
                run_dir = str(Path(run_dir).resolve())  # a reused run is named as the job that ran it
                if run_dir in runs.values():
                    continue  # a run reused by several jobs appears once, with the job that ran it
                name = f"{label} [job {job_dir.name}]" if label in results else label
                results[name] = json.loads((Path(run_dir) / RESULT_FILE).read_text())
                runs[name], jobs[name] = run_dir, job
        if not results:
            print(f"compare: no results to gather in {sweep_dir}", file=sys.stderr)
            return
        write_outputs(results, sweep_dir, "sweep", runs, jobs)
        ghosts_plot = plot_against_ghosts(results, sweep_dir / "sweep_ghosts.png")
        summary = " and sweep_ghosts.png" if ghosts_plot is not None else ""
        print(f"\nSweep, {len(results)} runs:\n{terminal_table(results)}\n\n(full table: sweep.md; also sweep.csv, "
              f"sweep.json, sweep.png, sweep_target.png{summary} in {sweep_dir})", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="compare")
def _compare_app(cfg: DictConfig) -> None:
    exit_on_config_error("lightning-phantom-compare", compare, cfg)


def main() -> None:
    """``lightning-phantom-compare`` / ``python -m lightning_phantom.compare``."""
    run_hydra_app("lightning-phantom-compare", _compare_app, CONF_DIR, "compare")


if __name__ == "__main__":
    main()
