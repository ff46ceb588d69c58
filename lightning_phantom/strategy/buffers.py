"""Buffers stay equal across the data-parallel replicas, as DDP's ``broadcast_buffers=True`` keeps them.

A training forward changes some buffers from the batch it sees — BatchNorm's running
statistics, a user's moving averages — and each replica sees its own batches, so without
this the replicas' copies drift apart after the set-up sync (``sync_replicas``), each replica
validates with its own statistics, and a checkpoint keeps whichever copy it happens to write.
DDP's default, and what this does: every replica takes data-parallel rank 0's floating buffers
before each training forward (its own forward then updates them from its own batch, as under
DDP), before an evaluation forward that follows training, and before a checkpoint is written,
which therefore holds rank 0's statistics, the ones every replica continues from.

One coalesced broadcast over the data axis per training step, from the second one on (the
first starts from the set-up sync). Nothing for a model without floating buffers, nor with one
replica. Integer buffers (``num_batches_tracked``) count the same on every replica and are
left alone. A sharded buffer (a ``PhantomBatchNorm1d``'s statistics) goes to the replicas of
its own shard: the data group of a phantom rank is exactly those replicas.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from lightning_phantom.ops.comm import broadcast_tensors


class BufferSync:
    """Data-parallel rank 0's floating buffers to every replica, whenever a training forward may have changed them."""

    def __init__(self, module: nn.Module, data_group: dist.ProcessGroup, data: int) -> None:
        self.module, self.data_group = module, data_group
        # Walked again at each sync (a module may replace a buffer); none at set-up, none ever.
        self.active = data > 1 and any(b.is_floating_point() for b in module.buffers())
        self.source = dist.get_global_rank(data_group, 0) if self.active else 0
        self.broadcasts = 0
        self._dirty = False  # a training forward ran since the last sync

    def before_batch(self, training: bool) -> None:
        """Call before every forward's batch (training, validation, test, predict); collective when it sends."""
        if not self.active:
            return
        self.before_save()
        self._dirty = self._dirty or training  # the coming forward updates them from this replica's batch

    def before_save(self) -> None:
        """Call before a checkpoint takes the buffers, on every rank: it then holds rank 0's."""
        if self._dirty:
            broadcast_tensors([b for b in self.module.buffers() if b.is_floating_point()], self.data_group,
                              self.source)
            self.broadcasts += 1
            self._dirty = False
