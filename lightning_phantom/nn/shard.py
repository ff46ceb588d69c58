"""Where a module's tensors sit in a phantom group: the base of every sharded module.

Kept apart from the layers so that the layers, the norms and the dropout can all build on it
without importing one another.
"""

from __future__ import annotations

from typing import Union

import torch.distributed as dist
from torch import nn

from lightning_phantom.ops.comm import GroupInfo

ShardSpec = Union[GroupInfo, tuple, None]


def _shard_info(group, shard: ShardSpec) -> GroupInfo:
    if shard is None:
        return GroupInfo.of(group)
    if isinstance(shard, GroupInfo):
        return shard
    rank, size = shard
    if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard!r}")
    return GroupInfo(group, rank, size)


def _check_divisible(what: str, width: int, size: int) -> int:
    if width % size:
        raise ValueError(
            f"{what} ({width}) is not divisible by the phantom group size ({size}): each rank holds "
            f"{width}/{size} neurons. Choose a width that is a multiple of {size} or another group size."
        )
    return width // size


class _Sharded(nn.Module):
    """A module holding this rank's slice of something split over a phantom group.

    Its parameters (and buffers, e.g. a BatchNorm's running statistics) differ between
    the ranks of the group, except those named in ``replicated``.
    """

    shard: GroupInfo
    replicated: tuple[str, ...] = ()

    def _check_group(self) -> None:
        s = self.shard
        if s.size == 1:
            return
        if not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} is shard {s.rank} of {s.size} but torch.distributed is not "
                "initialised; run it in the phantom group it was built for, or call to_dense() for one process."
            )
        size, rank = dist.get_world_size(s.group), dist.get_rank(s.group)
        if (size, rank) != (s.size, s.rank):
            raise RuntimeError(
                f"{type(self).__name__} holds shard {s.rank} of {s.size}, but its process group has size "
                f"{size} and this process is rank {rank} in it. Re-shard the model for this group "
                "(lightning_phantom.merge_shards) or run it with the group it was built for."
            )
