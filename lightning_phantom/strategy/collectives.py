"""Lightning's collectives under ``PhantomStrategy``: which ranks each one runs over.

The ranks of one phantom group see the same batch and hold the same logged values, so
``reduce`` and ``all_gather`` (behind ``self.log(..., sync_dist=True)`` and
``self.all_gather``, which names the world group when the user does not) run over the
data-parallel group by default: each value counts once per replica, as on DDP, not once per
rank. ``barrier``, ``broadcast`` and
``reduce_boolean_decision`` (early stopping, checkpoint decisions) stay over the world:
every rank takes part.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning.fabric.utilities.distributed import _distributed_is_initialized, _sync_ddp_if_available
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast


class PhantomCollectives(ParallelStrategy):
    """The collective hooks of ``PhantomStrategy`` (a base class of it; ``data_parallel_group`` is its)."""

    _device_mesh: Any
    data_parallel_group: Any

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    @override
    def reduce(self, tensor, group: Optional[Any] = None,
               reduce_op: Optional[Union[ReduceOp, str]] = "mean"):
        """Over the data-parallel group by default: the ranks of a phantom group hold the same values."""
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, self._default_group(group), reduce_op=reduce_op)
        return tensor

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """Over the data-parallel group by default: one copy per replica, not one per rank.

        ``LightningModule.all_gather`` passes the world group when the user gives none, so the
        world group means the default here too (else each replica's rows came back p times, and
        a sum over them were p times DDP's). To gather over every rank, pass another group.
        """
        if group is dist.group.WORLD:
            group = None
        return super().all_gather(tensor, group=self._default_group(group), sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        votes = _sync_ddp_if_available(torch.tensor(int(decision), device=self.root_device), None,
                                       reduce_op=ReduceOp.SUM)  # over the world: every rank votes
        return bool(votes == self.world_size) if all else bool(votes)

    def _default_group(self, group):
        return group if group is not None or self._device_mesh is None else self.data_parallel_group
