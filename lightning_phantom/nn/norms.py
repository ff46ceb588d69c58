"""Normalisation over sharded features: this rank's slice of a LayerNorm, RMSNorm or BatchNorm1d.

Between the Linear layers of a ``PhantomFFN`` each rank holds n/p features of every row.

* ``PhantomLayerNorm`` and ``PhantomRMSNorm`` normalise a row over all n features: each
  rank sums its own features (Σx and Σx² for LayerNorm, Σx² for RMSNorm) and one
  all-reduce of those 2 (or 1) values per row gives every rank the row's statistics
  (``lightning_phantom.ops.comm.reduce_statistics``; its backward is an all-reduce too).
* ``PhantomBatchNorm1d`` normalises each feature over the batch: a feature's statistics
  live on the rank that holds it, and nothing crosses ranks, in training or in eval.

The affine weight and bias (and BatchNorm's running statistics) are sliced with the
features, so rank i's tensors are ``dense[i*n/p:(i+1)*n/p]`` and the state-dict names are
those of the dense module. ``shard_norm`` / ``merge_norms`` / ``PhantomNorm.to_dense``
convert exactly in both directions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_phantom.ops.comm import GroupInfo, reduce_statistics
from lightning_phantom.nn.shard import ShardSpec, _check_divisible, _shard_info, _Sharded


class PhantomNorm(_Sharded):
    """What the sharded norms share: the full width ``features``, conversion to and from dense."""

    dense_type: type[nn.Module]
    features: int

    @classmethod
    def dense_config(cls, dense: nn.Module) -> tuple[int, dict]:
        """(features, constructor keywords) of the dense module ``dense``."""
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor keywords shared by this module and its dense form."""
        raise NotImplementedError

    def _dense_from_config(self, **factory) -> nn.Module:
        raise NotImplementedError

    def _tensor(self) -> Optional[Tensor]:
        return next(iter([*self.parameters(), *self.buffers()]), None)

    def rebuild(self, info: GroupInfo) -> "PhantomNorm":
        """An empty norm of the same kind for shard ``info`` (tensors to be loaded)."""
        like = self._tensor()
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        return type(self)(self.features, **self.config(), shard=info, **factory)

    def to_dense(self) -> nn.Module:
        """The dense module, for a norm that is the whole of its group (``shard.size == 1``)."""
        if self.shard.size != 1:
            raise ValueError(f"{type(self).__name__} is shard {self.shard.rank} of {self.shard.size}; merge the "
                             "shards first (lightning_phantom.merge_shards, or to_dense on the whole PhantomFFN)")
        like = self._tensor()
        dense = self._dense_from_config(**({} if like is None else {"device": like.device, "dtype": like.dtype}))
        dense.load_state_dict(self.state_dict())
        return dense

    def _check_width(self, x: Tensor) -> None:
        local = self.features // self.shard.size
        if x.shape[-1] != local:
            raise ValueError(f"{type(self).__name__} holds {local} of {self.features} features but got inputs of "
                             f"shape {tuple(x.shape)}")
        self._check_group()

    def _total(self, partial: Tensor) -> Tensor:
        """Row statistics summed over the group. A norm that is its whole group sums nothing, even in a
        larger world (a merged or gathered shard): ``group=None`` there would mean the world."""
        return partial if self.shard.size == 1 else reduce_statistics(partial, self.shard.group)

    def extra_repr(self) -> str:
        return f"{self.features}, rank={self.shard.rank}/{self.shard.size}, " + ", ".join(
            f"{k}={v}" for k, v in self.config().items())


def _statistics_dtype(x: Tensor) -> torch.dtype:
    # Sums over a row in at least float32: half-precision sums of squares lose the variance.
    return torch.promote_types(x.dtype, torch.float32)


class PhantomLayerNorm(PhantomNorm):
    """This rank's features of ``nn.LayerNorm(features)`` (normalised over the last dimension).

    mean = Σx/n and var = Σx²/n − mean², the sums taken over the whole row with one
    all-reduce of 2 values per row. The one-pass variance loses precision when |mean| ≫ std
    (as any single-reduction variance does); the sums are accumulated in float32 or wider.
    """

    dense_type = nn.LayerNorm

    def __init__(self, features: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 group=None, *, shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        self.shard = _shard_info(group, shard)
        self.features, self.eps, self.elementwise_affine = features, eps, elementwise_affine
        local = _check_divisible("LayerNorm features", features, self.shard.size)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(local, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None and not self.weight.is_meta:
            nn.init.ones_(self.weight)
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    @classmethod
    def dense_config(cls, dense: nn.LayerNorm) -> tuple[int, dict]:
        return dense.normalized_shape[-1], {"eps": dense.eps, "elementwise_affine": dense.elementwise_affine,
                                            "bias": getattr(dense, "bias", None) is not None}

    def config(self) -> dict:
        return {"eps": self.eps, "elementwise_affine": self.elementwise_affine, "bias": self.bias is not None}

    def _dense_from_config(self, **factory) -> nn.Module:
        return nn.LayerNorm(self.features, **self.config(), **factory)

    def forward(self, x: Tensor) -> Tensor:
        self._check_width(x)
        work = x.to(_statistics_dtype(x))
        sums = torch.stack([work.sum(-1), work.square().sum(-1)], dim=-1)
        sums = self._total(sums)
        mean = sums[..., :1] / self.features
        var = (sums[..., 1:] / self.features - mean.square()).clamp_min(0)
        y = ((work - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class PhantomRMSNorm(PhantomNorm):
    """This rank's features of ``nn.RMSNorm(features)``: x / sqrt(Σx²/n + eps) · weight, 1 value per row sent."""

    dense_type = nn.RMSNorm

    def __init__(self, features: int, eps: Optional[float] = None, elementwise_affine: bool = True, group=None,
                 *, shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        self.shard = _shard_info(group, shard)
        self.features, self.eps, self.elementwise_affine = features, eps, elementwise_affine
        local = _check_divisible("RMSNorm features", features, self.shard.size)
        self.weight = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if elementwise_affine else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None and not self.weight.is_meta:
            nn.init.ones_(self.weight)

    @classmethod
    def dense_config(cls, dense: nn.RMSNorm) -> tuple[int, dict]:
        return dense.normalized_shape[-1], {"eps": dense.eps, "elementwise_affine": dense.elementwise_affine}

    def config(self) -> dict:
        return {"eps": self.eps, "elementwise_affine": self.elementwise_affine}

    def _dense_from_config(self, **factory) -> nn.Module:
        return nn.RMSNorm(self.features, **self.config(), **factory)

    def forward(self, x: Tensor) -> Tensor:
        self._check_width(x)
        work = x.to(_statistics_dtype(x))
        squares = self._total(work.square().sum(-1, keepdim=True))
        # nn.RMSNorm's default eps is that of its compute type (float32 for bfloat16/float16
        # inputs: at::opmath_type), not of the input's dtype: bfloat16's 7.8e-3 would swamp
        # small activations.
        eps = torch.finfo(work.dtype).eps if self.eps is None else self.eps
        y = work * torch.rsqrt(squares / self.features + eps)
        if self.weight is not None:
            y = y * self.weight
        return y.to(x.dtype)  # as nn.RMSNorm: weighted in the compute type, then the input's dtype


class PhantomBatchNorm1d(PhantomNorm, nn.BatchNorm1d):
    """This rank's features of ``nn.BatchNorm1d(features)``: per-feature, so no communication.

    Takes (batch, features/p) inputs, as ``nn.BatchNorm1d`` does after an ``nn.Linear``.
    The batch statistics are over this replica's batch, as in the dense model under DDP.
    """

    dense_type = nn.BatchNorm1d
    replicated = ("num_batches_tracked",)  # the same count on every rank

    def __init__(self, features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group=None, *, shard: ShardSpec = None, device=None,
                 dtype=None) -> None:
        info = _shard_info(group, shard)
        local = _check_divisible("BatchNorm1d features", features, info.size)
        nn.BatchNorm1d.__init__(self, local, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.shard, self.features = info, features

    @classmethod
    def dense_config(cls, dense: nn.BatchNorm1d) -> tuple[int, dict]:
        return dense.num_features, {"eps": dense.eps, "momentum": dense.momentum, "affine": dense.affine,
                                    "track_running_stats": dense.track_running_stats}

    def config(self) -> dict:
        return {"eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}

    def _dense_from_config(self, **factory) -> nn.Module:
        return nn.BatchNorm1d(self.features, **self.config(), **factory)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"PhantomBatchNorm1d normalises (batch, features) inputs, as nn.BatchNorm1d after "
                             f"an nn.Linear; got shape {tuple(x.shape)}. For (batch, tokens, features) use "
                             "LayerNorm or RMSNorm.")
        self._check_width(x)
        return nn.BatchNorm1d.forward(self, x)


#: Dense normalisation module → its sharded form.
PHANTOM_NORMS: dict[type, type[PhantomNorm]] = {cls.dense_type: cls for cls in
                                                (PhantomLayerNorm, PhantomRMSNorm, PhantomBatchNorm1d)}


def norm_refusal(dense: nn.Module) -> Optional[str]:
    """Why ``dense`` (a LayerNorm/RMSNorm/BatchNorm1d) cannot be sharded, or None."""
    shape = getattr(dense, "normalized_shape", None)
    if shape is not None and len(shape) != 1:
        return (f"it normalises over the last {len(shape)} dimensions {tuple(shape)}; between Linear layers only "
                "the feature dimension is sharded, so normalized_shape must be one int")
    return None


def shard_norm(dense: nn.Module, info: GroupInfo, fresh: bool = False) -> PhantomNorm:
    """Rank ``info.rank``'s slice of a dense norm; ``fresh`` keeps only the configuration (and meta tensors)."""
    cls = PHANTOM_NORMS[type(dense)]
    features, config = cls.dense_config(dense)
    like = next(iter([*dense.parameters(), *dense.buffers()]), None)
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    layer = cls(features, **config, shard=info, **factory)
    if not fresh and (like is None or not like.is_meta):
        local = features // info.size
        layer.load_state_dict({
            name: t if name in cls.replicated else t[info.rank * local:(info.rank + 1) * local]
            for name, t in dense.state_dict().items()
        })
    return layer


def merge_norms(parts: Sequence[PhantomNorm], own: range, info: GroupInfo) -> PhantomNorm:
    """The norm of new shard ``info`` from old ranks ``own`` (their features side by side)."""
    layer = parts[0].rebuild(info)
    states = [p.state_dict() for p in parts]
    layer.load_state_dict({
        name: t if name in layer.replicated else torch.cat([states[i][name] for i in own])
        for name, t in states[0].items()
    })
    return layer
