"""EnergyMonitor: joules per training step, to a target metric, and for the whole fit.

Each rank reads its meter (see :mod:`lightning_phantom.energy.meters`) at the end of every training
batch and keeps the step energies in a local list. At each logging boundary
(``trainer.log_every_n_steps``) one all-reduce of that small list, plus seconds, samples and
the target hit, turns them into energies summed over all ranks. The only other collective
during training is one small all-reduce per validation while a target is still pending. Step
windows tile the run, from one batch end to the next, so data loading and validation are
charged to the step that follows them and the logged steps add up to the logged total.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_phantom.energy.meters import (
    EstimateMeter,
    NvmlMeter,
    RaplMeter,
    counted_once,
    load_nvml,
    nvml_device_handle,
    rapl_unavailable_reason,
)

METERS = ("auto", "nvml", "rapl", "estimate")
SUMMARY_FILE = "energy_summary.json"


def _batch_len(batch: Any) -> int | None:
    """Length of the first tensor in the batch (depth first), the batch size for samples/J."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, (list, tuple)):
        items = batch
    else:
        items = batch.values() if isinstance(batch, Mapping) else ()
    for item in items:
        length = _batch_len(item)
        if length is not None:
            return length
    return None


def _check_target(target: Any) -> dict | None:
    if target is None:
        return None
    if not isinstance(target, Mapping):
        raise TypeError(
            f"target must be a dict like {{'monitor': 'val_loss', 'value': 0.05}}, got {target!r}"
        )
    unknown = set(target) - {"monitor", "value", "mode"}
    if unknown or "monitor" not in target or "value" not in target:
        raise ValueError(
            f"target needs the keys 'monitor' and 'value' and may have 'mode'; got keys {sorted(target)}"
        )
    mode = target.get("mode", "min")
    if mode not in ("min", "max"):
        raise ValueError(f"target['mode'] must be 'min' or 'max', got {mode!r}")
    value = target["value"]
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not isinstance(target["monitor"], str) or not is_number:
        raise TypeError(f"target needs a metric name (str) and a number as value, got {dict(target)!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"target['value'] must be a finite number, got {target['value']!r}")
    return {"monitor": target["monitor"], "value": value, "mode": mode}


def _torch_uuid(index: int) -> str | None:
    """The UUID CUDA gives ``cuda:<index>``, the one name of a GPU that torch and NVML share."""
    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except (AttributeError, AssertionError, RuntimeError):  # a torch without CUDA or without .uuid
        return None
    return str(uuid) or None


class EnergyMonitor(Callback):
    """Log energy per training step and summarise it at the end of ``fit``.

    Args:
        meter: ``"nvml"`` (NVIDIA GPUs), ``"rapl"`` (CPU package + DRAM via powercap),
            ``"estimate"`` (CPU time x ``watts_per_core``; not a measurement) or ``"auto"``
            (nvml on GPUs, else rapl when readable, else estimate; one warning says which).
        target: ``{"monitor": "val_loss", "value": 0.05, "mode": "min"}``: record the energy,
            wall time and global step at which the metric first reaches the value.
        watts_per_core: power per busy core assumed by the estimate meter.
        powercap_root: where the RAPL zones live (a fake tree in tests).
        prog_bar: also show total energy and power in the progress bar.

    Logged every ``log_every_n_steps`` as ``energy_<meter>/step_J`` (the latest step, all
    ranks), ``total_J`` (all ranks, all steps so far), ``power_W`` and ``samples_per_J`` (both
    over the steps since the previous log). Samples are counted once per data-parallel replica.

    Attributes:
        kind: the meter in use (``"nvml"``, ``"rapl"``, ``"estimate"``), known after setup.
        energy_to_target: None until the target is reached, then a dict with ``monitor``,
            ``target``, ``mode``, ``reached_value``, ``energy_J`` (all ranks), ``time_s`` (wall
            time since training started), ``step`` (``trainer.global_step`` then) and
            ``checked_after`` (``"train"`` or ``"validation"``); the same on every rank.
        local_J: this rank's own share of the energy, before any reduction.

    At the end of ``fit`` :meth:`summary` is printed on rank 0 and written to
    ``energy_summary.json`` in ``trainer.log_dir``; its ``total_J`` also holds what followed
    the last step (final validation, checkpointing), so it may exceed the last logged total.
    """

    def __init__(
        self,
        meter: str = "auto",
        target: Mapping[str, Any] | None = None,
        watts_per_core: float = 10.0,
        powercap_root: str | os.PathLike = "/sys/class/powercap",
        prog_bar: bool = True,
    ) -> None:
        if meter not in METERS:
            raise ValueError(f"meter must be one of {METERS}, got {meter!r}")
        if isinstance(watts_per_core, bool) or not isinstance(watts_per_core, (int, float)):
            raise TypeError(f"watts_per_core must be a number of watts, got {watts_per_core!r}")
        if not (math.isfinite(watts_per_core) and watts_per_core > 0):
            raise ValueError(f"watts_per_core must be a finite number > 0, got {watts_per_core!r}")
        self.meter = meter
        self.target = _check_target(target)
        self.watts_per_core = float(watts_per_core)
        self.powercap_root = powercap_root
        self.prog_bar = prog_bar
        self.kind: str | None = None  # the meter actually used, known after setup
        self.energy_to_target: dict | None = None
        self._meter: Any = None
        self._reset()

    def _reset(self) -> None:
        self.energy_to_target = None
        self.local_J = 0.0  # this rank's own share, before any reduction
        self._step_J: list[float] = []  # every step, all ranks
        self._total_J = self._seconds = self._samples = 0.0
        self._pending_J: list[float] = []  # this rank's steps since the last reduction
        self._pending_s = self._pending_samples = 0.0
        self._pending_hit: tuple[int, float, float, int] | None = None  # (index, value, seconds, step)
        self._last_J = self._last_s = self._start_s = 0.0
        self._resumed_s = 0.0  # wall time of the runs before a resume from checkpoint
        self._monitor_seen = False
        self._validations = 0  # validation loops run during fit (not the sanity check)
        self._warned_batch = False
        self._summary: dict | None = None

    # -- meter choice -------------------------------------------------------------------------

    def _open_nvml(self, trainer: Trainer) -> NvmlMeter:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            raise ValueError(
                f"meter='nvml' measures NVIDIA GPUs but this Trainer runs on {device.type}; "
                "use meter='auto', 'rapl' or 'estimate'"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        nvml = load_nvml()
        handle = nvml_device_handle(nvml, index, os.environ.get("CUDA_VISIBLE_DEVICES"), _torch_uuid(index))
        return NvmlMeter(nvml, handle, sync=lambda: torch.cuda.synchronize(device))

    def _auto_choice(self, trainer: Trainer) -> tuple[str, str]:
        """(kind, why), decided on global rank 0 so that every rank logs under the same names."""
        why = "the Trainer runs on CPU"
        if trainer.strategy.root_device.type == "cuda":
            try:
                self._open_nvml(trainer).close()
                return "nvml", "the Trainer runs on CUDA GPUs and NVML reports their energy"
            except Exception as err:  # noqa: BLE001 - any NVML failure means: fall back, say why
                why = f"the Trainer runs on CUDA GPUs but NVML cannot measure them ({err})"
        reason = rapl_unavailable_reason(self.powercap_root)
        if reason is None:
            return "rapl", f"{why} and RAPL counters under {self.powercap_root} are readable"
        return "estimate", (
            f"{why} and {reason}; energy is estimated as CPU time x {self.watts_per_core:g} W per core, "
            "not measured"
        )

    def _open_meter(self, trainer: Trainer) -> Any:
        kind = self.meter
        if kind == "auto":
            choice = self._auto_choice(trainer) if trainer.is_global_zero else None
            kind, why = trainer.strategy.broadcast(choice)
            rank_zero_warn(f"EnergyMonitor(meter='auto') uses meter={kind!r}: {why}. Pass meter= to choose.")
        if kind == "estimate":
            return EstimateMeter(self.watts_per_core)
        if kind == "rapl":
            # The counters cover the whole node, so one rank per node reads them.
            return RaplMeter(self.powercap_root, counts=trainer.local_rank == 0)
        meter = self._open_nvml(trainer)
        if trainer.world_size > 1:
            # UUIDs are unique across nodes, so ranks sharing a GPU find each other in one gather.
            uuids: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(uuids, meter.uuid)
            meter.counts = counted_once(uuids)[trainer.global_rank]
        return meter

    # -- hooks --------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self._meter = self._open_meter(trainer)
        self.kind = self._meter.kind
        sampler_kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        # Ranks of one model-parallel group see the same batch; count it once per data replica.
        self._sample_scale = sampler_kwargs.get("num_replicas", trainer.world_size) / trainer.world_size

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._meter.start()
        self._start_s = self._last_s = time.perf_counter()
        self._last_J = 0.0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now_J, now_s = self._meter.read(), time.perf_counter()
        self._pending_J.append(now_J - self._last_J)
        self._pending_s += now_s - self._last_s
        self._last_J, self._last_s, self.local_J = now_J, now_s, now_J
        length = _batch_len(batch)
        if length is None and not self._warned_batch:
            self._warned_batch = True
            rank_zero_warn(
                f"EnergyMonitor found no tensor in a {type(batch).__name__} batch; samples_per_J is 0"
            )
        self._pending_samples += length or 0
        if self._pending_hit is None and self._target_pending() and trainer.is_global_zero:
            value = self._metric_at_target(trainer)
            if value is not None:
                index = len(self._pending_J) - 1
                self._pending_hit = (index, value, self._elapsed(now_s), trainer.global_step)
        # Lightning writes step metrics when (batches_that_stepped + 1) % log_every_n_steps == 0,
        # after the last micro-batch of an accumulation (its own ThroughputMonitor reads the same
        # private counters); deciding from them keeps every rank in step for the all-reduce.
        every = trainer.log_every_n_steps
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        if every > 0 and stepped % every == 0 and not trainer.fit_loop._should_accumulate():
            self._log(pl_module, *self._reduce(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._meter is None:
            return
        self._validations += 1
        if not self._target_pending():
            return
        # Rare (once per validation, only until the target is met), hence its own all-reduce.
        value = None
        if trainer.is_global_zero and self._pending_hit is None:
            value = self._metric_at_target(trainer)
        now_J, seconds = self._meter.read(), self._elapsed(time.perf_counter())
        hit = [1.0, value, seconds] if value is not None else [0.0, 0.0, 0.0]  # only rank 0 may hit
        unreduced_J = now_J - self._last_J + sum(self._pending_J)
        pending_J, hit, value, seconds = self._all_reduce(trainer, [unreduced_J, *hit])
        if hit:
            self._record_target(self._total_J + pending_J, value, seconds, trainer.global_step, "validation")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # What follows the last step (final validation, checkpoints) joins the total, not a step.
        now_J, now_s = self._meter.read(), time.perf_counter()
        tail_J, self.local_J = now_J - self._last_J, now_J
        self._pending_s += now_s - self._last_s
        self._reduce(trainer, extra=[tail_J])
        if self.target is not None and self.energy_to_target is None and not self._monitor_seen:
            rank_zero_warn(self._missing_metric_reason(trainer))
        self._summary = self.summary()
        log_dir = trainer.log_dir or trainer.default_root_dir  # collective: every rank calls it
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, SUMMARY_FILE)
            with open(path, "w") as f:
                json.dump(self._summary, f, indent=2)
            rank_zero_info(self._table(self._summary) + f"\n(written to {path})")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._meter is not None:
            self._meter.close()
            self._meter = None

    def state_dict(self) -> dict:
        # Totals are reduced, hence the same on every rank; the steps since the last logging
        # boundary are not, and a resumed run does without them.
        return {"step_J": list(self._step_J), "total_J": self._total_J, "seconds": self._seconds,
                "samples": self._samples, "energy_to_target": self.energy_to_target}

    def load_state_dict(self, state_dict: dict) -> None:
        self._step_J = list(state_dict["step_J"])
        self._total_J, self._seconds = state_dict["total_J"], state_dict["seconds"]
        self._samples, self.energy_to_target = state_dict["samples"], state_dict["energy_to_target"]
        self._resumed_s = self._seconds

    # -- reduction, logging, target -------------------------------------------------------------

    def _elapsed(self, now_s: float) -> float:
        return self._resumed_s + now_s - self._start_s

    def _all_reduce(self, trainer: Trainer, values: list[float]) -> list[float]:
        if trainer.world_size == 1 or not dist.is_initialized():
            return values
        # The default group on purpose: energy is summed over every rank, whatever the strategy's
        # own reduce() would consider its group.
        tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _reduce(self, trainer: Trainer, extra: list[float] = ()) -> tuple[list[float], float, float]:
        """One all-reduce of the pending steps; returns (step energies, seconds, samples) of them."""
        steps = len(self._pending_J)
        hit = self._pending_hit or (-1, 0.0, 0.0, 0)
        local = [*self._pending_J, *extra, self._pending_s, self._pending_samples, hit[0] + 1, *hit[1:]]
        reduced = self._all_reduce(trainer, local)
        step_J, rest = reduced[:steps], reduced[steps:]
        *extra_J, seconds, samples, hit_index, value, hit_s, hit_step = rest
        seconds /= trainer.world_size  # the ranks' wall times differ by a hair; take their mean
        samples *= self._sample_scale
        if hit_index > 0:
            index = int(hit_index) - 1
            energy_J = self._total_J + sum(step_J[: index + 1])
            self._record_target(energy_J, value, hit_s, int(hit_step), "train")
        self._step_J += step_J
        self._total_J += sum(step_J) + sum(extra_J)
        self._seconds += seconds
        self._samples += samples
        self._pending_J, self._pending_s, self._pending_samples, self._pending_hit = [], 0.0, 0.0, None
        return step_J, seconds, samples

    def _log(self, pl_module: LightningModule, step_J: list[float], seconds: float, samples: float) -> None:
        interval_J = sum(step_J)
        prefix = f"energy_{self.kind}/"
        values = {
            "step_J": (step_J[-1], False),
            "total_J": (self._total_J, self.prog_bar),
            "power_W": (interval_J / seconds if seconds > 0 else math.nan, self.prog_bar),
            "samples_per_J": (samples / interval_J if interval_J > 0 else math.nan, False),
        }
        for name, (value, prog_bar) in values.items():
            pl_module.log(prefix + name, value, on_step=True, on_epoch=False, prog_bar=prog_bar)

    def _missing_metric_reason(self, trainer: Trainer) -> str:
        name = self.target["monitor"]
        head = f"EnergyMonitor: the target metric {name!r} never appeared, so energy to target is unknown: "
        if self._validations == 0 and trainer.val_dataloaders is not None and trainer.limit_val_batches != 0:
            return head + (
                f"no validation ran in these {trainer.global_step} training steps (val_check_interval="
                f"{trainer.val_check_interval}); metrics logged in validation_step appear only after one. "
                "Validate at least once (a val_check_interval <= max_steps)"
            )
        return head + (
            f"it was not logged (trainer.callback_metrics has {sorted(trainer.callback_metrics)}); log it with "
            f"self.log({name!r}, ...), or set target={{'monitor': ...}} to a metric the module logs"
        )

    def _target_pending(self) -> bool:
        return self.target is not None and self.energy_to_target is None

    def _metric_at_target(self, trainer: Trainer) -> float | None:
        """The monitored metric's value if it has reached the target, else None."""
        value = trainer.callback_metrics.get(self.target["monitor"])
        if value is None:
            return None
        self._monitor_seen = True
        value = float(value)
        threshold = self.target["value"]
        reached = value <= threshold if self.target["mode"] == "min" else value >= threshold
        return value if reached else None

    def _record_target(self, energy_J: float, value: float, seconds: float, step: int, where: str) -> None:
        self.energy_to_target = {
            "monitor": self.target["monitor"],
            "target": self.target["value"],
            "mode": self.target["mode"],
            "reached_value": value,
            "energy_J": energy_J,
            "time_s": seconds,
            "step": step,
            "checked_after": where,
        }

    # -- summary ------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Totals over all ranks so far (final after ``fit``); the same dict on every rank."""
        if self._summary is not None:
            return dict(self._summary)

        def finite(x: float) -> float | None:  # JSON has no NaN
            return x if math.isfinite(x) else None

        return {
            "meter": self.kind,
            "total_J": self._total_J,
            "J_per_step_median": statistics.median(self._step_J) if self._step_J else None,
            "power_W_avg": finite(self._total_J / self._seconds) if self._seconds > 0 else None,
            "steps": len(self._step_J),
            "samples": int(round(self._samples)),
            "energy_to_target": self.energy_to_target,
        }

    def _table(self, summary: dict) -> str:
        title = f"Energy ({summary['meter']})"
        if summary["meter"] == "estimate":
            title += f": an ESTIMATE, CPU time x {self.watts_per_core:g} W per core, not a measurement"
        rows = [(key, value) for key, value in summary.items() if key != "energy_to_target"]
        target = summary["energy_to_target"]
        if self.target is not None:
            rows.append(
                (f"to {self.target['monitor']} {'<=' if self.target['mode'] == 'min' else '>='} "
                 f"{self.target['value']:g}",
                 "not reached" if target is None
                 else f"{target['energy_J']:.4g} J, {target['time_s']:.4g} s, step {target['step']}")
            )
        width = max(len(key) for key, _ in rows)
        lines = [title] + [
            f"  {key:<{width}}  {value:.4g}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
            for key, value in rows
        ]
        return "\n".join(lines)
