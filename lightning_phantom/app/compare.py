"""Phantom against tensor parallelism, side by side: ``python -m lightning_phantom.compare``.

    python -m lightning_phantom.compare                              # CPU, 2 processes, teacher data
    python -m lightning_phantom.compare model.width=2048 trainer.max_steps=400 data=digits
    python -m lightning_phantom.compare 'compare.strategies=[phantom,tp,ddp]'
    python -m lightning_phantom.compare -m strategy.ghosts=8,32,128  # one table for the sweep

How it works. Every strategy in ``compare.strategies`` gets the same configuration (conf/, with
this command's overrides), composed and checked by the app *before* any run starts. Then each
runs, one after the other, as the ordinary app, ``python -m lightning_phantom ... strategy=S``,
in ``<run dir>/S/``: Lightning's launcher starts its processes, and ``RunRecorder`` (below)
measures inside every rank and rank 0 writes ``result.json``. This process only reads the
results and writes ``compare.md``, ``compare.csv``, ``compare.png`` and ``compare.json``. A
``strategy.KEY=...`` override goes to every compared strategy whose config has KEY (ghosts: phantom
only). In a sweep, a run whose composed configuration equals one already done in the sweep
(TP does not depend on ghosts) is reused, and ``GatherSweep`` puts every job's rows in
``sweep.md`` / ``sweep.csv`` / ``sweep.png`` at the end.

What each rank measures (``RunRecorder``):

* bytes sent: one training step (``measure.count_step``) inside ``CommCounter``; what is issued
  between the step's start and the end of its backward is the model's communication, compared
  with ``lightning_phantom.cost.model``; the rest of the step (optimizer, data-parallel gradient
  average, callbacks) is reported apart (CSV column ``other_sent_bytes_per_step``). The model
  of ``tp`` is tensor parallelism alone: with ``strategy.data_parallel_size > 1`` the FSDP
  traffic across replicas comes on top. DDP's gradient all-reduce is counted through DDP's
  default all-reduce hook, which the recorder registers on CPU (Lightning registers hooks on
  CUDA only).
* multiply-adds: the next step inside ``LocalFlopCounterMode`` (FLOPs / 2; it counts each rank's
  own matmuls, DTensor's included). Neither counted step is timed.
* step time: ``on_train_batch_start`` → ``on_train_batch_end`` after ``measure.warmup_steps``;
  a step lasts as long as its slowest rank; the median is reported.
* memory: ``state`` = bytes of parameters + gradients + optimizer state this rank holds (a
  DTensor by its local shard), after a step; ``peak RSS`` = the process's resident set size,
  sampled during training (the whole process: Python, torch, data); on CUDA also the peak of
  ``torch.cuda.max_memory_allocated``.
* energy: ``EnergyMonitor`` (summed over ranks; on CPU without RAPL the ``estimate`` meter,
  CPU time × watts per core, *not a measurement*), and the energy and time to ``target_loss``.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_phantom.app.cli import CONF_DIR, RESULT_FILE, ConfigError, check_config, run_app_subprocess

# -------------------------------------------------------------- measuring (in every rank)


def _local(t) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor: this rank's shard


def _nbytes(t) -> int:
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    t = _local(t)
    return t.numel() * t.element_size()


def _trim_heap() -> None:
    gc.collect()
    try:  # give freed heap back to the OS, so that RSS starts from what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """Peak resident set size of this process while on, sampled by a daemon thread."""

    def __init__(self, period_s: float) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.rss())

    def start(self) -> None:
        self.peak = self.rss()
        self._stop.clear()
        threading.Thread(target=self._loop, daemon=True, name="rss-sampler").start()

    def stop(self) -> int:
        self._stop.set()
        self.peak = max(self.peak, self.rss())
        return self.peak


def _count_ddp(model) -> None:
    """Give a DDP model without a comm hook (Lightning registers one on CUDA only) DDP's default one.

    ``default_hooks.allreduce_hook`` is the all-reduce DDP does anyway, issued through
    ``torch.distributed.all_reduce`` from Python, where ``CommCounter`` sees it; the C++ reducer's
    own all-reduce it replaces is invisible to it.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not getattr(model, "_comm_hooks", None):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model.register_comm_hook(None, allreduce_hook)


def predicted_cost(strategy: str, module, group_size: int, world_size: int, rows: int,
                   element_size: int) -> dict:
    """The cost model's params, multiply-adds and sent bytes per rank for one step of ``module.net``."""
    from lightning_phantom.cost.model import phantom_cost, tp_cost
    from lightning_phantom.nn.layers import PhantomFFN

    net, sizes = module.net, list(module.sizes)
    if strategy == "phantom" and isinstance(net, PhantomFFN):
        cost = phantom_cost(net.sizes, net.shard.size, net.ghosts, rows, element_size)
    elif strategy == "tp":
        cost = tp_cost(sizes, group_size, rows, element_size)
    else:
        # One whole model per rank: a phantom group of one is exactly the dense FFN (cost.py).
        cost = phantom_cost(sizes, 1, [1] * (len(sizes) - 3), rows, element_size)
        if strategy == "ddp":  # one all-reduce of every gradient per step, ring 2(p-1)/p (counting.py)
            p = world_size
            return {"params": cost.params, "macs": cost.macs,
                    "sent_bytes": Fraction(2 * (p - 1) * cost.params * element_size, p)}
    return {"params": cost.params, "macs": cost.macs, "sent_bytes": cost.sent_bytes}


class RunRecorder(Callback):
    """Measures a run on every rank (see the module docstring) and gathers it into ``result``.

    Place it after the ``EnergyMonitor`` in the callbacks: it reads the joules of the step that
    the monitor has just closed.
    """

    def __init__(self, plan, count_step: Optional[int] = 2, warmup_steps: int = 3, rss_period_s: float = 0.01,
                 energy=None) -> None:
        self.plan, self.count_step, self.warmup_steps = plan, count_step, warmup_steps
        self.energy = energy
        self.result: dict = {}
        self._sampler = _RssSampler(rss_period_s)
        self._comm = self._flops = self._marker = None
        self._cuda = None
        self._losses: list = []
        self._local: dict[str, Any] = {"times": [], "train": [], "val": []}

    def _joules(self) -> float:
        return float(self.energy.local_J) if self.energy is not None else math.nan

    def _sync(self) -> None:
        if self._cuda is not None:  # time the kernels, not their launch
            import torch

            torch.cuda.synchronize(self._cuda)

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        if self.count_step is not None:
            _count_ddp(trainer.strategy.model)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            self._cuda = device
            torch.cuda.reset_peak_memory_stats(device)
        _trim_heap()
        self._local["params"] = sum(_local(p).numel() for p in pl_module.parameters())
        self._sampler.start()
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode

        self._step = trainer.global_step
        if self._step == self.count_step:
            self._local.update(rows=int(batch[0].shape[0]),
                               element_size=next(pl_module.parameters()).element_size())
            self._comm, self._marker = CommCounter(), None
            self._comm.__enter__()
        elif self.count_step is not None and self._step == self.count_step + 1:
            self._flops = LocalFlopCounterMode(display=False)
            self._flops.__enter__()
        self._sync()
        self._start = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._comm is not None:
            self._marker = len(self._comm.records)  # what follows is not the model's forward/backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._start
        counted = self._comm is not None or self._flops is not None
        if self._comm is not None:
            self._comm.__exit__(None, None, None)
            records = self._comm.records
            marker = len(records) if self._marker is None else self._marker
            model, other = records[:marker], records[marker:]
            self._local.update(sent_bytes=str(sum((r.sent_bytes for r in model), Fraction(0))),
                               other_sent_bytes=str(sum((r.sent_bytes for r in other), Fraction(0))),
                               calls=dict(sorted(Counter(r.op for r in model).items())))
            self._comm = None
        if self._flops is not None:
            self._flops.__exit__(None, None, None)
            self._local["flops"] = int(self._flops.get_total_flops())
            self._flops = None
        if not counted and self._step >= self.warmup_steps:
            self._local["times"].append(elapsed)
        if "state_bytes" not in self._local and self._step + 1 >= self.warmup_steps:
            params, optimizer = list(pl_module.parameters()), trainer.optimizers[0]
            state = [v for per_param in optimizer.state.values() for v in per_param.values()]
            self._local["state_bytes"] = (sum(map(_nbytes, params)) + sum(_nbytes(p.grad) for p in params)
                                          + sum(map(_nbytes, state)))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(loss.detach())  # read at the end: .item() here would sync every step
        self._local["train"].append([self._step + 1, time.perf_counter() - self._t0, self._joules()])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self._local["val"].append([trainer.global_step, time.perf_counter() - self._t0, self._joules(),
                                   float(trainer.callback_metrics["val_loss"])])

    def on_train_end(self, trainer, pl_module) -> None:
        import torch
        import torch.distributed as dist

        for row, loss in zip(self._local["train"], self._losses):
            row.append(float(loss))
        self._local["rss_peak"] = self._sampler.stop()
        if self._cuda is not None:
            self._local["cuda_peak"] = torch.cuda.max_memory_allocated(self._cuda)
        self._local["wall_s"] = time.perf_counter() - self._t0
        ranks = [self._local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, self._local)
        self.result = self._combine(ranks, pl_module)

    def _combine(self, ranks: list[dict], pl_module) -> dict:
        plan, first = self.plan, ranks[0]
        n = min(len(r["times"]) for r in ranks)
        step_times = [max(r["times"][i] for r in ranks) for i in range(n)]  # the slowest rank's

        def curve(key: str) -> list[list[float]]:  # rank 0's steps, times and losses; all ranks' joules
            return [[step, t, sum(r[key][i][2] for r in ranks), loss]
                    for i, (step, t, _, loss) in enumerate(first[key])]

        train, val = curve("train"), curve("val")
        last = [loss for *_, loss in train[-10:]]
        predicted = None
        if "rows" in first:
            cost = predicted_cost(plan.strategy, pl_module, plan.group_size, plan.world_size, first["rows"],
                                  first["element_size"])
            predicted = {**cost, "sent_bytes": str(cost["sent_bytes"])}
        return {
            "strategy": plan.strategy, "world_size": plan.world_size, "group_size": plan.group_size,
            "data_parallel": plan.data_parallel, "sizes": list(pl_module.sizes),
            "ghosts": list(getattr(pl_module.net, "ghosts", None) or []) or None,
            "steps": len(train), "step_time_s": statistics.median(step_times) if step_times else math.nan,
            "wall_s": max(r["wall_s"] for r in ranks),
            "final_train_loss": statistics.fmean(last) if last else math.nan,
            "final_val_loss": val[-1][3] if val else None, "final_val_step": val[-1][0] if val else None,
            "energy": self.energy.summary() if self.energy is not None else None, "predicted": predicted,
            "per_rank": [{k: v for k, v in r.items() if k not in ("times", "train", "val")} for r in ranks],
            "train_curve": train, "val_curve": val,
        }


# -------------------------------------------------------------- tables and plots

def _exact(value: Optional[str]) -> Optional[Fraction]:
    return None if value is None else Fraction(value)


def result_row(result: dict, run: str = "", job: str = "") -> dict:
    """One strategy's run as a flat row (the CSV columns); the largest per-rank figure where ranks differ."""
    ranks, predicted = result["per_rank"], result.get("predicted") or {}
    energy = result.get("energy") or {}
    target = energy.get("energy_to_target") or {}
    sent = [_exact(r.get("sent_bytes")) for r in ranks]
    counted = predicted and None not in sent
    return {
        "job": job, "strategy": result["strategy"], "ranks": result["world_size"],
        "group_size": result["group_size"],
        "ghosts": ",".join(map(str, sorted(set(result["ghosts"])))) if result.get("ghosts") else "",
        "sizes": "x".join(map(str, result["sizes"])), "rows_per_step": ranks[0].get("rows"),
        "params_per_rank": max(r["params"] for r in ranks), "params_model": predicted.get("params"),
        "macs_per_step": max(r["flops"] // 2 for r in ranks) if all("flops" in r for r in ranks) else None,
        "macs_model": predicted.get("macs"),
        "sent_bytes_per_step": float(max(sent)) if counted else None,
        "sent_bytes_model": float(_exact(predicted["sent_bytes"])) if predicted else None,
        "sent_matches_model": all(b == _exact(predicted["sent_bytes"]) for b in sent) if counted else None,
        "other_sent_bytes_per_step": max(float(_exact(r.get("other_sent_bytes", "0"))) for r in ranks),
        "step_ms_median": 1e3 * result["step_time_s"],
        "state_bytes_per_rank": max(r.get("state_bytes", 0) for r in ranks),
        "rss_peak_bytes_per_rank": max(r["rss_peak"] for r in ranks),
        "cuda_peak_bytes_per_rank": max(r["cuda_peak"] for r in ranks) if "cuda_peak" in ranks[0] else None,
        "meter": energy.get("meter") or "off",
        "J_per_step_median": energy.get("J_per_step_median"), "total_J": energy.get("total_J"),
        "steps": result["steps"], "wall_s": result["wall_s"],
        "final_train_loss": result["final_train_loss"], "final_val_loss": result["final_val_loss"],
        "target_loss": target.get("target", result.get("config", {}).get("target_loss")),
        "target_J": target.get("energy_J"), "target_s": target.get("time_s"),
        "target_step": target.get("step"),
        "run": run,
    }


def _fmt(value: Any, kind: str = "g") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "MiB":
        return f"{value / 2**20:.1f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


COLUMNS = (  # header, CSV key, format
    ("strategy", "strategy", "s"), ("ghosts", "ghosts", "s"), ("ranks", "ranks", "s"),
    ("params/rank", "params_per_rank", "int"),
    ("MACs/step/rank", "macs_per_step", "int"), ("model MACs", "macs_model", "int"),
    ("sent B/step/rank", "sent_bytes_per_step", "int"), ("model B", "sent_bytes_model", "int"),
    ("step ms", "step_ms_median", "g"), ("state MiB/rank", "state_bytes_per_rank", "MiB"),
    ("peak RSS MiB/rank", "rss_peak_bytes_per_rank", "MiB"),
    ("peak CUDA MiB/rank", "cuda_peak_bytes_per_rank", "MiB"),
    ("J/step", "J_per_step_median", "g"), ("total J", "total_J", "g"),
    ("train loss", "final_train_loss", "g"), ("val loss", "final_val_loss", "g"),
    ("J to target", "target_J", "g"), ("s to target", "target_s", "g"),
    ("step at target", "target_step", "s"),
)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, with what each column means below it."""
    columns = [c for c in COLUMNS if c[1] != "cuda_peak_bytes_per_rank"
               or any(row[c[1]] is not None for row in rows)]
    if any(row["job"] for row in rows):
        columns.insert(0, ("job", "job", "s"))
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[key], kind) for _, key, kind in columns) + " |" for row in rows]
    meters = sorted({row["meter"] for row in rows})
    matches = [row["sent_matches_model"] for row in rows]
    if all(matches):
        check = "Counted bytes equal the model for every rank and strategy."
    elif None in matches:
        check = "Bytes were not counted for some runs (measure.count_step is null or past max_steps)."
    else:
        check = ("Counted bytes DIFFER from the model for: "
                 + ", ".join(row["strategy"] for row in rows if not row["sent_matches_model"]) + ".")
    target = next((row["target_loss"] for row in rows if row["target_loss"] is not None), None)
    estimate = (" — an ESTIMATE (CPU time × watts per core), not a measurement" if "estimate" in meters
                else "")
    notes = [
        "",
        f"Energy meter: {', '.join(meters)}{estimate}; J summed over all ranks; J/step: median step.",
        "MACs: multiply-adds of one training step, counted on each rank (LocalFlopCounterMode). sent B: "
        "bytes a rank hands to collectives in one step's forward + backward (CommCounter, ring convention). "
        f"model: lightning_phantom.cost. {check}",
        "step ms: median over steps of the slowest rank. state: parameters + gradients + optimizer state a "
        "rank holds. peak RSS: the whole process, sampled during training.",
        f"train loss: mean of the last 10 steps. val loss: last validation. target: val_loss <= {target}.",
    ]
    return "\n".join(lines + notes)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(results: dict[str, dict], path: Path, meter: str) -> None:
    """Loss against cumulative joules and against wall time, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_J, by_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, result in results.items():
        train, val = result["train_curve"], result["val_curve"]
        for ax, x in ((by_J, 2), (by_s, 1)):
            line, = ax.plot([r[x] for r in train], [r[3] for r in train], lw=0.8, alpha=0.7,
                            label=f"{label} train")
            if val:
                ax.plot([r[x] for r in val], [r[3] for r in val], "o-", color=line.get_color(), ms=4,
                        label=f"{label} val")
    estimate = ": CPU time × W/core, an estimate" if meter == "estimate" else ""
    for ax, xlabel in ((by_J, f"cumulative energy, J ({meter}{estimate})"),
                       (by_s, "wall time since training started, s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_J.legend(fontsize=7)
    fig.suptitle("Loss against energy and against time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(result: dict) -> str:
    ghosts = sorted(set(result.get("ghosts") or []))
    return result["strategy"] + (f" k={','.join(map(str, ghosts))}" if ghosts else "")


def write_outputs(results: dict[str, dict], out_dir: Path, stem: str, runs: dict[str, str],
                  jobs: Optional[dict[str, str]] = None) -> str:
    """``stem``.md/.csv/.png/.json in ``out_dir``; returns the Markdown table."""
    jobs = jobs or {}
    rows = [result_row(r, runs[label], jobs.get(label, "")) for label, r in results.items()]
    table = markdown_table(rows)
    (out_dir / f"{stem}.md").write_text(table + "\n")
    write_csv(rows, out_dir / f"{stem}.csv")
    plot(results, out_dir / f"{stem}.png", rows[0]["meter"])
    (out_dir / f"{stem}.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    return table


# -------------------------------------------------------------- running the strategies

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


def compare(cfg: DictConfig) -> str:
    """Run every strategy of ``cfg.compare.strategies`` (see the module docstring); returns the table."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    strategies = list(cfg.compare.strategies)
    if not strategies:
        raise ConfigError("compare.strategies is empty; list at least one of phantom, tp, ddp, single")
    planned = {}
    for s in strategies:  # every configuration is checked before the first run starts
        try:
            overrides = overrides_for(s, list(hc.overrides.task))
            composed = compose(config_name="config", overrides=overrides)
        except Exception as e:  # noqa: BLE001 - Hydra's own errors name the bad override
            raise ConfigError(f"compare, strategy={s}: {e}") from None
        planned[s] = (overrides, composed, check_config(composed))
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN and cfg.compare.reuse else None
    results, runs = {}, {}
    for s, (overrides, composed, plan) in planned.items():
        run_dir, key = out_dir / s, _config_key(composed)
        reused = _reusable(sweep_dir, s, key) if sweep_dir is not None else None
        if reused is not None:
            print(f"compare: {s}: same configuration as {reused}, reusing its result", flush=True)
            run_dir = reused
        else:
            print(f"compare: {s} on {plan.world_size} process(es): python -m lightning_phantom "
                  f"{' '.join(overrides)}", flush=True)
            start = time.perf_counter()
            rc = run_app_subprocess(overrides, run_dir, run_dir / "run.log", cfg.compare.timeout_s)
            if rc or not (run_dir / RESULT_FILE).exists():
                sys.stderr.write((run_dir / "run.log").read_text()[-6000:])
                raise RuntimeError(f"compare: the {s} run failed (exit code {rc}); see {run_dir / 'run.log'}")
            (run_dir / "config_key.txt").write_text(key + "\n")
            print(f"compare: {s} done in {time.perf_counter() - start:.1f} s", flush=True)
        result = json.loads((run_dir / RESULT_FILE).read_text())
        results[_label(result)], runs[_label(result)] = result, str(run_dir)
    table = write_outputs(results, out_dir, "compare", runs)
    print(f"{table}\n\n(compare.md, compare.csv, compare.png, compare.json in {out_dir})", flush=True)
    return table


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
                if run_dir in runs.values():
                    continue  # a run reused by several jobs appears once, with the job that ran it
                name = f"{label} [job {job_dir.name}]" if label in results else label
                results[name] = json.loads((Path(run_dir) / RESULT_FILE).read_text())
                runs[name], jobs[name] = run_dir, job
        if not results:
            print(f"compare: no results to gather in {sweep_dir}", file=sys.stderr)
            return
        table = write_outputs(results, sweep_dir, "sweep", runs, jobs)
        print(f"\nSweep, {len(results)} runs:\n{table}\n\n(sweep.md, sweep.csv, sweep.png, sweep.json in "
              f"{sweep_dir})", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    try:
        compare(cfg)
    except ConfigError as e:
        print(f"lightning-phantom.compare: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
