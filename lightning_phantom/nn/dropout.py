"""Dropout of a sharded activation: this rank's slice of the dense model's mask.

Between the first and last Linear of a phantom FFN each rank holds n/p features of every row
(and of a transformer stack's residual stream, or h/p of its attention heads). ``nn.Dropout``
there would draw a mask for the local n/p features from torch's global RNG, which the ranks of
a group keep in step (they run the same program from the same seed): feature j of rank 0 and
feature j of rank 1 would always be dropped together.

``ShardedDropout`` draws the mask of the whole activation, (rows × n), from the global RNG
exactly as ``nn.Dropout`` on the dense activation does (on CPU, ``F.dropout`` is
``empty_like(x).bernoulli_(1 − p)``, divided by 1 − p), and keeps this rank's slice.
``empty_like`` keeps x's memory layout and ``bernoulli_`` fills memory in order, so the full
mask is allocated in the layout of the input (a transposed activation, as torch's batch-first
attention output is, gets a transposed mask). Every rank
draws the same full mask and keeps a different part of it, so

* the masks of a group are those of the dense model: on CPU, from the same RNG state, a phantom
  model at ``ghosts="full"`` computes in training mode what the dense model computes;
* ``torch.utils.checkpoint`` (which restores the RNG state before it recomputes a forward)
  redraws the same mask, so gradients under activation checkpointing are right;
* there is no state: nothing is seeded when the layer is built (meta-device initialisation
  works), nothing is in the state dict, ``torch.compile`` traces it like any dropout, and it
  *is* an ``nn.Dropout``, so code that finds dropout by type (Monte-Carlo dropout, changing
  ``p``) finds it. A resumed run draws the masks of the uninterrupted one when the RNG state is
  restored with the weights (``PhantomStrategy``'s checkpoints save it).

The price is p times the random numbers of a local mask: rows × n draws per layer, against
the layer's rows × (n²/p² + n·k) multiply-adds.

Dropout of a tensor every rank holds whole (before the first Linear, after the last) stays a
plain ``nn.Dropout``: the ranks draw the same mask from their in-step RNGs, and the tensor
stays replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_phantom.ops.comm import GroupInfo
from lightning_phantom.nn.shard import ShardSpec, _check_divisible, _shard_info, _Sharded


class ShardedDropout(nn.Dropout, _Sharded):
    """This rank's part of ``nn.Dropout(p)`` over an activation of ``features`` split along ``dim``.

    ``features`` is the full size of ``dim`` (the dense width, or the number of heads); the
    input holds ``features / p`` of them, this rank's contiguous slice.
    """

    def __init__(self, p: float, features: int, group=None, *, dim: int = -1,
                 shard: ShardSpec = None) -> None:
        super().__init__(p)  # nn.Dropout checks 0 <= p <= 1
        self.shard = _shard_info(group, shard)
        self.features, self.dim = features, dim
        self.local = _check_divisible("dropout features", features, self.shard.size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.shard.size == 1:
            return F.dropout(x, self.p, self.training)  # one shard: the dense layer itself
        if x.shape[self.dim] != self.local:
            raise ValueError(f"ShardedDropout holds {self.local} of {self.features} features along dim "
                             f"{self.dim} but got inputs of shape {tuple(x.shape)}")
        if self.p == 1:
            return x * x.new_zeros(())
        shape = list(x.shape)
        shape[self.dim] = self.features
        # The dense layer's mask, drawn as F.dropout draws it (in x's memory layout), then this rank's slice.
        # Drawn contiguous in that layout's order and permuted back to x's dims: a permuted allocation
        # would be filled in logical order once torch.compile functionalizes bernoulli_.
        layout = torch.empty_like(x).stride() if not x.is_contiguous() else range(x.dim(), 0, -1)
        outermost_first = sorted(range(x.dim()), key=lambda i: layout[i], reverse=True)
        keep = x.new_empty([shape[i] for i in outermost_first]).bernoulli_(1 - self.p).div_(1 - self.p)
        keep = keep.permute([outermost_first.index(i) for i in range(x.dim())])
        return x * keep.narrow(self.dim, self.shard.rank * self.local, self.local)

    def rebuild(self, info: GroupInfo) -> "ShardedDropout":
        """The same dropout for shard ``info`` (merging and gathering shards)."""
        return ShardedDropout(self.p, self.features, dim=self.dim, shard=info)

    def to_dense(self) -> nn.Dropout:
        return nn.Dropout(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, features={self.features}, dim={self.dim}, rank={self.shard.rank}/{self.shard.size}"
