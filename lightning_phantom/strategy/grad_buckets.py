"""``data_parallel="ddp"``: the gradient average over the replicas overlaps backward, bucket by bucket.

As DDP's reducer does: parameters are put in buckets in reverse order of registration
(roughly the order backward produces their gradients); a hook after each gradient's
accumulation counts it, and once every gradient of the next bucket is in, that bucket is
flattened and its all-reduce over the data-parallel group starts (asynchronously) while
backward goes on. ``finish`` waits for them and writes the means back before the optimizer
step, clipping and the non-finite check. Buckets start in the same order on every replica,
so the collectives line up. Nothing is sent while gradients accumulate (``sync=False``).

Overlap needs every parameter to get a gradient on every replica at every step (as DDP
without ``find_unused_parameters``). The first step therefore averages synchronously
(``average_gradients``), which also finds out whether that holds; if it does not, every later
step does the same, and a parameter that stops getting gradients later is an error.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_phantom.ops.comm import BUCKET_NUMEL


class GradientBuckets:
    """Overlapped, bucketed all-reduce (mean) of ``params``' gradients over ``data_group``."""

    def __init__(self, params: list[nn.Parameter], data_group: dist.ProcessGroup, data: int,
                 bucket_numel: int = BUCKET_NUMEL) -> None:
        self.data_group, self.data = data_group, data
        self.armed = False  # set after a first synchronous step found every gradient present
        self.sync = True
        self.buckets: list[list[nn.Parameter]] = []
        numel, kind = 0, None
        for p in reversed(list(dict.fromkeys(params))):  # backward meets the last layers first
            if not self.buckets or numel + p.numel() > bucket_numel or (p.dtype, p.device) != kind:
                self.buckets.append([])
                numel, kind = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            numel += p.numel()
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self._bucket_of_params()]
        self._reset()

    def _bucket_of_params(self) -> list[nn.Parameter]:
        return [p for bucket in self.buckets for p in bucket]

    def _reset(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]
        self._next = 0
        self._pending: list[tuple[dist.Work, Tensor, list[Tensor]]] = []

    def _ready(self, param: nn.Parameter) -> None:
        if not (self.armed and self.sync):
            return
        self._waiting[self._bucket_of[id(param)]] -= 1
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            grads = [p.grad for p in self.buckets[self._next]]
            flat = torch._utils._flatten_dense_tensors(grads)
            work = dist.all_reduce(flat, group=self.data_group, async_op=True)
            self._pending.append((work, flat, grads))
            self._next += 1

    def finish(self, synchronous_average: Callable[[], bool]) -> None:
        """Every gradient becomes its mean over the replicas; call after the last backward of the step.

        ``synchronous_average()`` averages all at once and says whether every gradient was
        present on every replica (``data_parallel.average_gradients``).
        """
        if not self.armed:
            self.armed = synchronous_average()
            self._reset()
            return
        if self._next < len(self.buckets):
            missing = [p.shape for p in self.buckets[self._next] if p.grad is None]
            raise RuntimeError(
                "PhantomStrategy(data_parallel='ddp') averages gradients during backward and needs every "
                f"parameter to get a gradient at every step, but parameters of shapes {missing} got none. "
                "Give them requires_grad=False if they are never used, or keep their use the same each step."
            )
        with torch.no_grad():
            for work, flat, grads in self._pending:
                work.wait()
                flat.div_(self.data)
                for g, mean in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(mean)
        self._reset()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
