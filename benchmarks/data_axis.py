"""Phantom × data parallelism against Lightning's FSDP2 × TP on 4 ranks (issue 15).

    python benchmarks/data_axis.py                      # n = 1024, 2 hidden layers, batch 64, 4 steps
    python benchmarks/data_axis.py --width 2048 --steps 6 --json
    python benchmarks/data_axis.py --quick              # n = 128, 2 steps: the test's run

data(2) × model(2) on 4 CPU ranks (gloo), one FFN ``[d_in, n, n, ..., n, d_out]``, ReLU,
MSE, fused Adam, float32, ``--batch`` rows per step split over the 2 replicas. Sides:

* **TP** — ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)``:
  ``parallelize_ffn`` on the "tensor_parallel" mesh dim, then ``fully_shard`` on the
  "data_parallel" dim for each Linear and the FFN (as Lightning's docs compose FSDP2 and TP);
* **PP ddp / PP fsdp** — ``PhantomStrategy(phantom_parallel_size=2, ghosts=k,
  data_parallel="ddp" | "fsdp")`` converting the same dense FFN.

Blocks alternate TP, PP ddp, TP, PP fsdp, TP; a PP step time is compared with the mean of
the TP blocks around it, so that drifting load from other processes cancels. A block is
``--warmup`` + ``--steps`` timed steps (the slowest rank's, median) and one untimed step in
``CommCounter``, whose bytes are split by process group into the model axis (phantom or
tensor-parallel group) and the data axis, and set against the cost model:
``phantom_cost`` / ``tp_cost`` for the model axis, ``data_axis_cost(params, 2, mode)`` for
the data axis (TP's data axis is FSDP2: mode "fsdp"). Memory per rank is the bytes of
parameters, gradients and optimizer state this rank holds after a step (DTensors by their
local part), against ``data_axis_cost(...).state_bytes`` plus the gradients the model
predicts (``state_bytes`` already counts them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overheads import join_process_group  # noqa: E402
from pp_vs_tp import _dense_ffn, _loader, make_optimizer, state_bytes  # noqa: E402

from lightning_phantom.cost.counting import CommCounter  # noqa: E402
from lightning_phantom.cost.data_axis import data_axis_cost  # noqa: E402
from lightning_phantom.cost.model import phantom_cost, tp_cost  # noqa: E402

DATA, MODEL = 2, 2
SIDES = ("TP", "PP ddp", "PP fsdp")


def predicted(side: str, sizes, ghosts: int, rows: int) -> dict:
    """The cost model's per-rank bytes (model axis, data axis) and stored state for one side."""
    model = tp_cost(sizes, MODEL, rows) if side == "TP" else phantom_cost(sizes, MODEL, ghosts, rows)
    mode = "fsdp" if side == "TP" else side.split()[1]
    data = data_axis_cost(model.params, DATA, mode)
    return {"model_bytes": float(model.sent_bytes), "data_bytes": float(data.sent_bytes),
            "memory": float(data.state_bytes)}


def ratios(measured: dict[str, dict], keys=("step_s", "model_bytes", "data_bytes", "total_bytes", "memory")) -> dict:
    """PP/TP for each PP side and key; ``total_bytes`` is filled in from the two axes."""
    for row in measured.values():
        row["total_bytes"] = row["model_bytes"] + row["data_bytes"]
    tp = measured["TP"]
    return {side: {k: row[k] / tp[k] if tp[k] else float("nan") for k in keys}
            for side, row in measured.items() if side != "TP"}


@dataclass
class Probe:
    warmup: int
    steps: int
    groups: dict  # axis name -> process group
    times: list = field(default_factory=list)
    sent: dict = field(default_factory=dict)
    memory: float = 0.0
    step: int = 0
    _counter: CommCounter | None = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1  # + one step counting bytes, untimed

    def start(self) -> None:
        if self.step == self.warmup + self.steps:
            self._counter = CommCounter().__enter__()
        self._t0 = time.perf_counter()

    def end(self, params, optimizer) -> None:
        elapsed = time.perf_counter() - self._t0
        if self.warmup <= self.step < self.warmup + self.steps:
            self.times.append(elapsed)
        if self.step == self.warmup:
            self.memory = float(sum(state_bytes(params, optimizer).values()))
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.sent = {axis: float(self._counter.summary(group=g).sent_bytes) for axis, g in self.groups.items()}
            self.sent["all"] = float(self._counter.sent_bytes)
            self._counter = None
        self.step += 1


def _module(sizes, side: str, args, probe_box: list):
    import lightning.pytorch as pl

    class FFNModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # PP: the strategy converts this dense FFN; TP: built on meta in configure_model.
            self.ffn = _dense_ffn(sizes) if side != "TP" else None

        def configure_model(self) -> None:
            if self.ffn is not None:
                return
            from torch.distributed.fsdp import fully_shard

            from lightning_phantom.app.tensor_parallel import parallelize_ffn

            with torch.device("meta"):  # Lightning materialises the shards (reset_parameters)
                ffn = parallelize_ffn(_dense_ffn(sizes), self.device_mesh["tensor_parallel"])
            for layer in ffn:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            self.ffn = fully_shard(ffn, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.ffn(batch[0]), batch[1])

        def configure_optimizers(self):
            return make_optimizer(self.ffn.parameters(), args)

    return FFNModule()


def run_block(side: str, sizes, args) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_phantom as lp

    probe_box: list[Probe] = []

    class Timing(pl.Callback):
        def setup(self, trainer, module, stage):
            s = trainer.strategy
            if side == "TP":
                mesh = s.device_mesh
                groups = {"model": mesh["tensor_parallel"].get_group(), "data": mesh["data_parallel"].get_group()}
            else:
                groups = {"model": s.phantom_group, "data": s.data_parallel_group}
            probe_box.append(Probe(args.warmup, args.steps, groups))

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            probe_box[0].start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            probe_box[0].end(module.parameters(), trainer.optimizers[0])

    if side == "TP":
        strategy = ModelParallelStrategy(data_parallel_size=DATA, tensor_parallel_size=MODEL)
    else:
        strategy = lp.PhantomStrategy(phantom_parallel_size=MODEL, ghosts=args.ghosts,
                                      data_parallel=side.split()[1], timeout=timedelta(seconds=120))
    total = args.warmup + args.steps + 1
    torch.manual_seed(1234)
    trainer = pl.Trainer(
        accelerator="cpu", devices=DATA * MODEL, strategy=strategy, max_steps=total, callbacks=[Timing()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    trainer.fit(_module(sizes, side, args, probe_box), _loader(sizes, args.batch // DATA, total))
    probe = probe_box[0]
    times = torch.tensor(probe.times, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    memory = torch.tensor([probe.memory], dtype=torch.float64)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    return {"step_s": statistics.median(times.tolist()), "model_bytes": probe.sent["model"],
            "data_bytes": probe.sent["data"], "other_bytes": probe.sent["all"] - probe.sent["model"]
            - probe.sent["data"], "memory": float(memory)}


def _worker(rank: int, args, port: int, out_path: str) -> None:
    world = DATA * MODEL
    join_process_group(rank, world, port, f"data-axis-{port}")
    sizes = [args.d_in] + [args.width] * (args.layers + 1) + [args.d_out]
    blocks: dict[str, list] = {side: [] for side in SIDES}
    try:
        for side in ("TP", "PP ddp", "TP", "PP fsdp", "TP"):
            blocks[side].append(run_block(side, sizes, args))
            if rank == 0 and args.verbose:
                print(f"  {side}: {blocks[side][-1]}", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"sizes": sizes, "blocks": blocks}, f)


def summarise(sizes, blocks: dict, args) -> dict:
    rows = args.batch // DATA
    tp_times = [b["step_s"] for b in blocks["TP"]]
    measured = {side: dict(runs[0]) for side, runs in blocks.items()}
    # Each PP block against the mean of the TP blocks just before and after it.
    measured["TP"]["step_s"] = statistics.mean(tp_times)
    step_ratio = {"PP ddp": blocks["PP ddp"][0]["step_s"] / statistics.mean(tp_times[0:2]),
                  "PP fsdp": blocks["PP fsdp"][0]["step_s"] / statistics.mean(tp_times[1:3])}
    model = {side: predicted(side, sizes, args.ghosts, rows) for side in SIDES}
    measured_ratio = ratios(measured)
    for side in step_ratio:
        measured_ratio[side]["step_s"] = step_ratio[side]
    return {"sizes": sizes, "ghosts": args.ghosts, "rows_per_replica": rows, "measured": measured,
            "model": model, "ratio": measured_ratio,
            "model_ratio": ratios({s: dict(v) for s, v in model.items()}, keys=("model_bytes", "data_bytes",
                                                                                 "total_bytes", "memory"))}


def table(result: dict) -> str:
    mib = 2 ** 20
    lines = [f"FFN {result['sizes']}, ghosts {result['ghosts']}, {result['rows_per_replica']} rows per replica; "
             "data(2) x model(2), 4 CPU ranks, gloo; per rank, one step",
             f"{'side':8} {'step ms':>8} {'model-axis MiB':>22} {'data-axis MiB':>22} {'memory MiB':>20}",
             f"{'':8} {'':>8} {'counted / model':>22} {'counted / model':>22} {'counted / model':>20}"]
    for side in SIDES:
        m, c = result["measured"][side], result["model"][side]
        lines.append(f"{side:8} {m['step_s'] * 1e3:8.1f} {m['model_bytes'] / mib:10.3f} / {c['model_bytes'] / mib:9.3f}"
                     f" {m['data_bytes'] / mib:10.3f} / {c['data_bytes'] / mib:9.3f}"
                     f" {m['memory'] / mib:9.3f} / {c['memory'] / mib:8.3f}")
    lines.append("PP/TP (measured; cost model in brackets)")
    for side, r in result["ratio"].items():
        c = result["model_ratio"][side]
        lines.append(f"{side:8} step {r['step_s']:.2f}  model axis {r['model_bytes']:.3f} ({c['model_bytes']:.3f})"
                     f"  data axis {r['data_bytes']:.3f} ({c['data_bytes']:.3f})"
                     f"  total {r['total_bytes']:.3f} ({c['total_bytes']:.3f})"
                     f"  memory {r['memory']:.3f} ({c['memory']:.3f})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2, help="hidden n -> n layers")
    parser.add_argument("--ghosts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="rows per step over both replicas")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-out", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="fused-adam", choices=["fused-adam", "adam"])
    parser.add_argument("--quick", action="store_true", help="n = 128, ghosts 8, 2 steps: seconds, for the test")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.ghosts, args.steps, args.warmup = 128, 8, 2, 0
    for name in ("width", "layers", "ghosts", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width % (DATA * MODEL) or args.batch % DATA:
        parser.error(f"--width must be divisible by {DATA * MODEL} and --batch by {DATA}; "
                     f"got --width {args.width} --batch {args.batch}")
    if args.ghosts > args.width // MODEL:
        parser.error(f"--ghosts must be <= width / {MODEL} = {args.width // MODEL}, got {args.ghosts}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, port, out), nprocs=DATA * MODEL, join=True)
        with open(out) as f:
            raw = json.load(f)
    result = summarise(raw["sizes"], raw["blocks"], args)
    print(json.dumps(result) if args.json else table(result))
    return result


if __name__ == "__main__":
    main()
