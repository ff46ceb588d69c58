"""What one NVIDIA GPU can show about phantom parallelism, in one command: JSON + PNG.

    python benchmarks/gpu.py --out gpu_results            # on a GPU machine (~5 min on an H100)
    python benchmarks/gpu.py --dry-run --out /tmp/gpu     # the same code paths on CPU, tiny sizes

Steps (``STEPS``, run in order; each returns a dict that goes into ``<out>/gpu.json``):

1. ``per_rank_compute`` — for p in {2, 4, 8} and n in {8192, 16384, 32768}, bf16, k = 32: one
   rank's local work of PP (``PhantomFFN`` with its collectives taken out: the local block,
   compress, decompress, forward and backward — the operator's own code, see ``local_only``)
   and of TP (the rank's Colwise/Rowwise shards of every Linear), run on the one GPU, timed
   with CUDA events and metered with NVML's energy counter. ``benchmarks/projection.py``'s α–β
   model then adds the network (NVLink within 8 GPUs) → projected seconds and joules per step
   for p GPUs, PP/TP. Then the same for one transformer block (``block_rows``: the app's GPT
   block, d in {4096, 8192}, head width 128, MLP 4d, ``--rows`` tokens as sequences of
   ``--seq``): PP is one block of a phantom stack (``PhantomTransformerEncoderLayer`` on the
   rank's d/p columns of the stream), TP the rank's shards of torchtitan's plan (q, k, v, fc1 of
   h/p heads and f/p neurons, out and fc2 of their inputs). ``<out>/gpu.png`` plots them.
2. ``energy_meter`` — ``EnergyMonitor(meter="nvml")`` over a real training run against NVML's
   own power readings (a thread sampling every 5 ms) integrated over the same window.
3. ``autocast_p1`` — ``PhantomFFN`` at p = 1 on CUDA under bf16 autocast against a float64 CPU
   reference: forward and gradients, relative errors.
4. ``nccl_world1`` — NCCL with a world of 1: ``PhantomStrategy`` trains a few steps on it.

Hook for more steps: a module ``gpu_cluster_checks`` next to this file (issue 16: NCCL training
with TORCH_DISTRIBUTED_DEBUG=DETAIL, the kill/hang scenario) that defines
``gpu_steps() -> list[(name, fn)]`` has those steps appended; each ``fn(ctx)`` gets the
``Context`` below and returns a JSON-able dict (``ctx.dry_run`` says to stay on CPU and tiny).

``--dry-run`` runs every step on CPU at tiny sizes with a wall clock instead of CUDA events and
no NVML (energies are None; the meter comparison uses EnergyMonitor's estimate meter against a
constant-power stand-in): it checks that the script runs, not any figure. tests/test_benchmarks.py
runs it.

``--budget-s`` (default 330: the whole script within 6 minutes on an H100/H200) bounds the run:
no step, and no case of ``per_rank_compute``, starts once it is spent; those left out are listed
in ``gpu.json`` (``stopped_early``). ``gpu.json`` is written after every step and every measured
row, and on SIGTERM/SIGINT (a job's time limit) with what was measured so far.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))


@dataclass
class Context:
    dry_run: bool
    device: torch.device
    out: Path
    widths: list[int]
    ps: list[int]
    ghosts: int
    rows: int
    layers: int
    nvml: Any = None  # pynvml, initialised, or None
    handle: Any = None
    results: dict = field(default_factory=dict)
    deadline: float = float("inf")  # time.perf_counter() past which nothing more starts
    partial: dict = field(default_factory=dict)  # what the running step has measured so far
    save: Callable[[], None] = lambda: None  # writes gpu.json with ``partial``
    seq: int = 2048  # tokens per sequence of the transformer block
    block_widths: list = field(default_factory=lambda: [4096, 8192])

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def energy_mJ(self) -> Optional[int]:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) if self.nvml else None

    def power_W(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0 if self.nvml else 100.0


# --------------------------------------------------------------- 1. per-rank compute
@contextlib.contextmanager
def local_only():
    """PhantomFFN shards run on one process as rank 0 of p: the collectives become no-ops.

    The operator's GEMMs are untouched (the timing is of its real code); the ghost all-gather
    leaves zeros where the other ranks' ghosts would be, the reduce-scatter and the
    first/last layers' all-reduces do nothing.
    """
    import lightning_phantom.nn.layers as layers
    import lightning_phantom.nn.norms as norms
    import lightning_phantom.nn.shard as shard
    import lightning_phantom.ops.operator as operator

    def gather(x, group, size):  # the other ranks' ghosts: zeros
        return x.new_zeros((size * x.shape[0], *x.shape[1:]))

    def scatter(x, group, size):
        return x.new_zeros((x.shape[0] // size, *x.shape[1:]))

    def wait(x, dtype=None):
        return x if dtype is None else x.to(dtype)

    saved = (operator.start_all_gather, operator.start_reduce_scatter, operator.wait, layers.copy_to_phantom,
             layers.reduce_from_phantom, shard._Sharded._check_group, norms.reduce_statistics)
    operator.start_all_gather, operator.start_reduce_scatter, operator.wait = gather, scatter, wait
    # The first/last layers' and the norms' all-reduces (a norm's statistics: this rank's partial sums).
    layers.copy_to_phantom = layers.reduce_from_phantom = norms.reduce_statistics = lambda x, group: x
    shard._Sharded._check_group = lambda self: None
    try:
        yield
    finally:
        (operator.start_all_gather, operator.start_reduce_scatter, operator.wait, layers.copy_to_phantom,
         layers.reduce_from_phantom, shard._Sharded._check_group, norms.reduce_statistics) = saved


def tp_rank_shards(sizes: list[int], p: int, **factory) -> nn.Sequential:
    """One rank's shards under parallelize_ffn's plan: Colwise (out/p) and Rowwise (in/p) in turn."""
    modules: list[nn.Module] = []
    for j, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if j:
            modules.append(nn.ReLU())
        colwise = j % 2 == 0
        modules.append(nn.Linear(n_in, n_out // p, **factory) if colwise else nn.Linear(n_in // p, n_out, **factory))
    return nn.Sequential(*modules)


def _measure(ctx: Context, model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    """Seconds (CUDA events, or a wall clock on CPU) and joules (NVML) of one forward + backward."""
    def step():
        model(x).float().square().mean().backward()

    for _ in range(2):
        step()
    ctx.sync()
    if ctx.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0, e0 = time.perf_counter(), ctx.energy_mJ()
    for _ in range(repeats):
        step()
    if ctx.device.type == "cuda":
        end.record()
    ctx.sync()
    wall = time.perf_counter() - t0
    seconds = start.elapsed_time(end) / 1e3 / repeats if ctx.device.type == "cuda" else wall / repeats
    e1 = ctx.energy_mJ()
    joules = (e1 - e0) / 1e3 / repeats if e0 is not None else None
    return {"seconds": seconds, "joules": joules, "repeats": repeats, "window_s": wall}


def _projection_model():
    import projection

    gpu = projection.GPUS["h100"]
    args = SimpleNamespace(mfu=0.5, alpha_intra_us=5.0, alpha_inter_us=10.0, overlap=True, busy_power=1.0,
                           comm_power=0.4, bytes_per_param=2)
    return projection.Model(args, gpu, 1.0), gpu, args


def project(row: dict, measured: dict, costs: dict, p: int) -> dict:
    """``row`` with each side's measured compute + the optimizer and the network of the α–β model
    (``projection.Model.step`` of a cost with ``per_layer``, ``scheme``, ``rows`` and ``params``)."""
    model, gpu, args = _projection_model()
    for side, cost in costs.items():
        analytic = model.step(cost, p)
        optimizer_s = analytic["compute"] - sum(
            2 * (layer.macs_fwd + layer.macs_bwd) / model.rate for layer in cost.per_layer)
        seconds = measured[side]["seconds"] + optimizer_s + analytic["exposed"]
        joules = None
        if measured[side]["joules"] is not None:
            # p ranks' measured compute + the optimizer and exposed network at the model's powers
            joules = p * (measured[side]["joules"] + gpu["tdp_w"] * (
                args.busy_power * optimizer_s + args.comm_power * analytic["exposed"]))
        row[side] = {"measured": measured[side], "optimizer_s": optimizer_s,
                     "exposed_comm_s": analytic["exposed"], "comm_s": analytic["comm"],
                     "projected_s": seconds, "projected_J": joules, "flops": cost.flops}
    row["time_ratio"] = row["PP"]["projected_s"] / row["TP"]["projected_s"]
    row["compute_ratio"] = measured["PP"]["seconds"] / measured["TP"]["seconds"]
    row["energy_ratio"] = row["PP"]["projected_J"] / row["TP"]["projected_J"] if row["PP"]["projected_J"] else None
    row["flop_ratio"] = costs["PP"].flops / costs["TP"].flops
    print(f"  {row.get('kind', 'ffn')} p={p} n={row['width']} k={row['ghosts']}: compute PP/TP "
          f"{row['compute_ratio']:.3f} (FLOPs {row['flop_ratio']:.3f}), projected time {row['time_ratio']:.3f}"
          + (f", energy {row['energy_ratio']:.3f}" if row["energy_ratio"] else ""), flush=True)
    return row


def per_rank_compute(ctx: Context) -> dict:
    from lightning_phantom.cost.model import phantom_cost, tp_cost
    from lightning_phantom.nn.layers import PhantomFFN

    dtype = torch.bfloat16
    rows, blocks, left_out = [], [], []
    ctx.partial.update(rows=rows, block_rows=blocks, stopped_early=left_out)
    for p in ctx.ps:
        for n in ctx.widths:
            if ctx.time_left() <= 0:
                left_out.append(f"ffn p={p} n={n}")
                continue
            k = min(ctx.ghosts, n // p)
            sizes = [n] * (ctx.layers + 3)  # d_in = d_out = n: every layer is wide
            x = torch.randn(ctx.rows, n, device=ctx.device, dtype=dtype)
            measured = {}
            with local_only():
                pp = PhantomFFN(sizes, k, shard=(0, p), device=ctx.device, dtype=dtype)
                measured["PP"] = _measure(ctx, pp, x, ctx.results.get("repeats", 3 if ctx.dry_run else 20))
            del pp
            tp = tp_rank_shards(sizes, p, device=ctx.device, dtype=dtype)
            measured["TP"] = _measure(ctx, tp, x, 3 if ctx.dry_run else 20)
            del tp
            costs = {"PP": phantom_cost(sizes, p, k, ctx.rows, 2), "TP": tp_cost(sizes, p, ctx.rows, 2)}
            rows.append(project({"p": p, "width": n, "ghosts": k, "rows": ctx.rows, "sizes": sizes}, measured, costs,
                                p))
            ctx.save()
    for p in ctx.ps:
        for d in ctx.block_widths:
            if ctx.time_left() <= 0:
                left_out.append(f"block p={p} d={d}")
                continue
            blocks.append(block_row(ctx, p, d))
            ctx.save()
    model, gpu, args = _projection_model()
    return {"rows": rows, "block_rows": blocks, "stopped_early": left_out,
            "model": {"gpu": gpu["name"], **vars(args)}}


def tp_rank_block(d: int, heads: int, p: int, **factory) -> nn.Module:
    """One rank's shards of the app's GPT block under torchtitan's plan (``parallelize_block``): q, k, v and
    fc1 of its h/p heads and f/p neurons, out and fc2 of their inputs; norms whole."""
    from lightning_phantom.app.gpt import Block

    block = Block(d, heads, 4).to(**factory)
    attn, mlp = block.attn, block.mlp
    attn.q, attn.k, attn.v = (nn.Linear(d, d // p, **factory) for _ in range(3))
    attn.out = nn.Linear(d // p, d, **factory)
    mlp.fc1, mlp.fc2 = nn.Linear(d, 4 * d // p, **factory), nn.Linear(4 * d // p, d, **factory)
    return block


def block_row(ctx: Context, p: int, d: int) -> dict:
    """PP against TP for one transformer block on rank 0 of p (see the module docstring), measured and projected."""
    from dataclasses import replace

    from lightning_phantom.cost.transformer import stack_cost
    from lightning_phantom.nn.transformer import PhantomTransformerEncoderLayer

    dtype, heads = torch.bfloat16, max(p, d // 128)
    seq = min(ctx.seq, ctx.rows)
    batch, k = ctx.rows // seq, min(ctx.ghosts, d // p)
    factory = {"device": ctx.device, "dtype": dtype}
    repeats = 3 if ctx.dry_run else 20
    measured = {}
    with local_only():
        pp = PhantomTransformerEncoderLayer(d, heads, 4 * d, 0.0, "gelu", batch_first=True, norm_first=True,
                                            ghosts=k, causal=True, shard=(0, p), **factory)
        x = torch.randn(batch, seq, d // p, requires_grad=True, **factory)
        measured["PP"] = _measure(ctx, pp, x, repeats)
    del pp
    x = torch.randn(batch, seq, d, requires_grad=True, **factory)
    measured["TP"] = _measure(ctx, tp_rank_block(d, heads, p, **factory), x, repeats)
    costs = {}
    for side, scheme, kinds in (("PP", "phantom", {"qkv": "phantom", "out": "phantom", "fc1": "phantom",
                                                     "fc2": "phantom"}),
                                ("TP", "tensor", {"qkv": "colwise", "fc1": "colwise"})):
        block = stack_cost(scheme, d, heads, 4 * d, 1, p, batch, seq, k, 2, norm_first=True,
                           input_requires_grad=True).blocks[0]
        # The projection's overlap: PP's local blocks hide the ghost exchange, TP's weight gradients its
        # backward all-reduce.
        parts = [replace(x, kind=kinds.get(x.kind, x.kind)) for x in block.parts]
        costs[side] = SimpleNamespace(per_layer=parts, scheme="phantom" if side == "PP" else "tp", rows=batch * seq,
                                      params=block.params, flops=block.flops)
    return project({"kind": "block", "p": p, "width": d, "ghosts": k, "heads": heads, "rows": batch * seq,
                    "seq": seq}, measured, costs, p)


def plot(rows: list[dict], path: Path, block_rows: Optional[list] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for p in sorted({r["p"] for r in rows}):
        mine = [r for r in rows if r["p"] == p]
        widths = [r["width"] for r in mine]
        axes[0].plot(widths, [r["compute_ratio"] for r in mine], "o-", label=f"p={p} measured")
        axes[0].plot(widths, [r["flop_ratio"] for r in mine], "x:", label=f"p={p} FLOPs")
        axes[1].plot(widths, [r["time_ratio"] for r in mine], "o-", label=f"p={p}")
        if all(r["energy_ratio"] for r in mine):
            axes[2].plot(widths, [r["energy_ratio"] for r in mine], "o-", label=f"p={p}")
    for p in sorted({r["p"] for r in block_rows or []}):
        mine = [r for r in block_rows if r["p"] == p]
        widths = [r["width"] for r in mine]
        axes[0].plot(widths, [r["compute_ratio"] for r in mine], "s--", label=f"block p={p} measured")
        axes[1].plot(widths, [r["time_ratio"] for r in mine], "s--", label=f"block p={p}")
        if all(r["energy_ratio"] for r in mine):
            axes[2].plot(widths, [r["energy_ratio"] for r in mine], "s--", label=f"block p={p}")
    for ax, title in zip(axes, ["per-rank compute PP/TP", "projected time per step PP/TP",
                                "projected energy per step PP/TP"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width n (FFN), d (block)")
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------- 2. energy meter
class PowerSampler:
    """NVML power readings every ``period_s`` in a thread, integrated (trapezoid) over a window."""

    def __init__(self, ctx: Context, period_s: float = 0.005) -> None:
        self.ctx, self.period_s, self.samples = ctx, period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.ctx.power_W()))
            time.sleep(self.period_s)

    def start(self) -> None:
        self._thread.start()

    def joules(self, start_s: float, end_s: float) -> float:
        self._stop.set()
        self._thread.join()
        inside = [(t, w) for t, w in self.samples if start_s <= t <= end_s]
        return sum(0.5 * (w0 + w1) * (t1 - t0) for (t0, w0), (t1, w1) in zip(inside, inside[1:]))


def energy_meter(ctx: Context) -> dict:
    import lightning.pytorch as pl

    from lightning_phantom.energy import EnergyMonitor

    width, steps = (64, 12) if ctx.dry_run else (8192, 300)
    kind = "estimate" if ctx.dry_run else "nvml"
    window = {}

    class Window(pl.Callback):  # listed after the monitor: its reads bracket the same steps
        def on_train_start(self, *a):
            ctx.sync()
            window["start"] = time.perf_counter()

        def on_train_end(self, *a):
            ctx.sync()
            window["end"] = time.perf_counter()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).float().square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    def fit(callbacks):
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 64, width)),
                                           batch_size=64)
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(accelerator="cpu" if ctx.device.type == "cpu" else "gpu", devices=1,
                                 max_steps=steps, precision="32-true" if ctx.dry_run else "bf16-mixed",
                                 callbacks=callbacks + [Window()], logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
            trainer.fit(Module(), data)
        return (window["end"] - window["start"]) / steps

    without_s = fit([])  # also the monitor's overhead: the same run without it, before and after
    monitor = EnergyMonitor(meter=kind, prog_bar=False)
    sampler = PowerSampler(ctx)
    sampler.start()
    with_s = fit([monitor])
    monitored = dict(window)
    without_s = min(without_s, fit([]))
    sampled_J = sampler.joules(monitored["start"], monitored["end"])
    meter_J = monitor.summary()["total_J"]
    return {"meter": kind, "steps": steps, "window_s": monitored["end"] - monitored["start"], "monitor_J": meter_J,
            "sampled_power_J": sampled_J, "samples": len(sampler.samples),
            "step_s_with_monitor": with_s, "step_s_without": without_s, "monitor_overhead": with_s / without_s - 1,
            "relative_difference": meter_J / sampled_J - 1 if sampled_J else None,
            "note": "dry run: estimate meter against a constant 100 W stand-in, not a comparison" if ctx.dry_run
            else "EnergyMonitor nvml meter (counter) vs NVML power samples every 5 ms, same window"}


# --------------------------------------------------------------- 3. bf16 autocast at p = 1
def autocast_p1(ctx: Context) -> dict:
    from lightning_phantom.nn.layers import PhantomFFN

    sizes = [32, 64, 64, 64, 8] if ctx.dry_run else [1024, 4096, 4096, 4096, 1024]
    torch.manual_seed(0)
    reference = PhantomFFN(sizes, 16).double()
    model = PhantomFFN(sizes, 16).to(ctx.device)
    model.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    x = torch.randn(64, sizes[0], dtype=torch.float64)
    want = reference(x)
    want.square().mean().backward()
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        got = model(x.float().to(ctx.device))
    got.float().square().mean().backward()

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()

    grads = {name: rel(p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), reference.parameters())}
    out = {"sizes": sizes, "output_dtype": str(got.dtype), "output_rel_error": rel(got, want),
           "grad_rel_error_max": max(grads.values()), "grad_rel_error": grads,
           # bf16 keeps 8 significant bits (2^-8 = 0.4%); a gradient passes through up to 2(L-1)
           # bf16 GEMMs, and a bias gradient sums B rounded terms: 10% flags a wrong path, not rounding.
           "tolerance": 0.1}
    out["ok"] = out["output_rel_error"] < out["tolerance"] and out["grad_rel_error_max"] < out["tolerance"]
    return out


# --------------------------------------------------------------- 4. NCCL, world of 1
def nccl_world1(ctx: Context) -> dict:
    import lightning.pytorch as pl
    import torch.distributed as dist

    from lightning_phantom.strategy import PhantomStrategy

    backend = "gloo" if ctx.dry_run else "nccl"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    steps, losses = 4, []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, batch_idx):
            loss = self.net(batch[0]).square().mean()
            losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 8, 16)), batch_size=8)
    strategy = PhantomStrategy(process_group_backend=backend)
    trainer = pl.Trainer(accelerator="cpu" if ctx.dry_run else "gpu", devices=1, strategy=strategy,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Module(), data)
    backend_used = dist.get_backend() if dist.is_initialized() else backend
    t = torch.ones(3, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(t)
        dist.destroy_process_group()
    return {"backend": backend_used, "steps": trainer.global_step, "losses": losses,
            "all_reduce_ok": bool(torch.equal(t.cpu(), torch.ones(3))), "converted": strategy.converted_modules}


STEPS: list[tuple[str, Callable[[Context], dict]]] = [
    ("per_rank_compute", per_rank_compute),
    ("energy_meter", energy_meter),
    ("autocast_p1", autocast_p1),
    ("nccl_world1", nccl_world1),
]


def all_steps() -> list[tuple[str, Callable[[Context], dict]]]:
    """``STEPS`` and those of ``gpu_cluster_checks.gpu_steps()`` where that module exists."""
    try:
        extra = importlib.import_module("gpu_cluster_checks")
    except ImportError:
        return list(STEPS)
    return list(STEPS) + list(getattr(extra, "gpu_steps", lambda: [])())


def _open_nvml(device: torch.device):
    try:
        from lightning_phantom.energy.meters import load_nvml, nvml_device_handle

        nvml = load_nvml()
        return nvml, nvml_device_handle(nvml, device.index or 0, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except Exception as err:  # noqa: BLE001 - energies become None, said in the JSON
        print(f"NVML unavailable ({err}); energies will be None", file=sys.stderr)
        return None, None


class Stopped(Exception):
    """SIGTERM/SIGINT: the step running stops, what it measured is written."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def _run_steps(ctx: Context, report: dict, only: Optional[list], write: Callable) -> tuple[list, Optional[str]]:
    """Every step (of ``only``) in order, each into ``report``; none starts once the budget is spent or a
    signal came. Returns the failed steps and the signal's name, if one stopped the run."""
    failed, stopped = [], None
    for name, fn in all_steps():
        if only and name not in only:
            continue
        if stopped or ctx.time_left() <= 0:
            report["stopped_early"].append(name)
            continue
        try:
            stopped = _run_step(ctx, report, name, fn, write, failed)
        except Stopped as signame:  # between steps: the next ones are left out
            stopped = str(signame)
    return failed, stopped


def _run_step(ctx: Context, report: dict, name: str, fn: Callable, write: Callable, failed: list) -> Optional[str]:
    """One step into ``report["steps"][name]`` (and ``failed``), gpu.json written after it; the signal's name
    if one stopped it."""
    stopped = None
    print(f"[{name}]", flush=True)
    start = time.perf_counter()
    ctx.partial, ctx.save = {}, (lambda name=name: write(name))
    try:
        report["steps"][name] = {"ok": True, **fn(ctx)}
        report["stopped_early"] += [f"{name}: {case}" for case in report["steps"][name].get("stopped_early", [])]
    except Stopped as signame:
        stopped = str(signame)
        report["steps"][name] = {"ok": False, "error": f"stopped by {stopped}", **ctx.partial}
        failed.append(name)
    except Exception:  # noqa: BLE001 - one broken step must not hide the others' figures
        report["steps"][name] = {"ok": False, "error": traceback.format_exc(), **ctx.partial}
        failed.append(name)
        print(report["steps"][name]["error"], file=sys.stderr)
    report["steps"][name]["seconds"] = time.perf_counter() - start
    write()  # after every step: a crash keeps what was measured
    return stopped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_results", help="directory for gpu.json and gpu.png")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no NVML: checks the code paths")
    parser.add_argument("--widths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--p", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--ghosts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8192, help="tokens per step per rank (default 8192)")
    parser.add_argument("--layers", type=int, default=4, help="hidden n -> n layers (default 4)")
    parser.add_argument("--block-widths", type=int, nargs="+", default=[4096, 8192],
                        help="transformer block widths d (head width 128, MLP 4d; default 4096 8192)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence in the block (default 2048)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds after which no step or case starts (default 330; see the module docstring)")
    parser.add_argument("--steps", nargs="+", help="run only these steps (names from STEPS)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        args.widths, args.rows, args.ghosts, args.block_widths, args.seq = [64, 128], 16, 4, [32], 8
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on an NVIDIA GPU, or pass --dry-run")
        device = torch.device("cuda", torch.cuda.current_device())
    for p in args.p:
        for n in args.widths + args.block_widths:
            if n % p:
                parser.error(f"width {n} is not divisible by p = {p}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nvml, handle = (None, None) if args.dry_run else _open_nvml(device)
    ctx = Context(args.dry_run, device, out, args.widths, args.p, args.ghosts, args.rows, args.layers, nvml, handle,
                  deadline=time.perf_counter() + args.budget_s, seq=args.seq, block_widths=args.block_widths)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "dry_run": args.dry_run, "budget_s": args.budget_s, "steps": {},
                    "stopped_early": []}

    def write(running: Optional[str] = None) -> None:
        """gpu.json now; ``running``: the step under way, with what it has measured."""
        steps = dict(report["steps"])
        if running is not None:
            steps[running] = {"ok": None, "running": True, **ctx.partial}
        with open(out / "gpu.json", "w") as f:
            json.dump({**report, "steps": steps}, f, indent=1, default=str)

    handlers = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed, stopped = _run_steps(ctx, report, args.steps, write)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    write()  # with the steps left out
    compute = report["steps"].get("per_rank_compute", {})
    if compute.get("rows"):
        plot(compute["rows"], out / "gpu.png", compute.get("block_rows"))
    print(f"wrote {out / 'gpu.json'}" + (f" and {out / 'gpu.png'}" if compute.get("rows") else ""))
    if report["stopped_early"]:
        print(f"left out ({'stopped by ' + stopped if stopped else f'time budget of {args.budget_s:g} s spent'}): "
              f"{report['stopped_early']}", file=sys.stderr)
    if failed:
        print(f"FAILED steps: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
