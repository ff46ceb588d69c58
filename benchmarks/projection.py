"""Project time and energy per training step of PP and TP from 2 to 1024 GPUs.

    python benchmarks/projection.py                                   # H100 SXM, table + projection.png
    python benchmarks/projection.py --calibrate pp_vs_tp.jsonl --out /tmp/projection.png

The per-rank FLOPs, collectives and sent bytes of one step come from the project's cost
model (``lightning_phantom.cost.model``: ``phantom_cost`` / ``tp_cost``, the same functions the
tests hold equal to counted bytes and FLOPs). This script adds:

* compute: FLOPs / (peak × MFU) per layer, and Adam's update as HBM traffic;
* network: the α–β model of ring collectives, per call ``steps·α + sent_bytes/β`` with
  steps = p−1 (all-gather, reduce-scatter) or 2(p−1) (all-reduce); α and β are NVLink's
  within a node (p <= GPUs per node) and InfiniBand's beyond (a ring crossing nodes runs
  at the slowest link);
* overlap: PP hides its ghost all-gather behind the local-block matmul and its
  reduce-scatter behind the local weight/input gradients (docs/operator.md §3 steps 2–3,
  §4 steps 2–3); TP hides the column layer's input-gradient all-reduce behind its weight
  gradient (Megatron's async all-reduce) and nothing else;
* energy: p × (busy power × compute time + communication power × exposed communication).
* the data axis (printed after the table): ``--group`` GPUs of a node in a phantom/TP group
  (8) times ``--replicas`` (32) across nodes, 256 GPUs by default; ``data_axis_cost`` gives each
  mode's collectives, run over the inter-node α–β link. ``ddp``'s all-reduce is hidden behind
  backward, FSDP2's all-gather behind forward and its all-gather + reduce-scatter behind
  backward; only the excess is exposed. PP with ``ddp`` and ``fsdp`` is set against FSDP2 × TP
  (Lightning's ``ModelParallelStrategy``), TP with ``ddp`` shown for reference.

Two scalings: fixed width (``--width``) and width growing as sqrt(p) from ``--base-width``
at p = 1 (TP's parameters per rank constant). With ``--calibrate`` (JSON lines from
``benchmarks/pp_vs_tp.py --json``) the CPU runs give: the effective CPU FLOP rate, and PP's
measured step time over its FLOP bound, which is carried over as a slowdown of PP's compute
(its small ghost GEMMs run below the big GEMMs' rate). Every assumption is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from fractions import Fraction

from lightning_phantom.cost.data_axis import data_axis_cost
from lightning_phantom.cost.model import accumulation_size, phantom_cost, tp_cost

# Documented figures (vendor data sheets); MFU and powers other than TDP are assumptions.
GPUS = {
    "h100": {
        "name": "H100 SXM", "peak_flops": 989e12, "tdp_w": 700.0, "hbm_bps": 3.35e12, "gpus_per_node": 8,
        "intra_bps": 450e9, "inter_bps": 50e9,
        "notes": "989 TFLOP/s dense BF16; 700 W TDP; HBM3 3.35 TB/s; NVLink 4 900 GB/s bidirectional = "
                 "450 GB/s per direction; InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one NIC per GPU)",
    },
    "a100": {
        "name": "A100 SXM 80GB", "peak_flops": 312e12, "tdp_w": 400.0, "hbm_bps": 2.04e12, "gpus_per_node": 8,
        "intra_bps": 300e9, "inter_bps": 25e9,
        "notes": "312 TFLOP/s dense BF16; 400 W TDP; HBM2e 2.04 TB/s; NVLink 3 600 GB/s bidirectional = "
                 "300 GB/s per direction; InfiniBand HDR 200 Gb/s = 25 GB/s per GPU",
    },
}
# Ring algorithm: latency steps per call (each step one message to the next rank).
RING_STEPS = {"all_gather": lambda p: p - 1, "reduce_scatter": lambda p: p - 1,
              "all_reduce": lambda p: 2 * (p - 1)}
# Mixed-precision Adam: read bf16 weight and grad, fp32 master, m, v (16 B); write master, m, v
# and the bf16 weight copy (14 B).
ADAM_BYTES_PER_PARAM = 16 + 14


class Model:
    def __init__(self, args, gpu: dict, pp_slowdown: float) -> None:
        self.a, self.gpu, self.pp_slowdown = args, gpu, pp_slowdown
        self.rate = gpu["peak_flops"] * args.mfu

    def link(self, p: int) -> tuple[float, float]:
        """(α seconds per ring step, β bytes/s) for a ring over p GPUs."""
        if p <= self.gpu["gpus_per_node"]:
            return self.a.alpha_intra_us * 1e-6, self.gpu["intra_bps"]
        return self.a.alpha_inter_us * 1e-6, self.gpu["inter_bps"]

    def comm_time(self, collectives, sent_bytes, p: int) -> float:
        alpha, beta = self.link(p)
        return sum(RING_STEPS[op](p) * alpha for op, _ in collectives) + float(sent_bytes) / beta

    def step(self, cost, p: int) -> dict:
        """Seconds and joules of one step on each of p GPUs, from a cost.StepCost."""
        compute = exposed = comm_total = 0.0
        slow = self.pp_slowdown if cost.scheme == "phantom" else 1.0
        for layer in cost.per_layer:
            t_fwd, t_bwd = 2 * layer.macs_fwd / self.rate * slow, 2 * layer.macs_bwd / self.rate * slow
            c_fwd = self.comm_time(layer.collectives_fwd, layer.sent_bytes_fwd, p)
            c_bwd = self.comm_time(layer.collectives_bwd, layer.sent_bytes_bwd, p)
            hide_fwd = hide_bwd = 0.0
            if self.a.overlap and layer.kind == "phantom":
                local = 2 * (layer.n_out // p) * (layer.n_in // p) * cost.rows / self.rate * slow
                hide_fwd, hide_bwd = local, 2 * local  # local block forward; dL_i and local dX_i backward
            elif self.a.overlap and layer.kind == "colwise":
                hide_bwd = 2 * (layer.n_out // p) * layer.n_in * cost.rows / self.rate  # weight gradient
            compute += t_fwd + t_bwd
            exposed += max(0.0, c_fwd - hide_fwd) + max(0.0, c_bwd - hide_bwd)
            comm_total += c_fwd + c_bwd
        optimizer = cost.params * ADAM_BYTES_PER_PARAM / self.gpu["hbm_bps"]
        busy = compute + optimizer
        time = busy + exposed
        energy = p * self.gpu["tdp_w"] * (self.a.busy_power * busy + self.a.comm_power * exposed)
        return {"time": time, "compute": busy, "comm": comm_total, "exposed": exposed, "energy": energy,
                "memory": cost.params * self.a.bytes_per_param}


def data_axis_step(args, model: Model, cost, p: int, replicas: int, mode: str) -> dict:
    """One step of a phantom/TP group of ``p`` GPUs in a node, times ``replicas`` across nodes.

    The data axis (``data_axis_cost``) runs over the inter-node network (a ring of ``replicas``
    GPUs, one per node, each with its own NIC). ``"ddp"``: the gradient all-reduce runs
    bucket by bucket during backward, so only what outlasts the backward compute is exposed.
    ``"fsdp"`` (FSDP2): the forward all-gather is prefetched under the forward compute, the
    backward all-gather and the gradient reduce-scatter under the backward compute.
    """
    group = model.step(cost, p)
    data = data_axis_cost(cost.params, replicas, mode, args.element_size)
    alpha, beta = model.link(p * replicas) if replicas > 1 else (0.0, 1.0)
    # Time of one call of each kind (FSDP2's two all-gathers are alike: one before forward, one before backward).
    ring = {op: RING_STEPS[op](replicas) * alpha + float(n) * args.element_size * _ring_factor(op, replicas) / beta
            for op, n in data.calls} if replicas > 1 else {}
    fwd = sum(2 * layer.macs_fwd for layer in cost.per_layer) / model.rate
    bwd = sum(2 * layer.macs_bwd for layer in cost.per_layer) / model.rate
    if cost.scheme == "phantom":
        fwd, bwd = fwd * model.pp_slowdown, bwd * model.pp_slowdown
    calls = [op for op, _ in data.calls]
    comm = sum(RING_STEPS[op](replicas) * alpha for op in calls) + float(data.sent_bytes) / beta if calls else 0.0
    if not args.overlap:
        exposed = comm
    elif mode == "ddp":
        exposed = max(0.0, comm - bwd)
    else:
        gather = ring.get("all_gather", 0.0)
        exposed = max(0.0, gather - fwd) + max(0.0, gather + ring.get("reduce_scatter", 0.0) - bwd)
    time = group["time"] + exposed
    gpus = p * replicas
    energy = gpus * model.gpu["tdp_w"] * (args.busy_power * group["compute"]
                                          + args.comm_power * (group["exposed"] + exposed))
    memory = cost.params * args.bytes_per_param / (replicas if mode == "fsdp" else 1)
    return {"time": time, "group_time": group["time"], "data_comm": comm, "data_exposed": exposed,
            "data_bytes": float(data.sent_bytes), "model_bytes": float(cost.sent_bytes), "energy": energy,
            "memory": memory}


def _ring_factor(op: str, d: int) -> float:
    """Bytes sent per payload byte by one rank in a ring collective over d ranks (calls in ``data.calls``
    give the all-gather's input shard and the reduce-scatter's whole input)."""
    return {"all_gather": d - 1, "reduce_scatter": (d - 1) / d, "all_reduce": 2 * (d - 1) / d}[op]


def project_data_axis(args, model: Model) -> list[dict]:
    """PP (ddp and fsdp on the data axis) against FSDP2 x TP, groups of ``--group`` GPUs x ``--replicas``."""
    p, d = args.group, args.replicas
    k = min(args.ghosts, args.width // p)
    sizes = [args.d_in] + [args.width] * (args.layers + 1) + [args.d_out]
    costs = {"TP": tp_cost(sizes, p, args.rows, args.element_size),
             "PP": phantom_cost(sizes, p, k, args.rows, args.element_size)}
    sides = {f"{scheme} {mode}": data_axis_step(args, model, costs[scheme], p, d, mode)
             for scheme in ("TP", "PP") for mode in ("fsdp", "ddp")}
    tp = sides["TP fsdp"]  # Lightning's ModelParallelStrategy: FSDP2 x TP
    return [{"side": side, "p": p, "replicas": d, "gpus": p * d, "width": args.width, "ghosts": k, **row,
             "time_ratio": row["time"] / tp["time"], "energy_ratio": row["energy"] / tp["energy"],
             "bytes_ratio": (row["model_bytes"] + row["data_bytes"]) / (tp["model_bytes"] + tp["data_bytes"]),
             "memory_ratio": row["memory"] / tp["memory"]} for side, row in sides.items()]


def print_data_axis(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\nData axis: {r0['gpus']} GPUs = {r0['replicas']} replicas (one per node, across InfiniBand) x "
          f"groups of {r0['p']} in a node; n = {r0['width']}, k = {r0['ghosts']}; PP/TP against FSDP2 x TP")
    head = (f"{'side':>8} | {'ms':>8} {'group ms':>8} {'data ms':>8} {'exposed':>8} | {'model MiB':>9} "
            f"{'data MiB':>9} | {'GiB/GPU':>7} | {'time':>6} {'energy':>6} {'bytes':>6} {'memory':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['side']:>8} | {r['time'] * 1e3:>8.3f} {r['group_time'] * 1e3:>8.3f} {r['data_comm'] * 1e3:>8.3f} "
              f"{r['data_exposed'] * 1e3:>8.3f} | {r['model_bytes'] / 2**20:>9.2f} {r['data_bytes'] / 2**20:>9.2f} | "
              f"{r['memory'] / 2**30:>7.3f} | {r['time_ratio']:>6.3f} {r['energy_ratio']:>6.3f} "
              f"{r['bytes_ratio']:>6.3f} {r['memory_ratio']:>6.3f}")
    print("data ms: the data-axis collectives' α–β time; exposed: what backward/forward compute does not hide;\n"
          "bytes: model + data axis per GPU; memory: parameters + gradients + optimizer state per GPU.")


def width(args, scaling: str, p: int) -> int:
    n = args.width if scaling == "fixed" else args.base_width * math.sqrt(p)
    return max(p, round(n / p) * p)  # divisible by p


def project(args, model: Model, scaling: str) -> list[dict]:
    rows = []
    for p in args.gpus:
        n = width(args, scaling, p)
        k = min(args.ghosts, n // p)
        sizes = [args.d_in] + [n] * (args.layers + 1) + [args.d_out]
        pp_cost = phantom_cost(sizes, p, k, args.rows, args.element_size)
        tp_cost_ = tp_cost(sizes, p, args.rows, args.element_size)
        pp, tp = model.step(pp_cost, p), model.step(tp_cost_, p)
        rows.append({"scaling": scaling, "p": p, "width": n, "ghosts": k, "pp": pp, "tp": tp,
                     "time_ratio": pp["time"] / tp["time"], "energy_ratio": pp["energy"] / tp["energy"],
                     "flop_ratio": pp_cost.flops / tp_cost_.flops,
                     "bytes_ratio": float(pp_cost.sent_bytes / tp_cost_.sent_bytes)})
    return rows


def calibrate(path: str, ghosts: int) -> tuple[float, list[str]]:
    """PP's slowdown over its FLOP bound, and lines describing the CPU runs."""
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    if not runs:
        raise ValueError(f"{path} holds no JSON lines; produce it with benchmarks/pp_vs_tp.py --json")
    lines = []
    for r in runs:
        model = tp_cost(r["sizes"], r["p"], r["rows"], 4)
        rate = model.flops / (r["tp_step_ms"] * 1e-3)
        lines.append(f"CPU run p={r['p']} n={r['width']} k={r['ghosts']}: TP {r['tp_step_ms']:.0f} ms/step = "
                     f"{rate / 1e9:.1f} GFLOP/s per rank; PP/TP time {r['step_time_ratio']:.3f} vs FLOP "
                     "bound "
                     f"{r['flop_ratio']:.3f} (x{r['time_over_bound']:.3f}); bytes {r['bytes_ratio']:.5f}")
    same = [r for r in runs if r["ghosts"] == ghosts]
    measured = statistics.median(r["time_over_bound"] for r in same or runs)
    # Below 1, PP beat its FLOP bound on the CPU because TP lost time elsewhere (DTensor,
    # all-reduces over gloo); that is not credited to PP on the GPU.
    slowdown = max(1.0, measured)
    which = f"runs with k={ghosts}" if same else "all runs"
    lines.append(f"PP compute slowdown carried to the GPU projection: x{slowdown:.3f} (median time/bound of "
                 f"{which} = {measured:.3f}, floored at 1)")
    return slowdown, lines


def assumptions(args, gpu: dict, slowdown: float) -> list[str]:
    overlap = ("PP ghost gather under the local block, reduce-scatter under local gradients; TP async "
               "input-gradient all-reduce under the weight gradient" if args.overlap else "none")
    return [
        f"GPU: {gpu['name']} ({gpu['notes']}).",
        f"Achieved GEMM rate: {args.mfu:.0%} of peak (MFU, assumed) = "
        f"{gpu['peak_flops'] * args.mfu / 1e12:.0f} TFLOP/s; PP compute additionally x{slowdown:.3f}.",
        f"Latency per ring step: {args.alpha_intra_us} us within a node (<= {gpu['gpus_per_node']} GPUs), "
        f"{args.alpha_inter_us} us across nodes (assumed, NCCL-like); ring algorithm, no tree, no SHARP.",
        "Bandwidth: a ring within a node runs at NVLink's per-direction rate, one across nodes at the NIC's.",
        f"Power: {args.busy_power:.0%} of TDP while computing, {args.comm_power:.0%} of TDP while waiting on "
        "communication (assumed); CPU, NIC, switch and cooling power excluded.",
        f"Model: sizes [{args.d_in}, n x {args.layers + 1}, {args.d_out}], {args.rows} rows per step "
        f"(batch x tokens), {args.element_size}-byte values (bf16), ghosts k = {args.ghosts} (at most n/p).",
        f"Optimizer: mixed-precision Adam, {ADAM_BYTES_PER_PARAM} bytes of HBM traffic per parameter per "
        "step; "
        f"memory {args.bytes_per_param} bytes per parameter per GPU (bf16 weight + grad, fp32 master, m, v).",
        f"Overlap: {overlap}.",
        f"Width: fixed n = {args.width}; and n = {args.base_width} * sqrt(p) (TP parameters per GPU "
        "constant), rounded to a multiple of p.",
        f"Beyond {gpu['gpus_per_node']} GPUs TP's full-width all-reduces cross InfiniBand, which is why TP "
        "is normally kept inside a node; the ratios there compare PP with TP where TP is not used in "
        "practice.",
        "Only time and energy per step are projected: a phantom model is a different (smaller) model, and "
        "the steps needed to reach a given loss are not modelled.",
    ]


def plot(rows: list[dict], path: str, title: str, node: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for scaling, style in (("fixed", "-"), ("sqrt", "--")):
        sel = [r for r in rows if r["scaling"] == scaling]
        if not sel:
            continue
        ps = [r["p"] for r in sel]
        tag = "fixed n" if scaling == "fixed" else "n ~ sqrt(p)"
        axes[0].loglog(ps, [r["tp"]["time"] * 1e3 for r in sel], "o" + style, color="C0", label=f"TP, {tag}")
        axes[0].loglog(ps, [r["pp"]["time"] * 1e3 for r in sel], "s" + style, color="C1", label=f"PP, {tag}")
        axes[1].loglog(ps, [r["tp"]["energy"] for r in sel], "o" + style, color="C0", label=f"TP, {tag}")
        axes[1].loglog(ps, [r["pp"]["energy"] for r in sel], "s" + style, color="C1", label=f"PP, {tag}")
        axes[2].semilogx(ps, [r["time_ratio"] for r in sel], "o" + style, color="C2", label=f"time, {tag}")
        axes[2].semilogx(ps, [r["energy_ratio"] for r in sel], "s" + style, color="C3",
                         label=f"energy, {tag}")
        axes[2].semilogx(ps, [r["flop_ratio"] for r in sel], ":", color="grey", label=f"FLOP ratio, {tag}")
    axes[0].set(xlabel="GPUs p", ylabel="time per step (ms)", title="Step time")
    axes[1].set(xlabel="GPUs p", ylabel="energy per step (J, all GPUs)", title="Step energy")
    axes[2].set(xlabel="GPUs p", ylabel="PP / TP", title="Ratios", ylim=(0, 1.2))
    for ax in axes:
        ax.axvline(node, color="grey", lw=0.8, ls="--")
        ax.text(node * 1.1, 0.97, "one node", transform=ax.get_xaxis_transform(), fontsize=7, color="grey",
                va="top")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2 ** i for i in range(1, 11)],
                        help="group sizes p (default 2 .. 1024)")
    parser.add_argument("--width", type=int, default=16384, help="fixed-width scaling: n (default 16384)")
    parser.add_argument("--base-width", type=int, default=4096, help="sqrt scaling: n at p = 1 (4096)")
    parser.add_argument("--ghosts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4, help="hidden n -> n layers (default 4)")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-out", type=int, default=1)
    parser.add_argument("--rows", type=int, default=8192, help="rows per step (batch x tokens), default 8192")
    parser.add_argument("--element-size", type=int, default=2, help="bytes per value (bf16 = 2)")
    parser.add_argument("--bytes-per-param", type=int, default=16)
    parser.add_argument("--mfu", type=float, default=0.5,
                        help="achieved fraction of the peak FLOP rate (default 0.5)")
    parser.add_argument("--alpha-intra-us", type=float, default=2.0)
    parser.add_argument("--alpha-inter-us", type=float, default=5.0)
    parser.add_argument("--busy-power", type=float, default=1.0, help="fraction of TDP while computing")
    parser.add_argument("--comm-power", type=float, default=0.45,
                        help="fraction of TDP while waiting on communication")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false")
    parser.add_argument("--group", type=int, default=8, help="data-axis projection: phantom/TP group (8)")
    parser.add_argument("--replicas", type=int, default=32, help="data-axis projection: replicas (32)")
    parser.add_argument("--calibrate", metavar="JSONL", help="output of benchmarks/pp_vs_tp.py --json")
    parser.add_argument("--out", default="projection.png", help="PNG to write (default projection.png)")
    parser.add_argument("--json", action="store_true", help="print the projection as JSON lines instead")
    args = parser.parse_args(argv)
    if args.group < 1 or args.replicas < 1 or args.width % args.group:
        parser.error(f"--group and --replicas must be >= 1 and --width divisible by --group; got --group "
                     f"{args.group} --replicas {args.replicas} --width {args.width}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    gpu = GPUS[args.gpu]
    slowdown, calib_lines = calibrate(args.calibrate, args.ghosts) if args.calibrate else (1.0, [])
    model = Model(args, gpu, slowdown)
    rows = project(args, model, "fixed") + project(args, model, "sqrt")
    data_rows = project_data_axis(args, model)
    if args.json:
        for r in rows + data_rows:
            print(json.dumps(r))
    else:
        print("Assumptions:")
        for line in assumptions(args, gpu, slowdown) + calib_lines:
            print("  - " + line)
        print()
        head = (f"{'scaling':>7} {'p':>5} {'n':>7} {'k':>3} | {'TP ms':>8} {'comm%':>5} {'PP ms':>8} "
                f"{'comm%':>5} {'time':>6} | {'TP J':>8} {'PP J':>8} {'energy':>6} | {'FLOPs':>6} "
                f"{'bytes':>7} | "
                f"{'TP GiB':>7} {'PP GiB':>7}")
        print(head)
        print("-" * len(head))
        for r in rows:
            tp, pp = r["tp"], r["pp"]
            print(f"{r['scaling']:>7} {r['p']:>5} {r['width']:>7} {r['ghosts']:>3} | "
                  f"{tp['time'] * 1e3:>8.3f} "
                  f"{100 * tp['exposed'] / tp['time']:>5.1f} {pp['time'] * 1e3:>8.3f} "
                  f"{100 * pp['exposed'] / pp['time']:>5.1f} {r['time_ratio']:>6.3f} | {tp['energy']:>8.2f} "
                  f"{pp['energy']:>8.2f} {r['energy_ratio']:>6.3f} | {r['flop_ratio']:>6.3f} "
                  f"{r['bytes_ratio']:>7.4f} | {tp['memory'] / 2**30:>7.2f} {pp['memory'] / 2**30:>7.2f}")
        # A hidden layer's bytes: PP's ghosts go in e bytes and their gradients' partial sums in
        # accumulation_size(e) (float32 under bf16); TP's sums go in e: p*k/n times (e + acc) / 2e.
        factor = Fraction(args.element_size + accumulation_size(args.element_size), 2 * args.element_size)
        print("comm% = exposed communication / step time; J = energy of all p GPUs; time, energy, FLOPs,\n"
              "bytes: PP/TP ratios (FLOPs and bytes per rank from the cost model; a hidden layer alone:\n"
              f"1/p + p*k/n and {'' if factor == 1 else f'{float(factor):g} x '}p*k/n, the partial sums in fp32); "
              "GiB = parameters + gradients + optimizer state per GPU.")
        print_data_axis(data_rows)
    title = (f"{gpu['name']}, MFU {args.mfu:.0%}, {args.rows} rows, k={args.ghosts}, {args.layers} hidden "
             f"layers, alpha {args.alpha_intra_us}/{args.alpha_inter_us} us"
             + (f", PP compute x{slowdown:.2f}" if slowdown != 1 else ""))
    plot(rows, args.out, title, gpu["gpus_per_node"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
