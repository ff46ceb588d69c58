"""Communication of phantom parallelism as conjugate autograd pairs.

Each collective is a small ``torch.autograd.Function`` named for what it does to a
tensor, and its backward is the adjoint of its forward (as in Megatron-LM's
``tensor_parallel/mappings.py``):

==========================  ===================  ===================
function                    forward              backward
==========================  ===================  ===================
``copy_to_phantom``         identity             all-reduce
``reduce_from_phantom``     all-reduce           identity
``reduce_statistics``       all-reduce           all-reduce
``split_to_phantom``        keep own columns     all-gather columns
``gather_from_phantom``     all-gather columns   keep own columns
==========================  ===================  ===================

The last pair enters and leaves a transformer stack whose residual stream is split by
columns over the group (docs/operator.md §10.5): rank i keeps columns i·d/p … (i+1)·d/p − 1
of the last dimension.

The fourth pair, the ghost exchange (all-gather forward, reduce-scatter backward), is
fused into the layer operator (``ops/operator.py``) so that it overlaps the local
matmuls. A group of size 1 bypasses the collective. Nothing here names a device: the
tensors' device decides, so the same code runs on gloo (CPU) and NCCL (CUDA).

**One path for eager and ``torch.compile``.** The autograd pairs and the fused operator
(``ops/operator.py``) issue PyTorch's functional collectives
(``torch.ops._c10d_functional``): ``start_*`` returns the result tensor at once and
``wait`` blocks on it where it is needed. In eager mode that is an asynchronous
collective like ``async_op=True``, so the overlap of communication and computation is
unchanged; under ``torch.compile`` the ops are traceable, so a phantom FFN compiles as one
graph, forward and backward, and the compiler schedules the waits. ``CommCounter``
(``lightning_phantom.cost.counting``) counts them with its dispatch mode.
``all_gather_into``/``reduce_scatter_into`` keep the in-place c10d form for set-up code
(conversion), looked up as ``torch.distributed.<name>`` at call time so the counter sees them.

**Sums in float32.** A reduction of partial sums in bfloat16 or float16 rounds after
every addition; the collectives that add partial sums (the all-reduces here and the
ghost-gradient reduce-scatter) send them in ``accumulation_dtype`` (float32 for those
dtypes) and round once at the end. The buffers are rows × width of the ends or
ghosts × rows, small next to the layers' matmuls.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed import _functional_collectives as funcol


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP's parameters), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class GroupInfo:
    """Where this shard sits: its rank inside the phantom group and the group's size.

    ``group=None`` means the default (world) group once ``torch.distributed`` is
    initialised, and a group of one process otherwise.
    """

    group: Optional[ProcessGroup]
    rank: int
    size: int

    def __deepcopy__(self, memo) -> "GroupInfo":
        return self  # immutable, and a ProcessGroup cannot be copied: copies share it

    def __reduce__(self):
        # A ProcessGroup cannot be pickled: a saved module keeps (rank, size) and uses the
        # default group when loaded (lightning_phantom.set_group attaches another).
        return GroupInfo, (None, self.rank, self.size)

    @classmethod
    def of(cls, group: Optional[ProcessGroup] = None) -> "GroupInfo":
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise RuntimeError(
                    "A process group was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group first (or let the Trainer's strategy do it)."
                )
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


def all_gather_into(out: Tensor, x: Tensor, group: Optional[ProcessGroup], async_op: bool = False):
    """All-gather along dim 0 into ``out`` (torch >= 2.13 names it ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: Tensor, x: Tensor, group: Optional[ProcessGroup], async_op: bool = False):
    """Sum over ranks, rank r keeping block r of dim 0 (torch >= 2.13: ``reduce_scatter_single``)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial sums are added in: float32 for bfloat16/float16, else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _group_name(group: Optional[ProcessGroup]) -> str:
    return funcol._resolve_group_name(group if group is not None else dist.group.WORLD)


def start_all_gather(x: Tensor, group: Optional[ProcessGroup], size: int) -> Tensor:
    """Start an all-gather along dim 0; the result may be read only after ``wait``."""
    return torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), size, _group_name(group))


def start_reduce_scatter(x: Tensor, group: Optional[ProcessGroup], size: int) -> Tensor:
    """Start a sum over ranks of ``x`` (p blocks along dim 0), rank r keeping block r, in
    ``accumulation_dtype``; ``wait(result, x.dtype)`` gives it back in ``x``'s dtype."""
    x = x.to(accumulation_dtype(x.dtype)).contiguous()
    return torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", size, _group_name(group))


def start_all_reduce(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Start a sum of ``x`` over ranks in ``accumulation_dtype`` (``x`` itself is left unchanged)."""
    x = x.to(accumulation_dtype(x.dtype)).contiguous()
    return torch.ops._c10d_functional.all_reduce(x, "sum", _group_name(group))


def wait(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Block until the collective that produced ``x`` is done (and cast the result to ``dtype``)."""
    x = torch.ops._c10d_functional.wait_tensor(x)
    return x if dtype is None else x.to(dtype)


class _CopyToPhantom(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (a replicated input feeds every shard)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return wait(start_all_reduce(grad, ctx.group), grad.dtype), None


class _ReduceFromPhantom(torch.autograd.Function):
    """All-reduce forward (sum of the row-parallel partial products); identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        return wait(start_all_reduce(x, group), x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _single(group: Optional[ProcessGroup]) -> bool:
    return not dist.is_initialized() or dist.get_world_size(group) == 1


def copy_to_phantom(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Enter a phantom group with a replicated tensor: identity forward, all-reduce backward."""
    return x if _single(group) else _CopyToPhantom.apply(x, group)


def reduce_from_phantom(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Leave a phantom group by summing partial results: all-reduce forward, identity backward."""
    return x if _single(group) else _ReduceFromPhantom.apply(x, group)


class _ReduceStatistics(torch.autograd.Function):
    """All-reduce forward; all-reduce of the gradient backward (for sharded normalisation).

    Rank r holds partial row statistics s_r (sums over its own features) and every rank
    uses the total s = Σ_r s_r to normalise its own shard. Downstream of the norm the
    activations stay sharded, so the gradient that reaches s on rank r, g_r, is only the
    part from rank r's features: ∂L/∂s = Σ_r g_r, and ∂L/∂s_r = ∂L/∂s because s is a plain
    sum. Both directions are therefore an all-reduce (``reduce_from_phantom`` followed by
    ``copy_to_phantom``, fused): 1 or 2 values per row, independent of the width.
    """

    @staticmethod
    def forward(ctx, stats: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        ctx.group = group
        return wait(start_all_reduce(stats, group), stats.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return wait(start_all_reduce(grad, ctx.group), grad.dtype), None


def reduce_statistics(stats: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum per-rank partial row statistics of a sharded activation: all-reduce forward and backward."""
    return stats if _single(group) else _ReduceStatistics.apply(stats, group)


def _own_columns(x: Tensor, rank: int, size: int) -> Tensor:
    width = x.shape[-1] // size
    return x.narrow(-1, rank * width, width).contiguous()


def _gather_columns(x: Tensor, group: Optional[ProcessGroup], size: int) -> Tensor:
    """Every rank's columns side by side: one all-gather of this rank's rows × width/p block."""
    rows = x.reshape(-1, x.shape[-1])
    every = wait(start_all_gather(rows, group, size))  # (p·rows) × width/p, rank-major
    every = every.view(size, rows.shape[0], rows.shape[1]).permute(1, 0, 2)
    return every.reshape(*x.shape[:-1], size * x.shape[-1])


class _SplitToPhantom(torch.autograd.Function):
    """Keep this rank's columns forward; all-gather the gradient's columns backward.

    Every rank holds the whole input and the whole loss; rank i's columns feed only rank i's
    shard, so the gradient of the replicated input is the gradients of the p column blocks side
    by side — an all-gather, the same full gradient on every rank.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[ProcessGroup], rank: int, size: int) -> Tensor:
        ctx.group, ctx.size = group, size
        return _own_columns(x, rank, size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather_columns(grad.contiguous(), ctx.group, ctx.size), None, None, None


class _GatherFromPhantom(torch.autograd.Function):
    """All-gather the columns forward; keep this rank's columns of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[ProcessGroup], rank: int, size: int) -> Tensor:
        ctx.rank, ctx.size = rank, size
        return _gather_columns(x, group, size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _own_columns(grad, ctx.rank, ctx.size), None, None, None


def split_to_phantom(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Enter a column-sharded stream: keep own columns forward, all-gather the gradient backward."""
    if _single(group):
        return x
    size = dist.get_world_size(group)
    if x.shape[-1] % size:
        raise ValueError(f"split_to_phantom: the last dimension of shape {tuple(x.shape)} is not divisible by the "
                         f"group size {size}; each rank keeps width/{size} columns")
    return _SplitToPhantom.apply(x, group, dist.get_rank(group), size)


def gather_from_phantom(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Leave a column-sharded stream: all-gather the columns forward, keep own columns backward."""
    if _single(group):
        return x
    return _GatherFromPhantom.apply(x, group, dist.get_rank(group), dist.get_world_size(group))


# ------------------------------------------------------- whole-model collectives
BUCKET_NUMEL = 1 << 25  # elements per flat buffer when coalescing collectives (128 MiB in fp32)


def coalesced(tensors: list[Tensor], op: Callable[[Tensor], None], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Apply an in-place collective to ``tensors`` through a few flat buffers (per dtype and device).

    One collective per bucket instead of one per tensor: a model's hundreds of small tensors
    would otherwise pay the per-call latency hundreds of times.
    """
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_kind[(t.dtype, t.device)].append(t)

    def flush(bucket: list[Tensor]) -> None:
        flat = torch._utils._flatten_dense_tensors(bucket)
        op(flat)
        for t, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)

    for same in by_kind.values():
        bucket, numel = [], 0
        for t in same:
            if bucket and numel + t.numel() > bucket_numel:
                flush(bucket)
                bucket, numel = [], 0
            bucket.append(t)
            numel += t.numel()
        if bucket:
            flush(bucket)


def broadcast_tensors(tensors: list[Tensor], group: Optional[ProcessGroup], src: int) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with global rank ``src``'s values (meta ones skipped)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    with torch.no_grad():
        coalesced([t for t in tensors if not t.is_meta], lambda flat: dist.broadcast(flat, src=src, group=group))
