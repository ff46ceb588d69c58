"""What each default-on feature of ``PhantomStrategy`` costs a training step, on and off side by side.

    python benchmarks/overheads.py                       # n = 4096 and 1024, p = 2, SGD: ~3 min
    python benchmarks/overheads.py --widths 1024 --steps 40 --json

The model is what a user writes (issue 11): ``nn.Sequential(Linear(256, n), 4 x Linear(n, n),
Linear(n, 16))`` with ReLU between, batch 256, ``torch.optim.SGD``, trained with
``PhantomStrategy(ghosts=32)`` on 2 gloo ranks with one thread each (``init="random"``: the
SVD at set-up is not what is measured). Within ONE run the features are switched per step
in a cycle (step i runs variant i mod V), so every variant sees the same load, the same
process and the same memory; a variant's cost is its median step time minus the baseline's,
and also the median over its steps of (step - mean of the baseline steps next to it). Step
time is from ``on_train_batch_start`` to ``on_train_batch_end`` (the slowest rank's), and the
main thread's CPU time over the same window is given too: on a shared machine it moves less.

Variants:

* ``baseline`` — no guard, no monitor.
* ``guard`` — ``NonFiniteGuard`` as the strategy adds it (``detect_non_finite=True``).
* ``guard, max-abs pass`` — the guard's previous check for comparison: one
  ``torch._foreach_norm(grads, inf)`` after backward.
* ``energy`` — ``EnergyMonitor(meter="estimate")`` (RAPL is root-only here).
* ``data-parallel average`` — only with ``--data-parallel``: 2 replicas of phantom(1); the
  strategy's bucketed average against a per-tensor in-place all-reduce of the same gradients.

Every step, whatever the variant, the CPU time inside what the strategy always does, as shares
of a step: the batch check (``BatchCheck``: the fingerprint of each batch, the hashes it adds to
the next all-reduce and their verdict; phantom groups of 2 or more), the buffer broadcast
(``BufferSync``: data-parallel rank 0's buffers to the replicas; with ``--data-parallel
--batchnorm``, where there are some), the all-reduce of replicated gradients (which also carries
the guard's verdict and the batch hashes) and, with ``--data-parallel``, the gradient buckets'
hooks (flatten, start the all-reduce, write the mean back). 0 where it is inactive.

``--batchnorm`` puts a BatchNorm1d after every hidden Linear of the user's FFN.

Per fit, not per step: the per-FFN cost line the strategy logs at set-up
(``lightning_phantom.cost.model.summary``) is timed on its own and given in steps' worth.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

D_IN, D_OUT, ROWS, DEPTH = 256, 16, 256, 4


# ----------------------------------------------------------------- the user's model
def user_ffn(width: int, d_in: int = D_IN, d_out: int = D_OUT, depth: int = DEPTH,
             batchnorm: bool = False) -> nn.Sequential:
    """With ``batchnorm``, a BatchNorm1d after every hidden Linear (running statistics: buffers that change)."""
    norm = (lambda: [nn.BatchNorm1d(width)]) if batchnorm else list
    layers: list[nn.Module] = [nn.Linear(d_in, width), *norm()]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width), *norm()]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, d_out))


def make_optimizer(name: str, params, lr: float = 1e-3) -> torch.optim.Optimizer:
    """The optimizer as torch gives it: no fused/foreach flags (PyTorch picks, as for a user)."""
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in kinds:
        raise ValueError(f"optimizer must be one of {sorted(kinds)}, got {name!r}")
    return kinds[name](params, lr=lr)


def user_module(width: int, optimizer: str = "sgd", tensor_parallel: bool = False, batchnorm: bool = False):
    """A plain LightningModule around ``user_ffn``; with ``tensor_parallel`` its configure_model
    applies ``parallelize_ffn`` (what a ModelParallelStrategy user writes)."""
    import lightning.pytorch as pl

    class UserModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = user_ffn(width, batchnorm=batchnorm)
            self.parallelized = False

        def configure_model(self) -> None:
            if tensor_parallel and not self.parallelized:  # once: predict after fit calls it again
                from lightning_phantom.app.tensor_parallel import parallelize_ffn

                parallelize_ffn(self.net, self.device_mesh["tensor_parallel"])
                self.parallelized = True

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def predict_step(self, batch, batch_idx):
            return self.net(batch[0])

        def configure_optimizers(self):
            return make_optimizer(optimizer, self.parameters())

    return UserModule()


def user_data(steps: int, rows: int = ROWS) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(steps * rows, D_IN, generator=g),
                                          torch.randn(steps * rows, D_OUT, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=rows)


def launch(worker, nprocs: int, *args) -> list:
    """Run ``worker(rank, world, *args)`` on ``nprocs`` gloo ranks (1 thread each); rank 0's return value."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_entry, args=(nprocs, port, out, worker, args), nprocs=nprocs, join=True)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def join_process_group(rank: int, world: int, port: int, run_id: str) -> None:
    """One rank of a benchmark: the launcher's environment, quiet Lightning loggers, one thread, gloo."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
        NODE_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
        TORCHELASTIC_RUN_ID=run_id,
    )
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (creates its loggers, silenced next)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _entry(rank: int, world: int, port: int, out: str, worker, args) -> None:
    join_process_group(rank, world, port, f"bench-{port}")
    try:
        result = worker(rank, world, *args)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ switched features
def _switched(cls):
    """A subclass of callback ``cls`` whose hooks run only while ``self.on`` is True."""

    class Switched(cls):
        on = True
        spent = 0.0  # CPU seconds inside the switched hooks (this thread), while on
        by_hook: dict = {}  # the same, per hook name (one instance per class)

    for name in ("on_train_batch_end", "on_before_backward", "on_before_optimizer_step", "on_after_backward",
                 "local_verdict", "observe_bucket", "agree"):
        if hasattr(cls, name):
            def hook(self, *args, _name=name, **kwargs):
                if self.on:
                    start = time.thread_time()
                    try:
                        return getattr(cls, _name)(self, *args, **kwargs)
                    finally:
                        took = time.thread_time() - start
                        self.spent += took
                        self.by_hook[_name] = self.by_hook.get(_name, 0.0) + took
            setattr(Switched, name, hook)
    Switched.__name__ = f"Switched{cls.__name__}"
    return Switched


def _timing(function, spent: dict, label: str):
    """``function``, adding the CPU seconds (this thread) spent inside it to ``spent[label]``."""

    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.thread_time() - start

    return timed


def _timed(owner, name: str, spent: dict, label: str):
    """Replace ``owner.name`` by its ``_timing``; returns a function that puts the original back."""
    original = getattr(owner, name)
    setattr(owner, name, _timing(original, spent, label))
    return lambda: setattr(owner, name, original)


def _max_abs_guard():
    """The guard's check before issue 11: a max-abs pass over every gradient after backward."""
    from lightning.pytorch.callbacks import Callback

    class MaxAbsPass(Callback):
        def on_after_backward(self, trainer, pl_module):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.result = torch._foreach_norm(grads, float("inf"))

    return MaxAbsPass


def _in_place_average(optimizer, layout, data_group, device) -> None:
    """The data-parallel average without buckets: one in-place all-reduce per gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=data_group)
                p.grad.div_(layout.data)


def _overheads_worker(rank: int, world: int, width: int, steps: int, data_parallel: bool,
                      batchnorm: bool = False) -> dict:
    import lightning.pytorch as pl

    import lightning_phantom.strategy.data_parallel as phantom_module  # where DataAxis finds it
    import lightning_phantom.strategy.step as step_module
    from lightning_phantom.strategy.batches import BatchCheck
    from lightning_phantom.strategy.buffers import BufferSync
    from lightning_phantom.energy import EnergyMonitor
    from lightning_phantom.strategy import NonFiniteGuard, PhantomStrategy
    from lightning_phantom.strategy.grad_buckets import GradientBuckets

    # What the strategy does every step whatever the variant: CPU time inside it, per step (0: inactive).
    always: dict[str, float] = {}
    labels = ["batch check", "buffer broadcast", "replicated-gradient average"]
    restore = [_timed(BatchCheck, name, always, "batch check") for name in ("add", "riders", "mismatch")]
    restore += [_timed(BufferSync, name, always, "buffer broadcast") for name in ("before_batch", "before_save")]
    restore += [_timed(step_module, "average_replicated_gradients", always, "replicated-gradient average")]
    if data_parallel:
        labels.insert(2, "data-parallel buckets")
        restore += [_timed(GradientBuckets, name, always, "data-parallel buckets")
                    for name in ("_ready", "finish")]

    guard = _switched(NonFiniteGuard)()
    old = _switched(_max_abs_guard())()
    energy = _switched(EnergyMonitor)(meter="estimate", prog_bar=False)
    bucketed = phantom_module.average_gradients
    variants = {"baseline": [], "guard": [guard], "guard, max-abs pass": [old], "energy": [energy]}
    if data_parallel:
        variants = {"baseline": [], "data-parallel average: in place, per tensor": ["in-place"],
                    "guard (summing in the buckets' pass)": [guard]}
    names = list(variants)
    in_place_spent: dict[str, float] = {}
    timed_in_place = _timing(_in_place_average, in_place_spent, "cpu")
    wall: dict[str, list] = {v: [] for v in names}
    cpu: dict[str, list] = {v: [] for v in names}
    order: list[tuple[str, float, float]] = []

    class Cycle(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.variant = names[batch_idx % len(names)]
            for cb in (guard, old, energy):
                cb.on = cb in variants[self.variant]
            in_place = "in-place" in variants[self.variant]
            phantom_module.average_gradients = timed_in_place if in_place else bucketed
            axis = trainer.strategy.data_axis
            if batch_idx == 0:
                self.buckets = axis.buckets
            if self.buckets is not None:  # the in-place variant: no buckets at all for the step
                self.buckets.sync = not in_place
                axis.buckets = None if in_place else self.buckets
            self.t, self.c = time.perf_counter(), time.thread_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            order.append((self.variant, time.perf_counter() - self.t, time.thread_time() - self.c))

    strategy = PhantomStrategy(ghosts=32, init="random", detect_non_finite=False,
                               **({"data_parallel_size": 2} if data_parallel else {}))
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps,
                         callbacks=[Cycle(), guard, old, energy], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tempfile.mkdtemp(prefix="overheads-"))  # energy_summary.json
    trainer.fit(user_module(width, batchnorm=batchnorm), user_data(steps))
    phantom_module.average_gradients = bucketed
    for undo in restore:
        undo()
    warm = len(names) * 2  # the first two cycles warm up
    times = torch.tensor([[w, c] for _, w, c in order], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    for i, (variant, _, _) in enumerate(order):
        if i >= warm:
            wall[variant].append(times[i, 0].item())
            cpu[variant].append(times[i, 1].item())
    paired = {v: [] for v in names}
    for i in range(warm, len(order)):
        variant = order[i][0]
        near = [times[j, 0].item() for j in (i - i % len(names), i - i % len(names) + len(names))
                if warm <= j < len(order) and order[j][0] == "baseline"]
        if near and variant != "baseline":
            paired[variant].append(times[i, 0].item() - statistics.fmean(near))
    from lightning_phantom.cost.model import summary

    start = time.perf_counter()
    sizes = [D_IN] + [width] * (DEPTH + 1) + [D_OUT]
    summary(sizes, 2, 32)
    log_s = time.perf_counter() - start
    # CPU time inside each feature's own hooks per step it was on (warm-up included): robust to load
    on_steps = {v: sum(1 for o, _, _ in order if o == v) for v in names}
    bucket_steps = sum(n for v, n in on_steps.items() if "in-place" not in variants[v])  # steps with buckets
    in_hooks = {v: sum(cb.spent for cb in variants[v] if hasattr(cb, "spent")) / on_steps[v] for v in names}
    for v in names:
        if "in-place" in variants[v]:
            in_hooks[v] = in_place_spent.get("cpu", 0.0) / on_steps[v]
    by_hook = {v: {h: t / on_steps[v] for cb in variants[v] for h, t in getattr(cb, "by_hook", {}).items()}
               for v in names}
    return {"width": width, "steps_per_variant": len(wall["baseline"]), "data_parallel": data_parallel,
            "by_hook": by_hook, "batchnorm": batchnorm,
            "always": {label: always.get(label, 0.0) / (bucket_steps if "buckets" in label else len(order))
                       for label in labels},
            "wall": wall, "cpu": cpu, "paired": paired, "in_hooks": in_hooks, "cost_log_s": log_s}


def table(result: dict) -> list[dict]:
    base_wall, base_cpu = statistics.median(result["wall"]["baseline"]), statistics.median(result["cpu"]["baseline"])
    rows = []
    for variant, times in result["wall"].items():
        wall, cpu = statistics.median(times), statistics.median(result["cpu"][variant])
        paired = result["paired"].get(variant) or [0.0]
        hooks = result["in_hooks"].get(variant, 0.0)
        rows.append({"width": result["width"], "variant": variant, "step_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu,
                     "in_hooks_ms": 1e3 * hooks, "in_hooks_pct": 100 * hooks / base_cpu,
                     "cost_pct": 100 * (wall / base_wall - 1), "paired_pct": 100 * statistics.median(paired) / base_wall,
                     "cpu_cost_pct": 100 * (cpu / base_cpu - 1), "steps": len(times)})
    for label, spent in result["always"].items():
        rows.append({"width": result["width"], "variant": f"{label} (every step)", "step_ms": None,
                     "cpu_ms": None,
                     "in_hooks_ms": 1e3 * spent, "in_hooks_pct": 100 * spent / base_cpu, "cost_pct": None,
                     "paired_pct": None, "cpu_cost_pct": None, "steps": len(result["wall"]["baseline"])})
    rows.append({"width": result["width"], "variant": "cost log line (per fit)", "step_ms": 1e3 * result["cost_log_s"],
                 "cpu_ms": None, "cost_pct": 100 * result["cost_log_s"] / base_wall, "paired_pct": None,
                 "in_hooks_ms": None, "in_hooks_pct": None,
                 "cpu_cost_pct": None, "steps": 1})
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'n':>5} {'variant':<44} {'step ms':>8} {'cost':>7} {'paired':>7} | {'CPU ms':>7} {'cost':>7} | "
            f"{'in hooks':>8} {'share':>7}")
    print(head)
    print("-" * len(head))

    def pct(x):
        return f"{x:+6.2f}%" if x is not None else f"{'-':>7}"

    for r in rows:
        cpu = f"{r['cpu_ms']:7.1f}" if r["cpu_ms"] is not None else f"{'-':>7}"
        step = f"{r['step_ms']:8.1f}" if r["step_ms"] is not None else f"{'-':>8}"
        hooks = f"{r['in_hooks_ms']:8.2f}" if r["in_hooks_ms"] is not None else f"{'-':>8}"
        print(f"{r['width']:>5} {r['variant']:<44} {step} {pct(r['cost_pct'])} {pct(r['paired_pct'])} | "
              f"{cpu} {pct(r['cpu_cost_pct'])} | {hooks} {pct(r['in_hooks_pct'])}")
    print("step ms: median step time of the variant (slowest rank); cost: against the baseline's median; paired:\n"
          "median of (step - the baseline steps of the cycles before and after); CPU: the main thread's CPU time.\n"
          "in hooks: CPU ms per step inside the feature's own hooks (the guard's gradient sums included), and its\n"
          "share of the baseline's CPU step: the least noisy figure on a shared machine.\n"
          "(every step): CPU ms per step inside what the strategy always does, as a share of the CPU step.\n"
          "The cost log line runs once per fit: its 'cost' is its time as a share of one step.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--steps", type=int, default=64, help="training steps per run, cycled over the variants")
    parser.add_argument("--data-parallel", action="store_true",
                        help="also measure the data-parallel average (2 replicas of phantom(1))")
    parser.add_argument("--batchnorm", action="store_true",
                        help="a BatchNorm1d after every hidden Linear: buffers the replicas keep equal every step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 16:  # 4 variants: 2 cycles of warm-up, then at least 2 measured steps each
        parser.error(f"--steps {args.steps} is too few: the variants take turns, 2 cycles warm up and each "
                     "needs 2 measured steps for a median; use --steps 16 or more (the default is 64)")
    rows = []
    for width in args.widths:
        if width % 2:
            parser.error(f"width {width} is not divisible by p = 2")
        rows += table(launch(_overheads_worker, 2, width, args.steps, False, args.batchnorm))
        if args.data_parallel:
            rows += table(launch(_overheads_worker, 2, width, args.steps, True, args.batchnorm))[:-1]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    norm = ", BatchNorm1d after each hidden Linear" if args.batchnorm else ""
    print(f"PhantomStrategy(ghosts=32) defaults, user FFN [{D_IN}, n x {DEPTH + 1}, {D_OUT}]{norm}, {ROWS} rows, "
          f"SGD, 2 gloo ranks x 1 thread; {args.steps} steps per run, variants cycled per step.")
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
