"""The comparison's outputs: one flat row per run, the Markdown table, CSV, JSON and the plots.

``write_outputs`` turns ``{label: result.json contents}`` into ``<stem>.md``, ``.csv``, ``.png`` and
``.json``; ``compare`` writes ``compare.*`` per job and ``GatherSweep`` ``sweep.*`` per sweep.
"""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional


def _exact(value: Optional[str]) -> Optional[Fraction]:
    return None if value is None else Fraction(value)


def model_params(result: dict) -> int:
    """Parameters of the whole model, each counted once (not once per rank or per replica).

    TP, DDP and one device train the dense model (TP shards it, DDP replicates it). A phantom
    group's ranks hold distinct shards (blocks and ghost maps), and each a copy of the rest
    (the output bias; a GPT's embeddings, final norm and head): the shards summed over one
    group, the copies once.
    """
    if result["strategy"] == "phantom":
        ranks, replicas = result["per_rank"], result.get("data_parallel", 1)
        return sum(r["params_sharded"] for r in ranks) // replicas + ranks[0]["params_replicated"]
    if result.get("params_model") is not None:  # a model that counts its own (the GPT)
        return result["params_model"]
    sizes = result["sizes"]
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def result_row(result: dict, run: str = "", job: str = "") -> dict:
    """One strategy's run as a flat row (the CSV columns); the largest per-rank figure where ranks differ."""
    ranks, predicted = result["per_rank"], result.get("predicted") or {}
    energy = result.get("energy") or {}
    target = energy.get("energy_to_target") or {}
    sent = [_exact(r.get("sent_bytes")) for r in ranks]
    counted = predicted and None not in sent
    return {
        "job": job, "name": result.get("name", ""), "strategy": result["strategy"],
        "ranks": result["world_size"],
        "group_size": result["group_size"],
        "ghosts": ",".join(map(str, sorted(set(result["ghosts"])))) if result.get("ghosts") else "",
        "sizes": result.get("model_name") or "x".join(map(str, result["sizes"])),
        "rows_per_step": ranks[0].get("rows"),
        "params_per_rank": max(r["params"] for r in ranks), "params_per_rank_model": predicted.get("params"),
        "params_model": model_params(result),
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
        "final_val_acc": (result.get("val_acc_curve") or [[None, None]])[-1][1],
        "final_val_bpc": result.get("final_val_bpc"),
        "target_rank_s": (target["time_s"] * result["world_size"] if target.get("time_s") is not None
                          else None),
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
    ("model params", "params_model", "int"), ("params/rank", "params_per_rank", "int"),
    ("MACs/step/rank", "macs_per_step", "int"), ("model MACs", "macs_model", "int"),
    ("sent B/step/rank", "sent_bytes_per_step", "int"), ("model B", "sent_bytes_model", "int"),
    ("step ms", "step_ms_median", "g"), ("state MiB/rank", "state_bytes_per_rank", "MiB"),
    ("peak RSS MiB/rank", "rss_peak_bytes_per_rank", "MiB"),
    ("peak CUDA MiB/rank", "cuda_peak_bytes_per_rank", "MiB"),
    ("J/step", "J_per_step_median", "g"), ("total J", "total_J", "g"),
    ("train loss", "final_train_loss", "g"), ("val loss", "final_val_loss", "g"),
    ("val acc", "final_val_acc", "g"), ("val bpc", "final_val_bpc", "g"),
    ("J to target", "target_J", "g"), ("s to target", "target_s", "g"),
    ("rank·s to target", "target_rank_s", "g"), ("step at target", "target_step", "s"),
)
OPTIONAL = ("cuda_peak_bytes_per_rank", "final_val_acc", "final_val_bpc")  # columns shown only where some run has them


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, with what each column means below it."""
    columns = [c for c in COLUMNS if c[1] not in OPTIONAL or any(row[c[1]] is not None for row in rows)]
    if any(row["job"] for row in rows):
        columns.insert(0, ("job", "job", "s"))
    if any(row.get("name") for row in rows):  # compare.runs: each run by its name
        columns.insert(0, ("run", "name", "s"))
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
    if any(row["final_val_bpc"] is not None for row in rows):
        notes.append("Language model: val loss in nats per character (byte), val bpc = val loss / ln 2 in bits.")
    return "\n".join(lines + notes)


TERMINAL = (  # header, CSV key, format: the headline columns, to fit a 100-column terminal with
    # room for the run's name; time to target, accuracy and the rest are in the .md/.csv/.json
    ("ranks", "ranks", "s"), ("params", "params_model", "si"), ("MACs", "macs_per_step", "si"),
    ("sent B", "sent_bytes_per_step", "si"), ("ms", "step_ms_median", "g"),
    ("J", "J_per_step_median", "g"), ("val loss", "final_val_loss", "g"), ("J to target", "target_J", "g"),
)
TERMINAL_WIDTH = 100


def _si(value: Any) -> str:
    """3 significant digits with k/M/G/T, for the terminal: 1050624 -> 1.05M."""
    if value is None or value == "":
        return "–"
    value = float(value)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def terminal_table(results: dict[str, dict]) -> str:
    """The headline columns as aligned text no wider than ``TERMINAL_WIDTH`` (all columns: the .md)."""
    rows = {label: result_row(result) for label, result in results.items()}
    columns = [c for c in TERMINAL if c[1] not in OPTIONAL or any(r[c[1]] is not None for r in rows.values())]
    header = ["run"] + [c[0] for c in columns]
    body = []
    for label, row in rows.items():
        body.append([label] + [_si(row[key]) if kind == "si" else _fmt(row[key], kind)
                               for _, key, kind in columns])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    widths[0] = min(widths[0], TERMINAL_WIDTH - sum(widths[1:]) - 2 * (len(widths) - 1))

    def line(cells: list[str]) -> str:
        first = cells[0] if len(cells[0]) <= widths[0] else cells[0][:widths[0] - 1] + "…"
        return "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    meter = result_row(next(iter(results.values())))["meter"]
    target = next((r["target_loss"] for r in map(result_row, results.values()) if r["target_loss"] is not None),
                  None)
    notes = ["MACs, sent B: per rank and step; ms: median step; J: per step, all ranks",
             f"J: meter {meter}" + (" (an ESTIMATE)" if meter == "estimate" else "") + f"; target: val_loss <= {target}"]
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body] + notes)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _loss_name(result: dict) -> str:
    if result.get("loss_name"):  # a model that names its loss (the GPT: nats per character)
        return result["loss_name"]
    task = (result.get("config") or {}).get("model", {}).get("task", "regression")
    return "MSE" if task == "regression" else "cross-entropy"


def _zoom(ax, values: list[float], log_ok: bool = True) -> None:
    """y limits around ``values`` (where the curves differ), with labelled ticks inside them."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return
    low, high = min(values) * 0.9, max(values) * 1.1
    if log_ok and high / low > 10:  # several decades: log scale, ticks at 1, 2 and 5 of each
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_ylim(low, high)


def energy_label(what: str, meter: str) -> str:
    """An axis label for joules; with the CPU meter it says, once, that they are an estimate."""
    return f"{what} (an ESTIMATE: CPU time × W/core)" if meter == "estimate" else f"{what} ({meter})"


def _clipped(ax, curves: list[list[float]], steps: list[list[int]], name: str) -> Optional[str]:
    """A note naming the train losses off the y range (early training, typically), or None."""
    low, high = ax.get_ylim()
    off = [(step, v) for curve, at in zip(curves, steps) for step, v in zip(at, curve)
           if not low <= v <= high]
    if not off:
        return None
    return (f"clipped: train {name} outside the y range until step {max(s for s, _ in off)} (up to "
            f"{max(v for _, v in off):.3g}); the range is the validations'")


def plot(results: dict[str, dict], path: Path, meter: str):
    """Val loss (points) and train loss (thin lines) against cumulative joules and wall time, with
    the target; the y range is that of the validations and the target, where the runs differ, and
    the title says when it clips the early training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_J, by_s) = plt.subplots(1, 2, figsize=(12, 4.8))
    shown, target, name = [], None, "loss"
    for label, result in results.items():
        train, val = result["train_curve"], result["val_curve"]
        name = _loss_name(result)
        target = target if target is not None else (result.get("config") or {}).get("target_loss")
        for ax, x in ((by_J, 2), (by_s, 1)):
            line, = ax.plot([r[x] for r in train], [r[3] for r in train], lw=0.7, alpha=0.45,
                            label=f"{run_legend(label, result)} train")
            if val:
                ax.plot([r[x] for r in val], [r[3] for r in val], "o-", color=line.get_color(), ms=4, lw=1.5,
                        label=f"{run_legend(label, result)} val")
        shown += [r[3] for r in val] + [r[3] for r in train[len(train) * 3 // 4:]]  # and the last quarter
    for ax, xlabel in ((by_J, energy_label("cumulative energy, J", meter)),
                       (by_s, "wall time since training started, s")):
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=1, label=f"target val {name} = {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val {name} (train: thin lines)")
        _zoom(ax, shown + ([target] if target is not None else []))
        ax.grid(alpha=0.3, which="both")
    by_J.legend(fontsize=7)
    trains = [r["train_curve"] for r in results.values()]
    note = _clipped(by_J, [[r[3] for r in t] for t in trains], [[r[0] for r in t] for t in trains], name)
    fig.suptitle(f"Validation {name} against energy and against time; dashed: the target"
                 + (f"\n{note}" if note else ""), fontsize=10 if note else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def run_legend(label: str, result: dict) -> str:
    """A run as the plots name it: its label, ranks and the parameters of the whole model (where known)."""
    if "world_size" not in result or "sizes" not in result:
        return label
    return f"{label} ({result['world_size']} ranks, {_si(model_params(result))} params)"


def plot_to_target(results: dict[str, dict], path: Path, meter: str):
    """Val loss against cumulative joules and against rank-seconds (wall time × ranks), each run
    labelled with its ranks and model size, the target dashed and where each run first reached it
    starred; for classification a third panel, val accuracy against joules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = any(r.get("val_acc_curve") for r in results.values())
    fig, axes = plt.subplots(1, 3 if accuracy else 2, figsize=(15 if accuracy else 11, 4.6))
    name, target = "loss", None
    for i, (label, result) in enumerate(results.items()):
        val, ranks = result["val_curve"], result["world_size"]
        name = _loss_name(result)
        target = target if target is not None else (result.get("config") or {}).get("target_loss")
        hit = ((result.get("energy") or {}).get("energy_to_target")) or {}
        for ax, xs in ((axes[0], [r[2] for r in val]), (axes[1], [r[1] * ranks for r in val])):
            ax.plot(xs, [r[3] for r in val], "o-", ms=3, color=f"C{i}", label=run_legend(label, result))
        if hit.get("energy_J") is not None:
            axes[0].plot(hit["energy_J"], hit["reached_value"], "*", ms=14, color=f"C{i}", mec="black")
            axes[1].plot(hit["time_s"] * ranks, hit["reached_value"], "*", ms=14, color=f"C{i}", mec="black")
        if accuracy and result.get("val_acc_curve"):
            joules = {r[0]: r[2] for r in val}  # global step -> cumulative J at that validation
            points = [(joules[step], acc) for step, acc in result["val_acc_curve"] if step in joules]
            axes[2].plot(*zip(*points), "o-", ms=3, color=f"C{i}", label=run_legend(label, result))
    energy = energy_label("cumulative energy, J", meter)
    for ax, xlabel in zip(axes, (energy, "rank-seconds (wall time × ranks)", energy)):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:2]:
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=1, label=f"target val {name} = {target:g}")
        ax.set_ylabel(f"val {name}")
        _zoom(ax, [r[3] for res in results.values() for r in res["val_curve"]] + ([target] if target else []))
    if accuracy:
        axes[2].set_ylabel("val accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Validation {name} against energy and rank-seconds; dashed: the target, ★: first reached")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


SWEEP_PANELS = (  # CSV key, y label, joules (labelled by meter), log scale
    ("J_per_step_median", "J per step", True, False),
    # TP sends ~n/(p·k) times what phantom does: on a linear axis phantom's bytes sit on its zero line.
    ("sent_bytes_per_step", "bytes sent per step and rank (log)", False, True),
    ("step_ms_median", "step time, ms (median)", False, False), ("target_J", "J to target", True, False),
)


def plot_against_ghosts(results: dict[str, dict], path: Path):
    """A sweep's phantom runs against their number of ghosts, one panel per figure, each TP run a
    horizontal line; the figure, or None (and no file) where fewer than two phantom runs have one
    ghosts value. Joules say which meter, and that the CPU one's are an estimate."""
    rows = list(map(result_row, results.values()))
    phantom = [(row, int(row["ghosts"])) for row in rows
               if row["strategy"] == "phantom" and row["ghosts"].isdigit()]
    if len({k for _, k in phantom}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = [result_row(r) for r in results.values() if r["strategy"] == "tp"]
    phantom.sort(key=lambda item: item[1])
    meter = ", ".join(sorted({row["meter"] for row in rows}))
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(4 * len(SWEEP_PANELS), 3.8))
    for ax, (key, ylabel, joules, log) in zip(axes, SWEEP_PANELS):
        points = [(k, row[key]) for row, k in phantom if row[key] is not None]
        if points:
            ax.plot(*zip(*points), "o-", label="phantom")
        elif all(row[key] is None for row in tp):  # J to target where no run reached it
            ax.text(0.5, 0.5, "no run reached\nthe target", transform=ax.transAxes, ha="center", va="center")
        for i, row in enumerate(tp):
            if row[key] is not None:
                ax.axhline(row[key], color=f"C{i + 1}", ls="--", label="tp" + (f" ({row['sizes']})" if len(tp) > 1
                                                                               else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({k for _, k in phantom}), [str(k) for k in sorted({k for _, k in phantom})])
        ax.set_xlabel("ghosts per rank and layer")
        ax.set_ylabel(energy_label(ylabel, meter) if joules else ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Phantom parallelism against the number of ghosts; dashed: tensor parallelism")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def run_label(result: dict) -> str:
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
    plot_to_target(results, out_dir / f"{stem}_target.png", rows[0]["meter"])
    (out_dir / f"{stem}.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    return table
