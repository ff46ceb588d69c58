"""PP against TP built exactly as a user would: defaults, their optimizer, training and forward-only.

    python benchmarks/pp_vs_tp.py --user                      # n = 4096, p = 2, k = 32, SGD
    python benchmarks/pp_vs_tp.py --user --optimizer adam --rounds 5 --json

Both sides train the model of ``benchmarks/overheads.py`` (``nn.Sequential`` of Linear(256, n),
4 x Linear(n, n), Linear(n, 16), ReLU between; batch 256; MSE) with the optimizer as torch
gives it (``--optimizer sgd|adam|adamw``, no fused/foreach flags):

* **PP** — ``strategy=PhantomStrategy(ghosts=k)`` and nothing else: ``init="svd"``, the
  non-finite guard, overlap, the cost log line, all on.
* **TP** — ``ModelParallelStrategy(tensor_parallel_size=p)`` with
  ``lightning_phantom.app.tensor_parallel.parallelize_ffn`` in ``configure_model``.

A block is one side's fit (``--warmup`` + ``--steps`` steps, timed from
``on_train_batch_start`` to ``on_train_batch_end``) followed by ``trainer.predict`` over the same
number of batches (forward only, timed from ``on_predict_batch_start`` to
``on_predict_batch_end``). Blocks alternate TP, PP, TP, PP, ..., TP; each PP block's median is
divided by the mean of the TP blocks before and after it (load from other processes drifts
slowly and cancels), and the ratio reported is the median over rounds. A step lasts as long as
its slowest rank. The forward-only ratio is set against the bound 1/p + p·k/n (PP's arithmetic
per rank over TP's, to first order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from overheads import D_IN, D_OUT, DEPTH, ROWS, launch, user_data, user_module


def _block(scheme: str, width: int, ghosts: int, args) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_phantom.strategy import PhantomStrategy

    train, predict = [], []

    class Clock(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            train.append(time.perf_counter() - self.t)

        def on_predict_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_predict_batch_end(self, *a):
            predict.append(time.perf_counter() - self.t)

    def trainer(strategy, steps):
        return pl.Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=strategy, max_steps=steps,
                          callbacks=[Clock()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0)

    p, steps = dist.get_world_size(), args.warmup + args.steps
    torch.manual_seed(1234)
    tp = scheme == "TP"
    module = user_module(width, args.optimizer, tensor_parallel=tp)
    make = (lambda: ModelParallelStrategy(tensor_parallel_size=p, data_parallel_size=1)) if tp else (
        lambda: PhantomStrategy(ghosts=ghosts))
    trainer(make(), steps).fit(module, user_data(steps))
    with torch.no_grad():
        trainer(make(), steps).predict(module, user_data(steps), return_predictions=False)
    times = torch.tensor([train[args.warmup:], predict[args.warmup:]], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {"train": statistics.median(times[0].tolist()), "predict": statistics.median(times[1].tolist())}


def _worker(rank: int, p: int, width: int, ghosts: int, args) -> dict:
    blocks = {"TP": [], "PP": []}
    ratios = {"train": [], "predict": []}
    before = _block("TP", width, ghosts, args)
    blocks["TP"].append(before)
    for _ in range(args.rounds):
        pp = _block("PP", width, ghosts, args)
        after = _block("TP", width, ghosts, args)
        blocks["PP"].append(pp)
        blocks["TP"].append(after)
        for kind in ratios:
            ratios[kind].append(pp[kind] / ((before[kind] + after[kind]) / 2))
        before = after
        if rank == 0 and args.verbose:
            print(f"  n={width} p={p} k={ghosts}: PP {pp} TP {after}", file=sys.stderr, flush=True)
    return {"blocks": blocks, "ratios": ratios}


def measure(width: int, p: int, ghosts: int, args) -> dict:
    from lightning_phantom.cost.model import phantom_cost, tp_cost

    result = launch(_worker, p, width, ghosts, args)
    sizes = [D_IN] + [width] * (DEPTH + 1) + [D_OUT]
    flops = phantom_cost(sizes, p, ghosts, ROWS, 4).flops / tp_cost(sizes, p, ROWS, 4).flops

    def med(side, kind):
        return 1e3 * statistics.median(b[kind] for b in result["blocks"][side])

    return {
        "width": width, "p": p, "ghosts": ghosts, "optimizer": args.optimizer, "rounds": args.rounds,
        "tp_train_ms": med("TP", "train"), "pp_train_ms": med("PP", "train"),
        "train_ratio": statistics.median(result["ratios"]["train"]), "train_ratios": result["ratios"]["train"],
        "tp_predict_ms": med("TP", "predict"), "pp_predict_ms": med("PP", "predict"),
        "predict_ratio": statistics.median(result["ratios"]["predict"]),
        "predict_ratios": result["ratios"]["predict"],
        "bound": 1 / p + p * ghosts / width, "flop_ratio": flops,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pp_vs_tp.py --user", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096])
    parser.add_argument("--p", type=int, nargs="+", default=[2])
    parser.add_argument("--ghosts", type=int, nargs="+", default=[32])
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    parser.add_argument("--rounds", type=int, default=3, help="PP blocks, each between two TP blocks")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for p in args.p:
        for n in args.widths:
            if p < 2 or n % p:
                parser.error(f"need p >= 2 dividing the width; got p = {p}, n = {n}")
    rows = [measure(n, p, k, args) for p in args.p for n in args.widths for k in args.ghosts if k <= n // p]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"User defaults: PhantomStrategy(ghosts=k) vs ModelParallelStrategy + parallelize_ffn, "
          f"{args.optimizer} as torch gives it, [{D_IN}, n x {DEPTH + 1}, {D_OUT}], {ROWS} rows, "
          f"{args.rounds} rounds of {args.warmup}+{args.steps} steps.")
    head = (f"{'p':>2} {'n':>5} {'k':>3} | {'TP ms':>7} {'PP ms':>7} {'PP/TP':>6} | {'TP fwd':>7} {'PP fwd':>7} "
            f"{'PP/TP':>6} {'bound':>6} | {'FLOPs':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['p']:>2} {r['width']:>5} {r['ghosts']:>3} | {r['tp_train_ms']:7.1f} {r['pp_train_ms']:7.1f} "
              f"{r['train_ratio']:6.3f} | {r['tp_predict_ms']:7.1f} {r['pp_predict_ms']:7.1f} "
              f"{r['predict_ratio']:6.3f} {r['bound']:6.3f} | {r['flop_ratio']:6.3f}")
    print("train: median step (forward, backward, optimizer); fwd: median predict step. PP/TP: median over\n"
          "rounds of PP over the mean of the TP blocks around it. bound: 1/p + p*k/n. FLOPs: cost-model ratio.")


if __name__ == "__main__":
    sys.exit(main())
