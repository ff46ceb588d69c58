"""One transformer block, phantom (PP) against tensor parallelism (TP), side by side: training step and forward only.

    python benchmarks/transformer.py                         # d = 1024 and 2048, p = 2, k = 32
    python benchmarks/transformer.py --widths 1024 --reps 5 --json
    python benchmarks/transformer.py --gpt --widths 128 --heads 4 --batch 16 --seq 64 --reps 20

The block is the app's GPT block (``lightning_phantom.app.gpt.Block``: pre-norm, separate q, k, v,
out, fc1 → GELU → fc2, ``F.scaled_dot_product_attention`` causal), ``--heads`` heads, MLP width
``--mlp-ratio``·d, on ``--batch`` sequences of ``--seq`` tokens whose input needs grad (as inside a
stack). The script spawns ``p`` gloo processes (one thread each) and builds, from one seeded dense
block, each side:

* **PP** — the block as ``model=gpt strategy=phantom`` runs it: one block of the phantom stack
  (``PhantomTransformerEncoderLayer``, ``--ghosts`` ghosts in each of its 4 phantom layers) on this
  rank's d/p columns of the residual stream, which stays split between blocks (the stack's entry
  and exit, once per stack, are not part of a block).
* **TP** — the block laid out with ``parallelize_block`` (torchtitan's plan, what ``model=gpt
  strategy=tp`` runs): colwise q/k/v/fc1, rowwise out/fc2, 2 all-reduces of rows·d each way.
* **dense** — the whole block on every rank: the reference TP divides (the FLOP ratio TP/dense
  is 1/p), a check of the measurement itself.
* **scores** — the attention scores alone, ``scaled_dot_product_attention`` on one rank's h/p heads
  (forward, and forward + backward for the step), the same in PP and TP: phantom parallelism, which
  compresses what crosses between ranks and the linears' off-diagonal blocks, does not reduce them.
  Their share of each side's step is reported.

Each measured PP/TP time ratio is printed beside the cost model's multiply-add ratio
(``lightning_phantom.cost.transformer.stack_cost``, one block), training step and forward.

``--gpt`` times the app's whole GPT under TP instead (``parallelize_gpt``, loss and backward as
``GPTModule`` runs them), with the head replicated against vocab-parallel (``loss_parallel``): the
measurement behind ``model.tp_head``'s default.

A training step is forward, backward of ``(out · g).sum()`` for a fixed random ``g``, and a fused
AdamW step; forward only runs under ``torch.no_grad``. Cases alternate in a rotating order,
``--warmup`` + ``--reps`` each; each rank times its own case from a barrier, the slowest rank sets a
repetition's time, and the report gives medians of wall time and of CPU time (the process's own:
the work a step costs, steadier than wall time when other jobs share the cores). Bytes and
multiply-adds of one step of PP, TP and dense are counted (``CommCounter``, ``LocalFlopCounterMode``)
and checked against the cost model. On a shared machine read the ratios of CPU times, and re-run
final figures on a quiet one.
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
import torch.nn.functional as F

import lightning_phantom.app.gpt_blocks  # noqa: F401  the GPT's blocks as a stack kind phantom converts
from lightning_phantom.app.gpt import Block, Blocks
from lightning_phantom.app.tensor_parallel import GPT_HEADS, parallelize_block, parallelize_gpt
from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode
from lightning_phantom.cost.transformer import stack_cost
from lightning_phantom.nn.convert import to_phantom

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # as when run as a script, also when imported
from overheads import join_process_group  # noqa: E402

SIDES = ("PP", "TP", "dense", "scores")
COUNTED = ("PP", "TP", "dense")
MODES = ("train", "forward")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scores(torch.nn.Module):
    """Causal attention scores on (batch, heads, seq, head_dim) queries, keys and values."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _case(module, loss_of, optimizer) -> dict:
    """A case's three callables: ``forward`` (no grad), ``pass`` (forward + backward) and ``train``
    (forward, backward, optimizer step); ``loss_of(module)`` runs forward and returns what to
    backpropagate (``module.backward`` where the module has its own, as GPTModule does)."""
    backward = getattr(module, "backward", None) or (lambda loss: loss.backward())

    def forward() -> None:
        with torch.no_grad():
            loss_of(module)

    def fwd_bwd() -> None:
        backward(loss_of(module))

    def train() -> None:
        fwd_bwd()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return {"forward": forward, "pass": fwd_bwd, "train": train, "module": module}


def build(side: str, width: int, args, p: int) -> dict:
    """One side's case (``_case``): the block (PP, TP or dense) or the scores alone, on an input that
    needs grad (PP: this rank's columns of it), loss ``(out · g).sum()``, fused AdamW."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)  # the same dense block and data on every rank
    dense = Block(width, args.heads, args.mlp_ratio)
    x = torch.randn(args.batch, args.seq, width)
    if side == "scores":  # q, k, v of one rank's heads
        module = Scores()
        x = torch.randn(3, args.batch, args.heads // p, args.seq, width // args.heads)
    elif side == "PP":  # one block of the phantom stack, on this rank's columns of the stream
        stack = to_phantom(Blocks([copy.deepcopy(dense)]), args.ghosts, dist.group.WORLD, init="svd")
        module, rank = stack.layers[0], dist.get_rank()
        x = x[..., rank * width // p:(rank + 1) * width // p].contiguous()
    elif side == "TP":
        module = parallelize_block(copy.deepcopy(dense), init_device_mesh("cpu", (p,)))
    else:
        module = dense
    params = list(module.parameters())
    with torch.no_grad():
        g = torch.randn_like(module(x))
    x.requires_grad_()

    def loss_of(m):
        x.grad = None
        return (m(x) * g).sum()

    return _case(module, loss_of, torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None)


def build_gpt(head: str, args, p: int) -> dict:
    """``--gpt``: the app's whole GPT under TP (``parallelize_gpt``) with the head ``head``, its loss
    and backward as ``GPTModule`` runs them (``loss_parallel`` for a vocab-parallel head)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_phantom.app.language_model import GPTModule

    torch.manual_seed(0)
    module = GPTModule(vocab=256, context=args.seq, width=args.widths[0], layers=args.layers, heads=args.heads,
                       mlp_ratio=args.mlp_ratio, tp_head=head)
    parallelize_gpt(module.gpt, init_device_mesh("cpu", (p,)), head)
    module._vocab_parallel = head == "vocab_parallel"  # what configure_model sets
    batch = (torch.randint(0, 256, (args.batch, args.seq)), torch.randint(0, 256, (args.batch, args.seq)))
    return _case(module, lambda m: m._loss(batch), module.configure_optimizers())


def step(case: dict, mode: str) -> tuple[float, float]:
    """One training step or forward from a barrier: this rank's wall and CPU seconds."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    case[mode]()
    return time.perf_counter() - start, time.process_time() - cpu


def count(case: dict) -> dict:
    """Bytes this rank sends and multiply-adds it runs in one forward + backward."""
    with CommCounter() as comm, LocalFlopCounterMode(display=False) as flops:
        case["pass"]()
    case["module"].zero_grad(set_to_none=True)
    return {"sent_bytes": float(comm.sent_bytes), "macs": flops.get_total_flops() // 2}


def time_cases(cases: dict, args) -> dict:
    """Every (case, mode) alternating in a rotating order; medians over repetitions of the slowest rank."""
    keys = [(name, mode) for name in cases for mode in MODES]
    for _ in range(args.warmup):
        for name, mode in keys:
            step(cases[name], mode)
    times = {key: [] for key in keys}
    for rep in range(args.reps):
        shift = rep % len(keys)  # no case always first, or always after the same neighbour
        for key in keys[shift:] + keys[:shift]:
            times[key].append(step(cases[key[0]], key[1]))
    out = {}
    for key, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # per repetition, wall and CPU of the slowest rank
        out[key] = {"wall_s": statistics.median(t[:, 0].tolist()), "cpu_s": statistics.median(t[:, 1].tolist())}
    return out


def measure(width: int, args) -> dict:
    """On every rank: the block's sides timed (``time_cases``), TP's and dense's step counted."""
    p = dist.get_world_size()
    cases = {side: build(side, width, args, p) for side in SIDES}
    counted = {side: count(cases[side]) for side in COUNTED}
    return {"times": time_cases(cases, args), "counted": counted}


def measure_heads(args) -> dict:
    """``--gpt``: the TP GPT with a replicated head against a vocab-parallel one, timed and counted."""
    p = dist.get_world_size()
    cases = {head: build_gpt(head, args, p) for head in GPT_HEADS}
    counted = {head: count(case) for head, case in cases.items()}
    times = time_cases(cases, args)
    return {head: {**counted[head], **{f"{mode}_{clock}": times[(head, mode)][clock]
                                       for mode in MODES for clock in ("wall_s", "cpu_s")}} for head in GPT_HEADS}


def block_cost(side: str, width: int, args, p: int):
    """The cost model's figures for one block of a stack (``stack_cost``'s first block, input needing grad)."""
    scheme, q = {"PP": ("phantom", p), "TP": ("tensor", p), "dense": ("tensor", 1)}[side]
    return stack_cost(scheme, width, args.heads, args.mlp_ratio * width, 1, q, args.batch, args.seq, args.ghosts,
                      norm_first=True, input_requires_grad=True).blocks[0]


def summarise(width: int, raw: dict, args, p: int) -> dict:
    """The row the report prints: times, ratios and the cost model's figures for one width."""
    t = raw["times"]
    model = {side: block_cost(side, width, args, p) for side in COUNTED}
    row = {"width": width, "p": p, "ghosts": args.ghosts, "heads": args.heads, "batch": args.batch, "seq": args.seq,
           "reps": args.reps}
    for (side, mode), v in t.items():
        row[f"{side}_{mode}_ms"], row[f"{side}_{mode}_cpu_ms"] = 1e3 * v["wall_s"], 1e3 * v["cpu_s"]
    for mode in MODES:
        for clock in ("wall_s", "cpu_s"):
            tag = "" if clock == "wall_s" else "_cpu"
            row[f"pp_tp_{mode}{tag}"] = t[("PP", mode)][clock] / t[("TP", mode)][clock]
            row[f"tp_dense_{mode}{tag}"] = t[("TP", mode)][clock] / t[("dense", mode)][clock]
            for side in ("PP", "TP"):
                row[f"scores_share_{side}_{mode}{tag}"] = t[("scores", mode)][clock] / t[(side, mode)][clock]
    scores = model["TP"].part("attention")  # the same h/p heads on a PP rank
    for mode, macs in (("train", lambda c: c.macs), ("forward", lambda c: c.macs_fwd)):
        row[f"flop_ratio_pp_tp_{mode}"] = macs(model["PP"]) / macs(model["TP"])
        row[f"flop_ratio_tp_dense_{mode}"] = macs(model["TP"]) / macs(model["dense"])  # 1/p
        for side in ("PP", "TP"):
            row[f"scores_flop_share_{side}_{mode}"] = macs(scores) / macs(model[side])
    row["bytes_ratio_pp_tp"] = float(model["PP"].sent_bytes / model["TP"].sent_bytes)
    for side in COUNTED:
        row[f"{side}_sent_bytes"], row[f"{side}_macs"] = raw["counted"][side]["sent_bytes"], raw["counted"][side]["macs"]
        row[f"{side}_model_bytes"], row[f"{side}_model_macs"] = float(model[side].sent_bytes), model[side].macs
    row["counts_match_model"] = all(row[f"{s}_sent_bytes"] == row[f"{s}_model_bytes"]
                                    and row[f"{s}_macs"] == row[f"{s}_model_macs"] for s in COUNTED)
    return row


def report(rows: list[dict], args) -> str:
    lines = [f"One GPT block, p = {args.p}, k = {args.ghosts}, {args.heads} heads, MLP {args.mlp_ratio}·d, "
             f"{args.batch} × {args.seq} tokens, float32, gloo, 1 thread per rank; medians of {args.reps} "
             f"repetitions (slowest rank), after {args.warmup} warm-up; times wall ms / CPU ms, ratios wall / CPU.",
             f"{'d':>5} {'mode':>7} | {'PP':>15} {'TP':>15} {'dense':>15} | {'PP/TP':>11} {'FLOPs':>5} | "
             f"{'TP/dense':>11} {'FLOPs':>5} | {'scores % of PP':>14} {'(FLOPs)':>7} | {'scores % of TP':>14} "
             f"{'(FLOPs)':>7}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        for mode in MODES:
            def pair(side: str) -> str:
                return f"{r[f'{side}_{mode}_ms']:7.1f}/{r[f'{side}_{mode}_cpu_ms']:7.1f}"

            def ratio(key: str) -> str:
                return f"{r[f'{key}_{mode}']:5.3f}/{r[f'{key}_{mode}_cpu']:5.3f}"

            def share(side: str) -> str:
                return (f"{100 * r[f'scores_share_{side}_{mode}']:6.1f}/{100 * r[f'scores_share_{side}_{mode}_cpu']:5.1f}%"
                        f" {100 * r[f'scores_flop_share_{side}_{mode}']:6.1f}%")

            lines.append(f"{r['width']:>5} {mode:>7} | {pair('PP')} {pair('TP')} {pair('dense')} | {ratio('pp_tp')} "
                         f"{r[f'flop_ratio_pp_tp_{mode}']:5.3f} | {ratio('tp_dense')} "
                         f"{r[f'flop_ratio_tp_dense_{mode}']:5.3f} | {share('PP')} | {share('TP')}")
    lines.append("FLOPs: the cost model's ratio of multiply-adds (cost.transformer.stack_cost, one block). scores: "
                 "attention scores (SDPA on one rank's h/p heads, the same in PP and TP) as a share of each side's "
                 "step, measured wall/CPU and (FLOPs) in the cost model.")
    lines.append("bytes per block PP/TP (cost model): " + ", ".join(
        f"d = {r['width']}: {r['bytes_ratio_pp_tp']:.4f}" for r in rows)
        + "; counted bytes and multiply-adds = model: " + ", ".join(f"{r['counts_match_model']}" for r in rows))
    return "\n".join(lines)


def report_heads(heads: dict, args) -> str:
    rep, vp = heads["replicated"], heads["vocab_parallel"]
    lines = [f"The TP GPT (d = {args.widths[0]}, {args.layers} blocks, {args.heads} heads, vocabulary 256, {args.batch} × "
             f"{args.seq} tokens), p = {args.p}: head replicated against vocab-parallel (loss_parallel); medians of "
             f"{args.reps} repetitions (slowest rank), wall ms / CPU ms.",
             f"{'head':<15} {'train':>17} {'forward':>17} {'sent B/step':>12} {'MACs/step':>12}"]
    for name, h in heads.items():
        lines.append(f"{name:<15} {1e3 * h['train_wall_s']:8.1f}/{1e3 * h['train_cpu_s']:8.1f} "
                     f"{1e3 * h['forward_wall_s']:8.1f}/{1e3 * h['forward_cpu_s']:8.1f} {h['sent_bytes']:12.0f} "
                     f"{h['macs']:12d}")
    lines.append("vocab-parallel / replicated: train " + " / ".join(
        f"{vp[f'train_{c}'] / rep[f'train_{c}']:.3f}" for c in ("wall_s", "cpu_s")) + " (wall / CPU), forward "
        + " / ".join(f"{vp[f'forward_{c}'] / rep[f'forward_{c}']:.3f}" for c in ("wall_s", "cpu_s"))
        + f", bytes {vp['sent_bytes'] / rep['sent_bytes']:.3f}, MACs {vp['macs'] / rep['macs']:.3f}")
    return "\n".join(lines)


def _worker(rank: int, args, port: int) -> None:
    join_process_group(rank, args.p, port, f"transformer-{port}")
    torch.set_flush_denormal(True)  # subnormal floats would slow some cases and not others
    try:
        if args.gpt:
            heads = measure_heads(args)
            if rank == 0:
                print(json.dumps(heads) if args.json else report_heads(heads, args), flush=True)
            return
        rows = [summarise(width, measure(width, args), args, args.p) for width in args.widths]
        if rank == 0:
            print("\n".join(json.dumps(r) for r in rows) if args.json else report(rows, args), flush=True)
    finally:
        dist.destroy_process_group()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=2, help="ranks (processes), default 2")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp-ratio", type=int, default=4)
    parser.add_argument("--ghosts", type=int, default=32, help="PP: ghosts per rank of each phantom layer, default 32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median), default 5")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per width")
    parser.add_argument("--gpt", action="store_true",
                        help="instead: the whole TP GPT (width: the first of --widths, --layers blocks), head "
                             "replicated against vocab-parallel")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the GPT for --gpt, default 2")
    args = parser.parse_args(argv)
    if args.p < 2:
        parser.error(f"--p must be >= 2 (a group of one sends nothing), got {args.p}")
    if args.heads % args.p:
        parser.error(f"--heads {args.heads} is not divisible by --p {args.p}: each rank computes heads/p heads")
    for width in args.widths:
        if width % args.heads:
            parser.error(f"width {width} is not divisible by --heads {args.heads}")
        if not args.gpt and not 1 <= args.ghosts <= width // args.p:
            parser.error(f"--ghosts {args.ghosts} must be in 1 .. d/p = {width // args.p} for width {width}: a rank "
                         f"compresses its d/p features into at most that many")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    mp.spawn(_worker, args=(args, _free_port()), nprocs=args.p, join=True)


if __name__ == "__main__":
    sys.exit(main())
