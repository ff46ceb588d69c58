"""Phantom against Lightning's tensor parallelism: a full training step through the Trainer (issue 6).

    python benchmarks/pp_vs_tp.py     # n = 4096, p = 2, ghosts 16 32 64: ~2.5 min on a quiet machine
    python benchmarks/pp_vs_tp.py --widths 2048 8192 --p 2 4 --json > pp_vs_tp.jsonl
    python benchmarks/pp_vs_tp.py --user --optimizer adam   # as a user builds both: see user_defaults.py

One FFN, ``sizes = [d_in, n, n, n, n, n, d_out]`` (``--d-in 64 --d-out 1``): a
column-parallel first layer, 4 hidden n → n layers (``--layers``), a row-parallel last
layer, ReLU, MSE on synthetic data, fused Adam (``--optimizer``), float32, 256 rows per
step, the same batch on every rank (no data parallelism). Sides:

* **TP** — Lightning's ``ModelParallelStrategy(tensor_parallel_size=p)`` with
  ``lightning_phantom.app.tensor_parallel.parallelize_ffn`` in ``configure_model``: DTensor
  Colwise/Rowwise pairs, the app's baseline.
* **PP** — ``PhantomFFN(sizes, ghosts, group=strategy.phantom_group)`` built in
  ``configure_model`` and trained with ``strategy="phantom"`` (runner ``phantom``, the
  default when ``lightning_phantom.strategy`` exists). Runner ``host`` builds the same
  ``PhantomFFN`` inside ``ModelParallelStrategy`` on its tensor-parallel group (with no
  data parallelism that strategy then only runs the loop); runner ``loop`` trains it with
  a plain PyTorch loop. The runner used is printed. Each ghosts value runs with the
  operator's overlap on and off (``--no-overlap-off`` skips off).

The sides alternate block by block, TP, PP_1, TP, PP_2, ..., TP, for ``--rounds``
rounds over the PP variants; a block is a fresh model and Trainer run for ``--warmup`` +
``--steps`` steps (a side's first block then adds one step counting bytes with
``CommCounter`` and one counting FLOPs with ``LocalFlopCounterMode``, never timed). A
callback times each step from ``on_train_batch_start`` to ``on_train_batch_end``
(forward, backward, optimizer; no barrier); a step's time is the slowest rank's. The
step-time ratio is the median over rounds of PP's block median over the mean of the two
TP blocks around it, so that load from other processes, which drifts slowly, cancels.

Memory per rank: the bytes of parameters, gradients and optimizer state this rank holds
(DTensors counted by their local shard) after a step, and the peak RSS during the steps
above the RSS before the block (after ``malloc_trim``), sampled every 2 ms.

The arithmetic bound is the cost model's FLOP ratio (``lightning_phantom.cost.model``). PP can
come in under it because TP also spends time on its full-width all-reduces and on
DTensor's dispatch. Times are noisy on a contended machine, and p > cores oversubscribes
the CPU (the ratios of bytes, FLOPs and memory stay exact): re-run final figures on a
quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_phantom.cost.model import phantom_cost, tp_cost
from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode


@dataclass(frozen=True)
class Side:
    scheme: str  # "TP" or "PP"
    ghosts: int = 0
    overlap: bool = True

    @property
    def label(self) -> str:
        return "TP" if self.scheme == "TP" else f"PP k={self.ghosts}{'' if self.overlap else ' no-overlap'}"


# ---------------------------------------------------------------- measuring

class RssSampler:
    """Peak resident set size of this process inside a window, sampled by a daemon thread."""

    def __init__(self, period_s: float = 0.002) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self._on = 0, False
        threading.Thread(target=self._loop, args=(period_s,), daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self, period_s: float) -> None:
        while True:
            if self._on:
                self.peak = max(self.peak, self.rss())
            time.sleep(period_s)

    def window(self, on: bool) -> None:
        if on:
            self.peak = max(self.peak, self.rss())
        self._on = on


def _trim_heap() -> None:
    gc.collect()
    try:  # give freed heap back to the OS, so that a block's RSS starts from what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _local_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t  # DTensor: this rank's shard
    return t.numel() * t.element_size()


def state_bytes(params, optimizer) -> dict:
    params = list(params)
    opt = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values())
    return {"params": sum(map(_local_bytes, params)),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None), "optimizer": opt}


class StepProbe:
    """Times steps, then counts one step's bytes and one step's FLOPs (untimed)."""

    def __init__(self, warmup: int, steps: int, sampler: RssSampler, count: bool = True) -> None:
        self.warmup, self.steps, self.sampler, self.count = warmup, steps, sampler, count
        self.times: list[float] = []
        self.step = 0
        self.sent_bytes = self.flops = None
        self.memory: dict = {}
        self._mode = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + (2 if self.count else 0)  # + one counting bytes, one counting FLOPs

    def start(self) -> None:
        timed = self.warmup <= self.step < self.warmup + self.steps
        if self.step == self.warmup + self.steps:
            self._mode = CommCounter()
        elif self.step == self.warmup + self.steps + 1:
            self._mode = LocalFlopCounterMode(display=False)
        if self._mode is not None:
            self._mode.__enter__()
        self.sampler.window(timed)
        self._start = time.perf_counter()

    def end(self, params, optimizer) -> None:
        elapsed = time.perf_counter() - self._start
        self.sampler.window(False)
        if self.warmup <= self.step < self.warmup + self.steps:
            self.times.append(elapsed)
            if self.step == self.warmup:
                self.memory = state_bytes(params, optimizer)
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            if isinstance(self._mode, CommCounter):
                self.sent_bytes = float(self._mode.sent_bytes)
            else:
                self.flops = self._mode.get_total_flops()
            self._mode = None
        self.step += 1


# ---------------------------------------------------------------- the two sides

def _phantom_group(strategy):
    """The phantom group a strategy offers, or None (the world group: right when p = world size)."""
    group = getattr(strategy, "phantom_group", None)
    if group is not None:
        return group
    mesh = getattr(strategy, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    for name in ("phantom", "tensor_parallel"):
        if name in names:
            return mesh[name].get_group()
    return None


def _dense_ffn(sizes) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers += ([nn.ReLU()] if i else []) + [nn.Linear(n_in, n_out)]
    return nn.Sequential(*layers)


def make_optimizer(params, args) -> torch.optim.Optimizer:
    # Fused Adam: one pass per parameter. PyTorch's default on CPU (single-tensor Adam) makes
    # temporaries for sqrt and division and is ~4x slower here, ~7x on DTensor parameters,
    # which would charge TP for the optimizer implementation rather than for its arithmetic.
    return torch.optim.Adam(params, lr=args.lr, fused=args.optimizer == "fused-adam" or None)


def _build_module(sizes, side: Side, args):
    import lightning.pytorch as pl

    from lightning_phantom.nn.layers import PhantomFFN

    class FFNModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = None

        def configure_model(self) -> None:
            if self.ffn is not None:
                return
            if side.scheme == "TP":
                from lightning_phantom.app.tensor_parallel import parallelize_ffn

                with torch.device("meta"):  # Lightning materialises the shards (reset_parameters)
                    ffn = _dense_ffn(sizes)
                self.ffn = parallelize_ffn(ffn, self.device_mesh["tensor_parallel"])
            else:
                group = _phantom_group(self.trainer.strategy)
                self.ffn = PhantomFFN(sizes, side.ghosts, group=group, overlap=side.overlap)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.ffn(x), y)

        def configure_optimizers(self):
            return make_optimizer(self.ffn.parameters(), args)

    return FFNModule()


def _loader(sizes, rows: int, batches: int):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(batches * rows, sizes[0], generator=g),
                                          torch.randn(batches * rows, sizes[-1], generator=g))
    return torch.utils.data.DataLoader(data, batch_size=rows)


def _trainer_block(side: Side, sizes, args, runner: str, probe: StepProbe) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            probe.start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            probe.end(module.parameters(), trainer.optimizers[0])

    p = dist.get_world_size()
    if side.scheme == "PP" and runner == "phantom":
        strategy = "phantom"
    else:
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=p)
    trainer = pl.Trainer(
        accelerator="cpu", devices=p, strategy=strategy, max_steps=probe.total_steps, callbacks=[Probe()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    trainer.fit(_build_module(sizes, side, args), _loader(sizes, args.rows, probe.total_steps))


def _loop_block(side: Side, sizes, args, probe: StepProbe) -> None:
    from lightning_phantom.nn.layers import PhantomFFN

    ffn = PhantomFFN(sizes, side.ghosts, overlap=side.overlap)
    optimizer = make_optimizer(ffn.parameters(), args)
    for x, y in _loader(sizes, args.rows, probe.total_steps):
        probe.start()
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(ffn(x), y).backward()
        optimizer.step()
        probe.end(ffn.parameters(), optimizer)


def run_block(side: Side, sizes, args, runner: str, sampler: RssSampler, count: bool) -> dict:
    _trim_heap()
    base_rss = sampler.rss()
    sampler.peak = 0
    torch.manual_seed(1234)
    probe = StepProbe(args.warmup, args.steps, sampler, count)
    if side.scheme == "PP" and runner == "loop":
        _loop_block(side, sizes, args, probe)
    else:
        _trainer_block(side, sizes, args, runner, probe)
    times = torch.tensor(probe.times, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    return {"times": times.tolist(), "sent_bytes": probe.sent_bytes, "flops": probe.flops,
            "memory": probe.memory, "rss_peak": max(sampler.peak - base_rss, 0)}


# ---------------------------------------------------------------- driver

def _worker(rank: int, p: int, args, port: int, runner: str, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
        NODE_RANK="0", WORLD_SIZE=str(p), LOCAL_WORLD_SIZE=str(p), TORCHELASTIC_RUN_ID=f"pp-vs-tp-{port}",
        OMP_NUM_THREADS="1",
    )
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (creates its loggers, silenced next)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    if runner == "phantom":
        import lightning_phantom.strategy  # noqa: F401  registers strategy="phantom"
    sampler = RssSampler()
    results = []
    try:
        for width in args.widths:
            results += _measure_width(width, p, args, runner, sampler, verbose=rank == 0 and args.verbose)
    finally:
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        dist.destroy_process_group()


def _measure_width(width: int, p: int, args, runner: str, sampler: RssSampler, verbose: bool) -> list[dict]:
    sizes = [args.d_in] + [width] * (args.layers + 1) + [args.d_out]
    ghosts = [k for k in args.ghosts if k <= width // p]
    tp = Side("TP")
    sides = [Side("PP", k, True) for k in ghosts]
    if not args.no_overlap_off:
        sides += [Side("PP", k, False) for k in ghosts]
    runs = {side: [] for side in [tp, *sides]}
    ratios = {side: [] for side in sides}

    def block(side: Side) -> float:
        runs[side].append(run_block(side, sizes, args, runner, sampler, count=not runs[side]))
        if verbose:
            print(f"  p={p} n={width} {side.label}: {[round(t * 1e3) for t in runs[side][-1]['times']]} ms",
                  file=sys.stderr, flush=True)
        return statistics.median(runs[side][-1]["times"])

    # TP, PP_1, TP, PP_2, TP, ...: each PP block is compared with the TP blocks just before
    # and after it, so that load from other processes, drifting over tens of seconds, cancels.
    tp_before = block(tp)
    for _ in range(args.rounds):
        for side in sides:
            pp = block(side)
            tp_after = block(tp)
            ratios[side].append(pp / ((tp_before + tp_after) / 2))
            tp_before = tp_after
    return _summarise(sizes, p, ghosts, runs, ratios, args, runner)


def _summarise(sizes, p, ghosts, runs, ratios, args, runner) -> list[dict]:
    def med(side):
        return statistics.median(t for run in runs[side] for t in run["times"])

    def last(side, key):  # counted in a side's first block
        return runs[side][0][key]

    def mem(side):
        return sum(last(side, "memory").values())

    def rss(side):
        return statistics.median(run["rss_peak"] for run in runs[side])

    tp = Side("TP")
    out = []
    for k in ghosts:
        pp, pp_off = Side("PP", k, True), Side("PP", k, False)
        model_pp, model_tp = phantom_cost(sizes, p, k, args.rows, 4), tp_cost(sizes, p, args.rows, 4)
        row = {
            "width": sizes[1], "ghosts": k, "p": p, "sizes": sizes, "rows": args.rows, "runner": runner,
            "optimizer": args.optimizer,
            "samples_per_side": args.rounds * args.steps,
            "tp_step_ms": 1e3 * med(tp), "pp_step_ms": 1e3 * med(pp),
            "step_time_ratio": statistics.median(ratios[pp]),
            "step_time_ratio_of_medians": med(pp) / med(tp),
            "flop_ratio": model_pp.flops / model_tp.flops,
            "measured_flop_ratio": last(pp, "flops") / last(tp, "flops"),
            "bytes_ratio": last(pp, "sent_bytes") / last(tp, "sent_bytes"),
            "predicted_bytes_ratio": float(model_pp.sent_bytes / model_tp.sent_bytes),
            "pk_over_n": p * k / sizes[1],
            "pp_sent_bytes": last(pp, "sent_bytes"), "tp_sent_bytes": last(tp, "sent_bytes"),
            "bytes_match_model": last(pp, "sent_bytes") == float(model_pp.sent_bytes)
            and last(tp, "sent_bytes") == float(model_tp.sent_bytes),
            "pp_state_bytes": mem(pp), "tp_state_bytes": mem(tp),
            "memory_ratio": mem(pp) / mem(tp),
            "params_ratio_model": model_pp.params / model_tp.params,
            "pp_rss_peak_bytes": rss(pp), "tp_rss_peak_bytes": rss(tp),
            "rss_ratio": rss(pp) / rss(tp) if rss(tp) else None,
        }
        row["time_over_bound"] = row["step_time_ratio"] / row["flop_ratio"]
        if pp_off in runs:
            row["pp_step_ms_no_overlap"] = 1e3 * med(pp_off)
            row["step_time_ratio_no_overlap"] = statistics.median(ratios[pp_off])
        out.append(row)
    return out


def _print_table(rows: list[dict]) -> None:
    mib = 2**20
    head = (f"{'p':>2} {'n':>5} {'k':>3} | {'TP ms':>7} {'PP ms':>7} {'time':>6} {'off ms':>7} {'off':>6} | "
            f"{'FLOPs':>6} {'t/bound':>7} | {'bytes':>7} {'p*k/n':>7} {'model':>7} | {'state':>6} "
            f"{'RSS':>6} | {'PP state':>9} {'TP state':>9}")
    print(f"{'':12}| {'step time PP/TP; off = PP without overlap':^39} | {'arithmetic':^14} | "
          f"{'sent bytes PP/TP':^23} | {'memory PP/TP':^13} |")
    print(head)
    print("-" * len(head))
    for r in rows:
        off = (f"{r['pp_step_ms_no_overlap']:>7.1f} {r['step_time_ratio_no_overlap']:>6.3f}"
               if "pp_step_ms_no_overlap" in r else f"{'-':>7} {'-':>6}")
        rss = f"{r['rss_ratio']:>6.3f}" if r["rss_ratio"] else f"{'-':>6}"
        print(f"{r['p']:>2} {r['width']:>5} {r['ghosts']:>3} | {r['tp_step_ms']:>7.1f} "
              f"{r['pp_step_ms']:>7.1f} "
              f"{r['step_time_ratio']:>6.3f} {off} | {r['flop_ratio']:>6.3f} {r['time_over_bound']:>7.3f} | "
              f"{r['bytes_ratio']:>7.5f} {r['pk_over_n']:>7.5f} {r['predicted_bytes_ratio']:>7.5f} | "
              f"{r['memory_ratio']:>6.3f} {rss} | {r['pp_state_bytes'] / mib:>7.1f}Mi "
              f"{r['tp_state_bytes'] / mib:>7.1f}Mi")
    print("ms: median step times. time: PP/TP step-time ratio (see above). FLOPs: cost-model FLOP ratio,\n"
          "the arithmetic bound; t/bound = time / FLOPs. bytes: CommCounter sent bytes per rank per step;\n"
          "model = the cost model's ratio. state: parameters + gradients + Adam state bytes per rank.\n"
          "RSS: peak RSS above the block's starting RSS (median over blocks).")
    for r in rows:
        if not r["bytes_match_model"]:
            print(f"WARNING p={r['p']} n={r['width']} k={r['ghosts']}: counted bytes differ from the cost "
                  "model")


def _default_runner() -> str:
    try:
        import lightning_phantom.strategy  # noqa: F401
    except ImportError:
        return "host"
    return "phantom"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--user" in argv:  # both strategies as a user builds them (benchmarks/user_defaults.py)
        from user_defaults import main as user_main

        return user_main([a for a in argv if a != "--user"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096], help="hidden widths (default 4096)")
    parser.add_argument("--p", type=int, nargs="+", default=[2], help="group sizes (default 2)")
    parser.add_argument("--ghosts", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--layers", type=int, default=4, help="hidden n -> n (phantom) layers, default 4")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-out", type=int, default=1)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the sides (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per block (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block (default 3)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--optimizer", choices=["fused-adam", "adam"], default="fused-adam",
                        help="Adam(fused=True) (default) or PyTorch's default single-tensor Adam on CPU")
    parser.add_argument("--runner", choices=["auto", "phantom", "host", "loop"], default="auto",
                        help="how PP is trained: strategy='phantom', PhantomFFN inside "
                             "ModelParallelStrategy, or a plain loop (default: phantom if "
                             "lightning_phantom.strategy exists, else host)")
    parser.add_argument("--no-overlap-off", action="store_true", help="skip the PP runs with overlap off")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument("--verbose", action="store_true", help="per-block step times on stderr")
    args = parser.parse_args(argv)
    if args.rounds * args.steps < 5:
        parser.error(f"rounds x steps = {args.rounds * args.steps} timed steps per side; need >= 5 for a "
                     "median")
    for p in args.p:
        if p < 2:
            parser.error(f"--p values must be >= 2, got {p}")
        for n in args.widths:
            if n % p:
                parser.error(f"width {n} is not divisible by p = {p}")
    runner = _default_runner() if args.runner == "auto" else args.runner
    rows = []
    for p in args.p:
        if p > (os.cpu_count() or 1):
            print(f"note: p = {p} ranks on {os.cpu_count()} cores: times are oversubscribed; ratios of "
                  "bytes, "
                  "FLOPs and memory stay exact", file=sys.stderr)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out_path = f.name
        try:
            mp.spawn(_worker, args=(p, args, _free_port(), runner, out_path), nprocs=p, join=True)
            with open(out_path) as f:
                rows += json.load(f)
        finally:
            os.unlink(out_path)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"FFN sizes [{args.d_in}, n x {args.layers + 1}, {args.d_out}], {args.rows} rows, float32, "
          f"{args.optimizer}, gloo, 1 thread per rank. PP runner: {runner}. TP: ModelParallelStrategy + "
          "parallelize_ffn.")
    print(f"{args.rounds} rounds, blocks of {args.warmup} warm-up + {args.steps} timed steps (slowest rank "
          "per step); time ratio = median over rounds of PP / mean of the TP blocks before and after.")
    _print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
