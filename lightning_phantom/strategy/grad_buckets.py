"""``data_parallel="ddp"``: the gradient average over the replicas overlaps backward, bucket by bucket.

As DDP's reducer does: parameters are put in buckets in reverse order of registration
(roughly the order backward produces their gradients); a hook after each gradient's
accumulation counts it, and once every gradient of the next bucket is in, that bucket's
all-reduce over the data-parallel group starts (asynchronously) while backward goes on.
``finish`` waits for them before the optimizer step and clipping. Buckets start in the same
order on every replica, so the collectives line up. Nothing is sent while gradients
accumulate (``sync=False``).

Each gradient is read and written once, divided by the number of replicas (the mean is the
sum of the divided parts) on its way:

* a large gradient (``IN_PLACE_NUMEL`` elements or more) is a bucket of its own, divided and
  all-reduced in place: copying it would cost more than the collective's fixed latency saves;
* small ones are copied, divided, into one flat buffer per bucket, kept across steps, and
  become views of it once averaged (as DDP's ``gradient_as_bucket_view``): no copy back.

``observe(params, values)``, if set, sees each bucket's divided local values just before
its all-reduce starts, while they are in cache: ``NonFiniteGuard`` sums them there instead
of reading the gradients again.

Overlap needs every parameter to get a gradient on every replica at every step (as DDP
without ``find_unused_parameters``). The first step therefore averages synchronously
(``average_gradients``), which also finds out whether that holds; if it does not, every later
step does the same, and a parameter that stops getting gradients later is an error, raised
on every rank at that step (``finish``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_phantom.ops.comm import BUCKET_NUMEL

IN_PLACE_NUMEL = 1 << 20  # 4 MiB of float32: copying it costs more than an all-reduce's latency


class GradientBuckets:
    """Overlapped, bucketed all-reduce (mean) of ``params``' gradients over ``data_group``."""

    def __init__(self, params: list[nn.Parameter], data_group: dist.ProcessGroup, data: int,
                 bucket_numel: int = BUCKET_NUMEL, in_place_numel: int = IN_PLACE_NUMEL) -> None:
        self.data_group, self.data, self.in_place_numel = data_group, data, in_place_numel
        self.armed = False  # set after a first synchronous step found every gradient present
        self.sync = True
        self.buckets: list[list[nn.Parameter]] = []
        self.observe: Optional[Callable[[list[nn.Parameter], Tensor], None]] = None
        numel, kind = 0, None
        for p in reversed(list(dict.fromkeys(params))):  # backward meets the last layers first
            if p.numel() >= in_place_numel:
                self.buckets.append([p])
                numel, kind = bucket_numel, None  # nothing joins it
                continue
            if not self.buckets or numel + p.numel() > bucket_numel or (p.dtype, p.device) != kind:
                self.buckets.append([])
                numel, kind = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            numel += p.numel()
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._flats: list[Optional[Tensor]] = [None] * len(self.buckets)  # each bucket's, once allocated
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
        self._start_ready()

    def _start_ready(self) -> None:
        """Start the all-reduce of every bucket, in order, whose gradients are all in."""
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            params = self.buckets[self._next]
            flat = self._divided(self._next)
            if self.observe is not None:
                self.observe(params, flat)
            work = dist.all_reduce(flat, group=self.data_group, async_op=True)
            self._pending.append((work, flat, params))
            self._next += 1

    def _divided(self, bucket: int) -> Tensor:
        """The bucket's gradients divided by the replicas: in place for a large one, else as they
        are copied into the bucket's buffer."""
        grads = [p.grad for p in self.buckets[bucket]]
        if len(grads) == 1 and grads[0].numel() >= self.in_place_numel and grads[0].is_contiguous():
            return grads[0].div_(self.data)
        flat = self._flats[bucket]
        if flat is None:  # kept across steps: a fresh one costs page faults every step
            flat = self._flats[bucket] = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype,
                                                     device=grads[0].device)
        offset = 0
        for g in grads:
            torch.div(g, self.data, out=flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()
        return flat

    def finish(self, synchronous_average: Callable[[], bool]) -> list[tuple[int, ...]]:
        """Every gradient becomes its mean over the replicas; call after the last backward of the step.

        ``synchronous_average()`` averages all at once and says whether every gradient was
        present on every replica (``data_parallel.average_gradients``).

        Returns the shapes of the parameters that got no gradient on this rank, once armed
        (else ``[]``). Their buckets are then sent with zeros in their place, so that this
        rank's all-reduces still line up with the other replicas' and none of them waits for
        the timeout; the mean is wrong and the caller must stop every rank before the step
        (``strategy.step`` does: a flag in the step's agreement tells the other replicas).
        """
        if not self.armed:
            self.armed = synchronous_average()
            self._reset()
            return []
        missing = []
        if self._next < len(self.buckets):
            for bucket in self.buckets[self._next:]:
                for p in bucket:
                    if p.grad is None:
                        missing.append(tuple(p.shape))
                        p.grad = torch.zeros_like(p)
            self._waiting = [0] * len(self.buckets)
            self._start_ready()
        with torch.no_grad():
            for work, flat, params in self._pending:
                work.wait()
                # The gradients become views of the bucket (as DDP's gradient_as_bucket_view): no
                # copy back, and the local gradients' memory is freed. The next step overwrites
                # the bucket: a reference to a gradient kept past its step sees the next one.
                if flat is not params[0].grad:  # else averaged in place
                    means = torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])
                    for p, mean in zip(params, means):
                        p.grad = mean
        self._reset()
        return missing

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
