"""Compiled phantom FFN against eager phantom and compiled tensor parallelism (issue 12).

    python benchmarks/compile.py                          # n = 4096, p = 2, ghosts 32, CPU inductor
    python benchmarks/compile.py --width 1024 --reps 3    # quicker
    python benchmarks/compile.py --cases pp_eager         # eager phantom only (e.g. old vs new code,
                                                          # by pointing PYTHONPATH at each checkout)

The script spawns ``p`` gloo processes (one thread each) and builds one FFN,
``sizes = [d_in, n, …, n, d_out]`` (``--layers`` hidden n → n layers, ReLU), in up to four forms:

* ``pp_eager`` — ``PhantomFFN(sizes, ghosts)``, eager;
* ``pp_compiled`` — the same shards, ``torch.compile(fullgraph=True)`` in place
  (``lightning_phantom.nn.compiling.compile_ffns``, what ``PhantomStrategy(compile=True)`` does);
* ``tp_eager`` — the dense FFN sharded with the app's Megatron-style DTensor tensor
  parallelism (``lightning_phantom.app.tensor_parallel.parallelize_ffn``, what the TP
  baseline runs under ``ModelParallelStrategy``);
* ``tp_compiled`` — that, compiled the same way (``model.compile=true`` in the app).

A step is forward + backward of ``(out * target).sum()`` on ``--rows`` replicated rows.
Before timing, each compiled model is checked against its eager twin (same weights):
outputs and gradients must agree, so a wrong compiled graph is never timed. Compilation
(first call, forward and backward) is timed separately. The cases then alternate in a
rotating order, ``--warmup`` + ``--reps`` steps each; a step's time is the slowest rank's;
the report gives medians and the ratios of medians from this one run, of wall time and of
CPU time (the process's own, all threads: the work a step costs, steadier than wall time
when other jobs share the cores). On a shared machine the times are noisy: quote the
ratios, and re-run the final figures on a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

CASES = ("pp_eager", "pp_compiled", "tp_eager", "tp_compiled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, x, target) -> tuple[float, float]:
    """One forward + backward from a barrier: this rank's wall seconds and CPU seconds.

    CPU time (all of this process's threads) is the work the step costs whatever else runs
    on the machine; on a machine shared with other jobs it is steadier than wall time, which
    also holds the overlap of communication with computation.
    """
    for p in model.parameters():
        p.grad = None
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    (model(x) * target).sum().backward()
    return time.perf_counter() - start, time.process_time() - cpu


def _grads(model) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone() for p in model.parameters()]


def _check_equal(name: str, eager, compiled, x, target) -> None:
    """Compiled and eager twins agree on output and gradients (relative 1e-4), else stop."""
    outs = []
    for model in (eager, compiled):
        for p in model.parameters():
            p.grad = None
        out = model(x)
        (out * target).sum().backward()
        outs.append((out.detach(), _grads(model)))
    (ref, ref_grads), (got, got_grads) = outs
    worst = max([((got - ref).norm() / ref.norm()).item()]
                + [((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got_grads, ref_grads)])
    if worst > 1e-4:
        raise RuntimeError(f"{name}: compiled model differs from eager by {worst:.2e} (relative)")


def _build(args, rank: int) -> dict:
    from lightning_phantom.nn.layers import PhantomFFN

    sizes = [args.d_in] + [args.width] * (args.layers + 1) + [args.d_out]
    models = {}
    wanted = set(args.cases)
    if wanted & {"pp_eager", "pp_compiled"}:
        torch.manual_seed(0)
        models["pp_eager"] = PhantomFFN(sizes, args.ghosts)  # built also as the compiled one's twin
        if "pp_compiled" in wanted:
            from lightning_phantom.nn.compiling import compile_ffns, compile_options

            holder = nn.ModuleDict({"ffn": copy.deepcopy(models["pp_eager"])})
            compile_ffns(holder, compile_options(True))
            models["pp_compiled"] = holder["ffn"]
    if wanted & {"tp_eager", "tp_compiled"}:
        from torch.distributed.device_mesh import init_device_mesh

        from lightning_phantom.app.module import build_ffn
        from lightning_phantom.app.tensor_parallel import parallelize_ffn

        mesh = init_device_mesh("cpu", (args.p,))
        torch.manual_seed(0)
        dense = build_ffn(args.d_in, args.d_out, args.width, args.layers, "relu")
        models["tp_eager"] = parallelize_ffn(copy.deepcopy(dense), mesh)
        if "tp_compiled" in wanted:
            models["tp_compiled"] = parallelize_ffn(copy.deepcopy(dense), mesh)
            models["tp_compiled"].compile(fullgraph=True)
    return models  # eager twins of compiled models included, for the check


def _worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=args.p)
    try:
        models = _build(args, rank)
        torch.manual_seed(1)  # the same rows and targets on every rank (replicated input)
        x = torch.randn(args.rows, args.d_in)
        target = torch.randn(args.rows, args.d_out)
        compile_s = {}
        for name, model in models.items():
            if name.endswith("compiled"):
                start = time.perf_counter()
                _check_equal(name, models.get(name.replace("compiled", "eager"), model), model, x, target)
                compile_s[name] = time.perf_counter() - start
        keys = [k for k in CASES if k in args.cases]
        for _ in range(args.warmup):
            for key in keys:
                _step(models[key], x, target)
        times = {key: [] for key in keys}
        for rep in range(args.reps):
            shift = rep % len(keys)  # rotate, so that no case always runs first
            for key in keys[shift:] + keys[:shift]:
                times[key].append(_step(models[key], x, target))
        # [reps, 2] per case (wall, CPU); the slowest rank sets each repetition's value.
        slowest = {k: torch.tensor(v, dtype=torch.float64) for k, v in times.items()}
        for t in slowest.values():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            med = {k: statistics.median(t[:, 0].tolist()) for k, t in slowest.items()}
            cpu = {k: statistics.median(t[:, 1].tolist()) for k, t in slowest.items()}
            _report(args, med, cpu, {k: t[:, 0].tolist() for k, t in slowest.items()}, compile_s)
    finally:
        dist.destroy_process_group()


def _report(args, med: dict, cpu: dict, all_times: dict, compile_s: dict) -> None:
    row = {"p": args.p, "width": args.width, "layers": args.layers, "ghosts": args.ghosts, "rows": args.rows,
           "reps": args.reps, "torch": torch.__version__, "lightning_phantom": _package_path()}
    row.update({f"{k}_ms": 1e3 * v for k, v in med.items()})
    row.update({f"{k}_cpu_ms": 1e3 * v for k, v in cpu.items()})
    row.update({f"{k}_compile_s": v for k, v in compile_s.items()})
    for num, den in (("pp_compiled", "pp_eager"), ("pp_compiled", "tp_compiled"), ("pp_eager", "tp_eager"),
                     ("tp_compiled", "tp_eager"), ("pp_eager", "tp_compiled")):
        if num in med and den in med:
            row[f"{num}/{den}"] = med[num] / med[den]
            row[f"{num}/{den} (CPU)"] = cpu[num] / cpu[den]
    if args.json:
        row["times_ms"] = {k: [1e3 * t for t in v] for k, v in all_times.items()}
        print(json.dumps(row))
        return
    print(f"FFN {[args.d_in] + [args.width] * (args.layers + 1) + [args.d_out]}, p = {args.p}, ghosts = "
          f"{args.ghosts}, {args.rows} rows, forward + backward, median of {args.reps} (slowest rank)")
    for k in med:
        extra = f"   (compile + check {compile_s[k]:.1f} s)" if k in compile_s else ""
        print(f"  {k:12s} wall {1e3 * med[k]:9.1f} ms   CPU {1e3 * cpu[k]:9.1f} ms{extra}")
    for k, v in row.items():
        if "/" in k:
            print(f"  {k:31s} {v:.3f}")


def _package_path() -> str:
    import lightning_phantom

    return os.path.dirname(lightning_phantom.__file__)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2, help="hidden n -> n (phantom) layers, default 2")
    parser.add_argument("--ghosts", type=int, default=32)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-out", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.width % args.p:
        parser.error(f"--width ({args.width}) must be divisible by --p ({args.p})")
    mp.spawn(_worker, args=(args, _free_port()), nprocs=args.p, join=True)


if __name__ == "__main__":
    sys.exit(main())
