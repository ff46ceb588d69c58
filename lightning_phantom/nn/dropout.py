"""Dropout in a phantom FFN: independent masks for the shards, one mask for replicated tensors.

The ranks of a phantom group run the same program from the same seed, so ``nn.Dropout``
between sharded layers would drop the same positions of every rank's shard: neuron j of
rank 0 and neuron j of rank 1 would always be dropped together. Megatron-LM keeps a
separate RNG state per tensor-parallel rank for this (its model-parallel RNG tracker);
here each dropout layer owns its generator:

* ``ShardedDropout`` — between the first and last Linear: seeded per phantom rank.
* ``ReplicatedDropout`` — before the first or after the last Linear, where every rank
  holds the whole tensor: one seed for the group, so every rank drops the same positions
  and the replicated tensor stays replicated.

The generator state is a buffer ``rng = [seed, calls]``: it is part of the module's
state dict, so a checkpoint saves it and a resumed run draws the masks it would have
drawn. Seeds come from the global RNG when the layer is built, so ``seed_everything``
makes them reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_phantom.ops.comm import GroupInfo
from lightning_phantom.nn.shard import ShardSpec, _shard_info, _Sharded

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, call) pairs over the seed space


def draw_seed() -> int:
    """A seed from the global RNG (the same on every rank that runs in step)."""
    return int(torch.randint(0, 2**62, (1,)).item())


class _SeededDropout(nn.Module):
    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"dropout probability must be between 0 and 1, got {p!r}")
        self.p = float(p)
        self.register_buffer("rng", torch.tensor([seed, 0], dtype=torch.int64))
        self._generators: dict[torch.device, torch.Generator] = {}
        self._known = None  # (buffer, its version, seed, calls): read the buffer only when it changed

    def _next_seed(self) -> int:
        known, rng = self._known, self.rng
        if known is None or known[0] is not rng or known[1] != rng._version:
            seed, calls = rng.tolist()  # after loading, moving or broadcasting the buffer
        else:
            seed, calls = known[2], known[3]
        with torch.no_grad():
            rng[1] += 1
        self._known = (rng, rng._version, seed, calls + 1)
        return (seed + calls * _GOLDEN) % 2**63

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device)
        gen.manual_seed(self._next_seed())
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=gen)
        return x * keep / (1 - self.p)

    def to_dense(self) -> nn.Dropout:
        return nn.Dropout(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReplicatedDropout(_SeededDropout):
    """Dropout of a tensor every rank of the group holds whole: the same mask on every rank."""


class ShardedDropout(_SeededDropout, _Sharded):
    """Dropout of this rank's shard of an activation, with this rank's own masks."""

    def __init__(self, p: float, seed: int, group=None, *, shard: ShardSpec = None) -> None:
        super().__init__(p, seed)
        self.shard = _shard_info(group, shard)

    @classmethod
    def for_rank(cls, p: float, seed: int, info: GroupInfo) -> "ShardedDropout":
        # Distinct per phantom rank; a prime stride keeps neighbouring seeds apart.
        return cls(p, (seed + 7919 * info.rank) % 2**62, shard=info)

    def rebuild(self, info: GroupInfo) -> "ShardedDropout":
        return ShardedDropout(self.p, 0, shard=info)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.shard.rank}/{self.shard.size}"
