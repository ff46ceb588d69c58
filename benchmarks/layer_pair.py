"""One phantom layer against one Megatron tensor-parallel layer, forward + backward (issue 2).

    python benchmarks/layer_pair.py                       # p = 2, widths 1024 2048 4096, ghosts 8 32 128
    python benchmarks/layer_pair.py --widths 1024 --reps 5 --json

The script spawns its own ``p`` gloo processes (one thread each) and times, on the same
run and alternating case by case:

* PP: ``PhantomLinear(n, n, ghosts)`` on this rank's input slice (rows × n/p), forward
  then backward (the input needs grad, as a hidden layer's input does).
* TP: a Megatron pair, column-parallel ``Linear(n, n)`` then row-parallel ``Linear(n, n)``
  with the all-reduce, on the replicated input. A pair costs one all-reduce forward (row
  layer) and one backward (the column layer's input gradient), i.e. one all-reduce of n
  per layer. **TP per layer is the pair's time / 2**, which is what PP is compared with.

"Overlap" means, for PP, the operator's own ``overlap=True`` (ghost all-gather under the
local matmul, reduce-scatter under the weight gradients). For TP it is Megatron's async
input-gradient all-reduce, run under the column layer's weight-gradient matmul
(``_ColumnParallelAsync``); without overlap TP is ``comm.copy_to_phantom`` /
``comm.reduce_from_phantom`` around plain ``F.linear``, which is what Megatron does with
async all-reduce switched off. The row layer's forward all-reduce cannot overlap anything
in either variant: its result is the layer's output.

Times are medians over ``--reps`` repetitions of the per-repetition maximum over ranks
(each rank times its own forward + backward after a barrier; the slowest rank is the
layer's time). Bytes are what ``CommCounter`` sees handed to the collectives in one
forward + backward, per rank; their ratio PP/(TP/2) is printed next to p·ghosts/n.

``--profile`` instead profiles a whole phantom *training step* (``PhantomFFN([64, n x 5, 1],
ghosts)``, MSE, fused Adam; ``--widths``/``--ghosts`` pick the first value): wall time of forward,
backward and optimizer, then ``torch.profiler`` self times of forward + backward grouped as
dense GEMMs (local blocks and the two end layers), ghost GEMMs (compress, decompress and
their gradients), collectives and the operator's own time (mostly waiting for them), and
the rest; and the same phases for the TP model (``parallelize_ffn``) for comparison.

On a contended machine the times are noisy: re-run the final figures on a quiet one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_phantom.ops.comm import copy_to_phantom, reduce_from_phantom
from lightning_phantom.cost.counting import CommCounter
from lightning_phantom.nn.layers import PhantomLinear


class _ColumnParallelAsync(torch.autograd.Function):
    """Megatron's column-parallel linear with the input-gradient all-reduce run asynchronously.

    Forward: z = x W_iᵀ + b_i on the replicated input. Backward: dX_i = dZ W_i is summed
    over ranks (every rank's slice of z depends on all of x); the all-reduce is started
    first and the weight gradient computed while it is in flight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        grad_x = torch.mm(grad_z, weight)
        work = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
        grad_w = torch.mm(grad_z.t(), x)
        grad_b = grad_z.sum(0)
        work.wait()
        return grad_x, grad_w, grad_b, None


class TensorParallelPair(torch.nn.Module):
    """Column-parallel Linear(n, n) then row-parallel Linear(n, n): this rank's shards."""

    def __init__(self, width: int, p: int, overlap: bool) -> None:
        super().__init__()
        shard = width // p
        bound = 1 / width ** 0.5
        self.w1 = torch.nn.Parameter(torch.empty(shard, width).uniform_(-bound, bound))
        self.b1 = torch.nn.Parameter(torch.empty(shard).uniform_(-bound, bound))
        self.w2 = torch.nn.Parameter(torch.empty(width, shard).uniform_(-bound, bound))
        self.b2 = torch.nn.Parameter(torch.empty(width).uniform_(-bound, bound))
        self.overlap = overlap

    def forward(self, x):
        if self.overlap:
            h = _ColumnParallelAsync.apply(x, self.w1, self.b1, None)
        else:
            h = F.linear(copy_to_phantom(x), self.w1, self.b1)
        return reduce_from_phantom(F.linear(h, self.w2)) + self.b2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(module, x, grad_out) -> float:
    """One forward + backward from a barrier; this rank's seconds."""
    for param in module.parameters():
        param.grad = None
    x.grad = None
    dist.barrier()
    start = time.perf_counter()
    module(x).backward(grad_out)
    return time.perf_counter() - start


def _sent_bytes(module, x, grad_out) -> float:
    with CommCounter() as comm:
        module(x).backward(grad_out)
    return float(comm.sent_bytes)


def _worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # subnormal floats would slow some cases by 10x and not others
    dist.init_process_group("gloo", rank=rank, world_size=args.p)
    try:
        if args.profile:
            _profile(rank, args)
            return
        results = _run(rank, args)
        if rank == 0:
            _report(results, args)
    finally:
        dist.destroy_process_group()


def _run(rank: int, args) -> list[dict]:
    p, rows = args.p, args.rows
    results = []
    for width in args.widths:
        torch.manual_seed(0)
        x_full = torch.randn(rows, width, requires_grad=True)
        x_slice = x_full.detach()[:, rank * width // p:(rank + 1) * width // p].clone().requires_grad_()
        grad_full = torch.randn(rows, width)
        grad_slice = grad_full[:, rank * width // p:(rank + 1) * width // p].contiguous()
        ghosts = [k for k in args.ghosts if k <= width // p]
        cases = {}  # (side, ghosts, overlap) -> (module, input, output gradient)
        for overlap in (True, False):
            cases[("TP", 0, overlap)] = (TensorParallelPair(width, p, overlap), x_full, grad_full)
            for k in ghosts:
                layer = PhantomLinear(width, width, k, overlap=overlap)
                cases[("PP", k, overlap)] = (layer, x_slice, grad_slice)
        keys = list(cases)
        for _ in range(args.warmup):
            for key in keys:
                _step(*cases[key])
        times = {key: [] for key in keys}
        for rep in range(args.reps):
            # Rotate the order so that no case always runs first (or after the same neighbour).
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                times[key].append(_step(*cases[key]))
        sent = {key: _sent_bytes(*cases[key]) for key in keys if key[2]}
        # The slowest rank sets each repetition's time.
        local = {key: torch.tensor(v, dtype=torch.float64) for key, v in times.items()}
        for t in local.values():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        med = {key: statistics.median(t.tolist()) for key, t in local.items()}
        for k in ghosts:
            row = {"p": p, "width": width, "ghosts": k, "rows": rows, "reps": args.reps}
            for overlap, tag in ((True, "overlap"), (False, "no_overlap")):
                pp, tp_pair = med[("PP", k, overlap)], med[("TP", 0, overlap)]
                row[f"pp_ms_{tag}"] = 1e3 * pp
                row[f"tp_layer_ms_{tag}"] = 1e3 * tp_pair / 2
                row[f"time_ratio_{tag}"] = pp / (tp_pair / 2)
            row["pp_sent_bytes"] = sent[("PP", k, True)]
            row["tp_layer_sent_bytes"] = sent[("TP", 0, True)] / 2
            row["bytes_ratio"] = row["pp_sent_bytes"] / row["tp_layer_sent_bytes"]
            row["bytes_ratio_expected"] = p * k / width  # docs/operator.md §8: p·k/n
            row["arithmetic_bound"] = 1 / p + p * k / width  # docs/operator.md §8: 1/p + p·k/n
            results.append(row)
        del cases
    return results


# ---------------------------------------------------------------- --profile: one training step

def _phase_times(model, optimizer, x, y, reps: int) -> dict:
    """Median wall seconds (max over ranks) of forward, backward and optimizer step."""
    phases = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(reps):
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        for name, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[name].append(t)
    out = {}
    for name, values in phases.items():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = statistics.median(t.tolist())
    return out


def _category(evt, ghost_dims: set) -> str:
    if evt.name.startswith("c10d::") or "Phantom" in evt.name:
        return "collectives + operator (waits)"
    if evt.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
        parent, in_operator = evt.cpu_parent, False
        while parent is not None and not in_operator:
            in_operator, parent = "PhantomLinearFunction" in parent.name, parent.cpu_parent
        dims = {d for shape in evt.input_shapes if shape for d in shape}
        return "ghost GEMMs" if in_operator and dims & ghost_dims else "dense GEMMs"
    return "elementwise + other"


def _profile(rank: int, args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    from lightning_phantom.nn.layers import PhantomFFN
    from lightning_phantom.app.tensor_parallel import parallelize_ffn

    p, width, k, rows = args.p, args.widths[0], args.ghosts[0], args.rows
    sizes = [64] + [width] * 5 + [1]
    torch.manual_seed(0)
    x, y = torch.randn(rows, sizes[0]), torch.randn(rows, sizes[-1])
    phantom = PhantomFFN(sizes, k)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    dense = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())][:-1])
    tensor = parallelize_ffn(dense, init_device_mesh("cpu", (p,)))
    report = {}
    for name, model in (("PP", phantom), ("TP", tensor)):
        # PyTorch's default Adam on CPU (single-tensor) first, for its time only; then fused.
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        _phase_times(model, optimizer, x, y, 2)
        report[name + " single-tensor Adam"] = _phase_times(model, optimizer, x, y, args.reps)["optimizer"]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        _phase_times(model, optimizer, x, y, 2)  # warm-up: Adam state, DTensor caches
        report[name] = _phase_times(model, optimizer, x, y, args.reps)
        if name == "PP":
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    optimizer.zero_grad(set_to_none=True)
                    F.mse_loss(model(x), y).backward()
            ghost_dims = {k, (p - 1) * k, p * k}
            cats: dict = {}
            for evt in prof.events():
                cat = _category(evt, ghost_dims)
                cats[cat] = cats.get(cat, 0.0) + evt.self_cpu_time_total / 3 / 1e3  # ms per step
            report["PP profile"] = cats
            events = prof.key_averages(group_by_input_shape=True)
            events = sorted(events, key=lambda e: -e.self_cpu_time_total)
            report["PP top"] = [(e.key, [s for s in e.input_shapes if s], e.count // 3,
                                 e.self_cpu_time_total / 3e3) for e in events[:12]]
        del optimizer
    if rank != 0:
        return
    print(f"Training step, sizes [64, {width} x 5, 1], {rows} rows, p = {p}, ghosts = {k}, Adam(fused=True), "
          f"float32, gloo, 1 thread per rank; medians of {args.reps} steps (max over ranks).")
    for name in ("PP", "TP"):
        t = report[name]
        total = sum(t.values())
        print(f"  {name}: step {1e3 * total:7.1f} ms = " + ", ".join(
            f"{phase} {1e3 * v:.1f} ms ({100 * v / total:.0f}%)" for phase, v in t.items())
            + f"; single-tensor Adam would take {1e3 * report[name + ' single-tensor Adam']:.1f} ms")
    cats = report["PP profile"]
    total = sum(cats.values())
    print(f"  PP forward + backward, profiler self time per step ({total:.1f} ms in all):")
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"    {cat:<34} {ms:8.1f} ms {100 * ms / total:5.1f}%")
    print("  top operators (self time per step, calls per step, input shapes):")
    for name, shapes, calls, ms in report["PP top"]:
        print(f"    {ms:8.2f} ms {calls:>3}x {name:<36} {shapes}")


def _report(results: list[dict], args) -> None:
    if args.json:
        for row in results:
            print(json.dumps(row))
        return
    print(f"p = {args.p}, {args.rows} rows, float32, gloo, 1 thread per rank; medians of {args.reps} "
          f"repetitions (max over ranks), after {args.warmup} warm-up.")
    print("TP/layer = time of one column+row parallel pair / 2. ratio = PP / (TP/layer). "
          "bound = 1/p + p*k/n (arithmetic).")
    head = (f"{'n':>5} {'k':>4} | {'PP ms':>8} {'TP/l ms':>8} {'ratio':>6} | {'PP ms':>8} {'TP/l ms':>8} "
            f"{'ratio':>6} | {'bound':>6} | {'PP bytes':>10} {'TP/l bytes':>11} {'ratio':>8} {'p*k/n':>8}")
    print(f"{'':11}| {'overlap on':^24} | {'overlap off':^24} |")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['width']:>5} {r['ghosts']:>4} | {r['pp_ms_overlap']:>8.2f} "
              f"{r['tp_layer_ms_overlap']:>8.2f} "
              f"{r['time_ratio_overlap']:>6.3f} | {r['pp_ms_no_overlap']:>8.2f} "
              f"{r['tp_layer_ms_no_overlap']:>8.2f} {r['time_ratio_no_overlap']:>6.3f} | "
              f"{r['arithmetic_bound']:>6.3f} | {r['pp_sent_bytes']:>10.0f} "
              f"{r['tp_layer_sent_bytes']:>11.0f} {r['bytes_ratio']:>8.5f} {r['bytes_ratio_expected']:>8.5f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=2, help="ranks (processes), default 2")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ghosts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per case (median), default 7")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per (width, ghosts)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one phantom training step (first width and ghosts) instead")
    args = parser.parse_args(argv)
    if args.p < 2:
        parser.error(f"--p must be >= 2 (a group of one sends nothing), got {args.p}")
    if args.reps < 5:
        parser.error(f"--reps must be >= 5 for a meaningful median, got {args.reps}")
    for width in args.widths:
        if width % args.p:
            parser.error(f"width {width} is not divisible by p = {args.p}")
    mp.spawn(_worker, args=(args, _free_port()), nprocs=args.p, join=True)


if __name__ == "__main__":
    sys.exit(main())
