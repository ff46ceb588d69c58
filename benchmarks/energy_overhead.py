"""Overhead of EnergyMonitor on training step time (CPU, one process).

Trains the same small FFN with and without the callback, alternating within one run so that
drift of the machine hits both alike, and compares the medians over rounds of the mean step
time. The mean (not the median) within a run keeps the steps that do the logging all-reduce.
Because an A/B difference of a fraction of a percent is near the noise of a shared machine,
the time spent inside the callback's per-step hook is also measured directly.

    python benchmarks/energy_overhead.py [--rounds 6] [--steps 300] [--log-every 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_phantom.energy import EnergyMonitor

WARMUP_STEPS = 20


class FFN(L.LightningModule):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepClock(L.Callback):
    """Time of every batch end; listed first, so each gap holds one call of every other hook."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())

    def mean_step_s(self) -> float:
        ends = self.ends[WARMUP_STEPS:]
        return (ends[-1] - ends[0]) / (len(ends) - 1)


class TimedEnergyMonitor(EnergyMonitor):
    """EnergyMonitor that also counts the seconds spent in its per-step hook, and in logging."""

    hook_s = log_s = 0.0
    logs = 0

    def on_train_batch_end(self, *args) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.hook_s += time.perf_counter() - start

    def _log(self, *args) -> None:
        start = time.perf_counter()
        super()._log(*args)
        self.log_s += time.perf_counter() - start
        self.logs += 1


def run(args: argparse.Namespace, with_monitor: bool, log_dir: str) -> tuple[float, EnergyMonitor | None]:
    """(mean step seconds, the timed callback) of one training run."""
    generator = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    inputs, targets = (torch.randn(n, args.width, generator=generator) for _ in range(2))
    data = TensorDataset(inputs, targets)
    clock = StepClock()
    callbacks: list[L.Callback] = [clock]
    if with_monitor:
        callbacks.append(TimedEnergyMonitor(meter=args.meter))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, log_every_n_steps=args.log_every,
        callbacks=callbacks, logger=CSVLogger(log_dir), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(FFN(args.width, args.hidden), DataLoader(data, batch_size=args.batch_size))
    return clock.mean_step_s(), callbacks[-1] if with_monitor else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="runs of each kind, alternating")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--log-every", type=int, default=50, help="trainer.log_every_n_steps (Lightning's default: 50)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--meter", default="estimate", choices=["auto", "nvml", "rapl", "estimate"])
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be more than {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are warm-up)")
    warnings.filterwarnings("ignore")  # Lightning's advice on DataLoader workers etc. is noise here

    without, with_, hook, per_log = [], [], [], []
    with tempfile.TemporaryDirectory() as log_dir:
        run(args, False, log_dir)  # warm-up: imports, allocator, thread pools
        for round_ in range(args.rounds):
            for with_monitor in (False, True) if round_ % 2 == 0 else (True, False):
                step_s, monitor = run(args, with_monitor, log_dir)
                (with_ if with_monitor else without).append(step_s)
                if monitor is not None:
                    hook.append(monitor.hook_s / args.steps)
                    per_log.append(monitor.log_s / max(monitor.logs, 1))

    base, monitored, in_hook = statistics.median(without), statistics.median(with_), statistics.median(hook)
    log_s = statistics.median(per_log)
    # Runs of one round ran back to back, under the same load: their ratio cancels most drift.
    paired = statistics.median(w / b for w, b in zip(with_, without))
    runs = lambda times: ", ".join(f"{s * 1e3:.3f}" for s in times)  # noqa: E731
    print(f"step time, median of {args.rounds} runs x {args.steps} steps "
          f"(log_every_n_steps={args.log_every}):")
    print(f"  without EnergyMonitor  {base * 1e3:8.3f} ms   (runs: {runs(without)})")
    print(f"  with EnergyMonitor     {monitored * 1e3:8.3f} ms   (runs: {runs(with_)})")
    print(f"  overhead ratio, medians          {monitored / base - 1:+8.2%}")
    print(f"  overhead ratio, median of pairs  {paired - 1:+8.2%}")
    print(f"  in the callback's hook {in_hook * 1e6:8.1f} us per step = {in_hook / base:.3%} of a step")
    print(f"    of which self.log of the 4 values, once per interval: {log_s * 1e3:.3f} ms "
          f"= {log_s / args.log_every * 1e6:.1f} us per step")


if __name__ == "__main__":
    main()
