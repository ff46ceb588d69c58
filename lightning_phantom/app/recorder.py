"""What a run measures on every rank: ``RunRecorder``, a Lightning callback the app adds to its Trainer.

* bytes sent: one training step (``measure.count_step``) inside ``CommCounter``; what is issued
  between the step's start and the end of its backward is the model's communication, compared
  with ``lightning_phantom.cost.model``; the rest of the step (optimizer, data-parallel gradient
  average, callbacks) is reported apart (CSV column ``other_sent_bytes_per_step``). The model
  of ``tp`` is tensor parallelism alone: with ``strategy.data_parallel_size > 1`` the FSDP
  traffic across replicas comes on top. DDP's gradient all-reduce is counted through DDP's
  default all-reduce hook, which the recorder registers on CPU (Lightning registers hooks on
  CUDA only).
* multiply-adds: the next step inside ``LocalFlopCounterMode`` (FLOPs / 2; it counts each rank's
  own matmuls, DTensor's included). Neither counted step is timed. Both run eagerly
  (``torch.compiler.set_stance("force_eager")``) when the model is compiled (``model.compile``):
  the counters are dispatch modes, under which compiled code does not run; the collectives and
  matmuls of the eager step are the compiled step's.
* step time: ``on_train_batch_start`` → ``on_train_batch_end`` after ``measure.warmup_steps``;
  a step lasts as long as its slowest rank; the median is reported.
* memory: ``state`` = bytes of parameters + gradients + optimizer state this rank holds (a
  DTensor by its local shard), after a step; ``peak RSS`` = the process's resident set size,
  sampled during training (the whole process: Python, torch, data); on CUDA also the peak of
  ``torch.cuda.max_memory_allocated``.
* energy: ``EnergyMonitor`` (summed over ranks; on CPU without RAPL the ``estimate`` meter,
  CPU time × watts per core, *not a measurement*), and the energy and time to ``target_loss``.

Rank 0 gathers every rank's figures into ``RunRecorder.result``, which the app writes as
``result.json``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections import Counter
from fractions import Fraction
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback


def _local(t) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor: this rank's shard


def _nbytes(t) -> int:
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    t = _local(t)
    return t.numel() * t.element_size()


def _trim_heap() -> None:
    gc.collect()
    try:  # give freed heap back to the OS, so that RSS starts from what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """Peak resident set size of this process while on, sampled by a daemon thread."""

    def __init__(self, period_s: float) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.rss())

    def start(self) -> None:
        self.peak = self.rss()
        self._stop.clear()
        threading.Thread(target=self._loop, daemon=True, name="rss-sampler").start()

    def stop(self) -> int:
        self._stop.set()
        self.peak = max(self.peak, self.rss())
        return self.peak


def _count_ddp(model) -> None:
    """Give a DDP model without a comm hook (Lightning registers one on CUDA only) DDP's default one.

    ``default_hooks.allreduce_hook`` is the all-reduce DDP does anyway, issued through
    ``torch.distributed.all_reduce`` from Python, where ``CommCounter`` sees it; the C++ reducer's
    own all-reduce it replaces is invisible to it.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not getattr(model, "_comm_hooks", None):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model.register_comm_hook(None, allreduce_hook)


#: Precisions whose linears compute in 16 bits (autocast) while the parameters, the data and what is
#: computed outside the linears keep their own dtype.
MIXED = ("bf16-mixed", "16-mixed")


def element_sizes(precision: str, parameter_size: int) -> tuple[int, int]:
    """Bytes per value of (what the linears compute, the rest: parameters, data, residual stream) in a
    run of Lightning ``precision`` with parameters of ``parameter_size`` bytes: the cost model's
    ``element_size`` and ``input_element_size`` / ``stream_element_size``. Partial sums between ranks
    go in ``accumulation_size`` of the former (float32 under 16 bits), which the cost model applies."""
    return (2 if precision in MIXED else parameter_size), parameter_size


def predicted_cost(strategy: str, module, group_size: int, world_size: int, input_shape, element_size: int,
                   stream_element_size: Optional[int] = None) -> dict:
    """The cost model's params, multiply-adds and sent bytes per rank for one training step of
    ``module`` on a batch of ``input_shape``, with ``element_sizes``' two sizes (the second defaults
    to the first).

    A module with a ``step_cost(scheme, group_size, input_shape, element_size, stream_element_size)``
    method (the GPT) gives its own figures for the scheme, "dense" for a whole model per rank; the
    FFN's come from ``phantom_cost``/``tp_cost``. DDP adds its gradient all-reduce (of the parameters'
    dtype) to the dense model's figures.
    """
    from lightning_phantom.cost.model import phantom_cost, tp_cost
    from lightning_phantom.nn.layers import PhantomFFN

    scheme = strategy if strategy in ("phantom", "tp") else "dense"
    rows = input_shape[0]
    e, e_in = element_size, element_size if stream_element_size is None else stream_element_size
    if hasattr(module, "step_cost"):
        cost = module.step_cost(scheme, group_size, input_shape, e, e_in)
    elif scheme == "phantom" and isinstance(module.net, PhantomFFN):
        cost = phantom_cost(module.net.sizes, module.net.shard.size, module.net.ghosts, rows, e,
                            input_element_size=e_in)
    elif scheme == "tp":
        cost = tp_cost(list(module.sizes), group_size, rows, e, input_element_size=e_in)
    else:  # one whole model per rank: a phantom group of one is exactly the dense FFN (cost.py)
        sizes = list(module.sizes)
        cost = phantom_cost(sizes, 1, [1] * (len(sizes) - 3), rows, e)
    sent = cost.sent_bytes
    if strategy == "ddp":  # one all-reduce of every gradient per step, ring 2(p-1)/p (counting.py)
        sent = Fraction(2 * (world_size - 1) * cost.params * e_in, world_size)
    return {"params": cost.params, "macs": cost.macs, "sent_bytes": sent}


def _ghosts(module) -> Optional[list[int]]:
    """Ghosts of every phantom layer of ``module``'s phantom FFNs and stacks, in module order; None if none."""
    from lightning_phantom.nn.layers import PhantomFFN
    from lightning_phantom.nn.transformer import PhantomTransformerEncoder

    found = [k for m in module.modules() if isinstance(m, (PhantomFFN, PhantomTransformerEncoder)) for k in m.ghosts]
    return found or None


class RunRecorder(Callback):
    """Measures a run on every rank (see the module docstring) and gathers it into ``result``.

    Place it after the ``EnergyMonitor`` in the callbacks: it reads the joules of the step that
    the monitor has just closed.
    """

    def __init__(self, plan, count_step: Optional[int] = 2, warmup_steps: int = 3, rss_period_s: float = 0.01,
                 energy=None) -> None:
        self.plan, self.count_step, self.warmup_steps = plan, count_step, warmup_steps
        self.energy = energy
        self.result: dict = {}
        self._sampler = _RssSampler(rss_period_s)
        self._comm = self._flops = self._marker = self._eager = None
        self._cuda = None
        self._losses: list = []
        self._local: dict[str, Any] = {"times": [], "train": [], "val": []}

    def _joules(self) -> float:
        return float(self.energy.local_J) if self.energy is not None else math.nan

    def _sync(self) -> None:
        if self._cuda is not None:  # time the kernels, not their launch
            import torch

            torch.cuda.synchronize(self._cuda)

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        if self.count_step is not None:
            _count_ddp(trainer.strategy.model)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            self._cuda = device
            torch.cuda.reset_peak_memory_stats(device)
        _trim_heap()
        self._local["params"] = sum(_local(p).numel() for p in pl_module.parameters())
        # The whole model's parameters (report.model_params): each rank's phantom shard at its full size
        # (a DTensor's numel is over the data replicas FSDP splits it across) apart from what every
        # rank of the group holds a copy of.
        from lightning_phantom.nn.layers import sharded_parameters

        sharded = {id(p) for p in sharded_parameters(pl_module)}
        params = list(pl_module.parameters())
        self._local["params_sharded"] = sum(p.numel() for p in params if id(p) in sharded)
        self._local["params_replicated"] = sum(p.numel() for p in params if id(p) not in sharded)
        self._local["threads"] = torch.get_num_threads()  # intra-op threads this rank computes with
        self._sampler.start()
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from lightning_phantom.cost.counting import CommCounter, LocalFlopCounterMode

        self._step = trainer.global_step
        if self._step == self.count_step:
            sizes = element_sizes(trainer.precision, next(pl_module.parameters()).element_size())
            self._local.update(rows=int(batch[0].shape[0]), input_shape=list(batch[0].shape),
                               element_size=sizes[0], stream_element_size=sizes[1])
            self._comm, self._marker = CommCounter(), None
            self._comm.__enter__()
        elif self.count_step is not None and self._step == self.count_step + 1:
            self._flops = LocalFlopCounterMode(display=False)
            self._flops.__enter__()
        if self._comm is not None or self._flops is not None:
            import torch

            self._eager = torch.compiler.set_stance("force_eager")  # until the end of this step
        self._sync()
        self._start = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._comm is not None:
            self._marker = len(self._comm.records)  # what follows is not the model's forward/backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._start
        counted = self._comm is not None or self._flops is not None
        if self._eager is not None:
            self._eager.__exit__(None, None, None)  # the stance before it
            self._eager = None
        if self._comm is not None:
            self._comm.__exit__(None, None, None)
            records = self._comm.records
            marker = len(records) if self._marker is None else self._marker
            model, other = records[:marker], records[marker:]
            self._local.update(sent_bytes=str(sum((r.sent_bytes for r in model), Fraction(0))),
                               other_sent_bytes=str(sum((r.sent_bytes for r in other), Fraction(0))),
                               calls=dict(sorted(Counter(r.op for r in model).items())))
            self._comm = None
        if self._flops is not None:
            self._flops.__exit__(None, None, None)
            self._local["flops"] = int(self._flops.get_total_flops())
            self._flops = None
        if not counted and self._step >= self.warmup_steps:
            self._local["times"].append(elapsed)
        if "state_bytes" not in self._local and self._step + 1 >= self.warmup_steps:
            params, optimizer = list(pl_module.parameters()), trainer.optimizers[0]
            state = [v for per_param in optimizer.state.values() for v in per_param.values()]
            self._local["state_bytes"] = (sum(map(_nbytes, params)) + sum(_nbytes(p.grad) for p in params)
                                          + sum(map(_nbytes, state)))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(loss.detach())  # read at the end: .item() here would sync every step
        self._local["train"].append([self._step + 1, time.perf_counter() - self._t0, self._joules()])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self._local["val"].append([trainer.global_step, time.perf_counter() - self._t0, self._joules(),
                                   float(trainer.callback_metrics["val_loss"])])
        for key in ("val_acc", "val_bpc"):  # classification: accuracy; language model: bits per character
            if key in trainer.callback_metrics:
                self._local.setdefault(key, []).append([trainer.global_step, float(trainer.callback_metrics[key])])

    def on_train_end(self, trainer, pl_module) -> None:
        import torch
        import torch.distributed as dist

        for row, loss in zip(self._local["train"], self._losses):
            row.append(float(loss))
        self._local["rss_peak"] = self._sampler.stop()
        if self._cuda is not None:
            self._local["cuda_peak"] = torch.cuda.max_memory_allocated(self._cuda)
        self._local["wall_s"] = time.perf_counter() - self._t0
        ranks = [self._local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, self._local)
        self.result = self._combine(ranks, pl_module)

    def _combine(self, ranks: list[dict], pl_module) -> dict:
        plan, first = self.plan, ranks[0]
        n = min(len(r["times"]) for r in ranks)
        step_times = [max(r["times"][i] for r in ranks) for i in range(n)]  # the slowest rank's

        def curve(key: str) -> list[list[float]]:  # rank 0's steps, times and losses; all ranks' joules
            return [[step, t, sum(r[key][i][2] for r in ranks), loss]
                    for i, (step, t, _, loss) in enumerate(first[key])]

        train, val = curve("train"), curve("val")
        last = [loss for *_, loss in train[-10:]]
        predicted = None
        if "rows" in first:
            cost = predicted_cost(plan.strategy, pl_module, plan.group_size, plan.world_size, first["input_shape"],
                                  first["element_size"], first["stream_element_size"])
            predicted = {**cost, "sent_bytes": str(cost["sent_bytes"])}
        return {
            "strategy": plan.strategy, "world_size": plan.world_size, "group_size": plan.group_size,
            "data_parallel": plan.data_parallel, "sizes": list(getattr(pl_module, "sizes", [])),
            "ghosts": _ghosts(pl_module),
            # A model that is not the FFN names itself, counts its parameters and says what its loss is.
            **{key: getattr(pl_module, key) for key in ("model_name", "params_model", "loss_name")
               if hasattr(pl_module, key)},
            "steps": len(train), "step_time_s": statistics.median(step_times) if step_times else math.nan,
            "wall_s": max(r["wall_s"] for r in ranks),
            "final_train_loss": statistics.fmean(last) if last else math.nan,
            "final_val_loss": val[-1][3] if val else None, "final_val_step": val[-1][0] if val else None,
            "energy": self.energy.summary() if self.energy is not None else None, "predicted": predicted,
            "final_val_bpc": first["val_bpc"][-1][1] if first.get("val_bpc") else None,
            "per_rank": [{k: v for k, v in r.items() if k not in ("times", "train", "val", "val_acc", "val_bpc")}
                         for r in ranks],
            "train_curve": train, "val_curve": val, "val_acc_curve": first.get("val_acc") or None,
            "val_bpc_curve": first.get("val_bpc") or None,
        }
