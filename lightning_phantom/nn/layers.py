"""Phantom-parallel layers: this rank's shard of each layer of an FFN.

* ``ColumnParallelLinear`` — first layer: replicated input, this rank's c output neurons.
* ``PhantomLinear`` — hidden layer: local block + compressor + decompressors (docs/operator.md §2).
* ``RowParallelLinear`` — last layer: partial products summed over the group, full output.
* ``PhantomFFN`` — an ``nn.Sequential`` of those with element-wise activations between,
  so a converted model keeps the state-dict keys (``0.weight``, ``2.compress`` …) and the
  layer order of the dense ``nn.Sequential`` it replaces.

Every layer knows its place in the phantom group (``self.shard``: group, rank, size). A
shard can also be built with ``shard=(rank, size)`` and no process group, which is how
conversion, merging and ``to_dense`` assemble shards on one process.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_phantom.nn.blocks import is_block
from lightning_phantom.nn.ghosts import GhostSpec, resolve_ghosts
from lightning_phantom.ops.comm import GroupInfo, copy_to_phantom, reduce_from_phantom
from lightning_phantom.ops.operator import PhantomLinearFunction
from lightning_phantom.nn.dropout import ShardedDropout
from lightning_phantom.nn.shard import ShardSpec, _check_divisible, _shard_info, _Sharded


# Modules that act on each element alone: they commute with slicing a layer's neurons
# over ranks, so they may sit between phantom layers unchanged.
ELEMENTWISE = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout,
    nn.ELU, nn.Mish, nn.ReLU6, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.PReLU,
)
ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU, "identity": nn.Identity,
}


def _shard_generator(rank: int, device) -> torch.Generator:
    """A generator distinct per phantom rank and reproducible under a global seed.

    One draw from the global RNG keeps every rank's global stream in step (so replicated
    parameters and data-parallel replicas stay identical); adding the phantom rank gives
    each shard its own values, as slices of one dense initialisation would have.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item()) + 7919 * rank
    return torch.Generator(device=device).manual_seed(seed)


class _Shard(_Sharded):
    """What the phantom Linear layers share: sizes and input checks."""

    in_features: int

    def _check_input(self, x: Tensor, width: int) -> None:
        if x.shape[-1] != width:
            raise ValueError(
                f"{type(self).__name__} expects inputs whose last dimension is {width}, got shape "
                f"{tuple(x.shape)}."
            )
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{type(self).__name__} got input of dtype {x.dtype} but its parameters are "
                f"{self.weight.dtype}: convert one to match (x.to({self.weight.dtype}) or "
                f"module.to({x.dtype})), or run under torch.autocast."
            )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.shard.rank}/{self.shard.size}"


class ColumnParallelLinear(_Shard):
    """First layer: input replicated on every rank, rank i computes out_features/p outputs."""

    def __init__(self, in_features: int, out_features: int, group=None, bias: bool = True, *,
                 shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        self.shard = _shard_info(group, shard)
        self.in_features, self.out_features = in_features, out_features
        rows = _check_divisible("out_features", out_features, self.shard.size)
        self.weight = nn.Parameter(torch.empty(rows, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        # Rows of nn.Linear(in_features, out_features): U(±1/sqrt(fan_in)) for weight and bias.
        bound = 1 / math.sqrt(self.in_features)
        gen = _shard_generator(self.shard.rank, self.weight.device)
        with torch.no_grad():
            for p in (self.weight, self.bias):
                if p is not None:
                    p.uniform_(-bound, bound, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, self.in_features)
        self._check_group()
        if self.shard.size > 1:
            x = copy_to_phantom(x, self.shard.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_Shard):
    """Last layer: Y = all_reduce(Σ_i X_i W_iᵀ) + b, the bias replicated and added once."""

    replicated = ("bias",)

    def __init__(self, in_features: int, out_features: int, group=None, bias: bool = True, *,
                 shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        self.shard = _shard_info(group, shard)
        self.in_features, self.out_features = in_features, out_features
        cols = _check_divisible("in_features", in_features, self.shard.size)
        self.weight = nn.Parameter(torch.empty(out_features, cols, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=_shard_generator(self.shard.rank, self.weight.device))
            if self.bias is not None:
                # Replicated: drawn from the global stream, identical on every rank.
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, self.weight.shape[1])
        self._check_group()
        y = F.linear(x, self.weight)
        if self.shard.size > 1:
            y = reduce_from_phantom(y, self.shard.group)
        return y + self.bias if self.bias is not None else y


class PhantomLinear(_Shard):
    """One hidden phantom layer, this rank's shard (docs/operator.md §2).

    ``weight`` is L_i (c × a), ``bias`` b_i (c), ``compress`` C_i (ghosts × a) and
    ``decompress`` the decompressors [D_ij]_{j≠i} side by side (c × (p−1)·ghosts). With a
    group of one there is nothing to compress for: ``compress``/``decompress`` are None
    and the layer is a plain ``Linear``.
    """

    def __init__(self, in_features: int, out_features: int, ghosts: int, group=None, bias: bool = True, *,
                 overlap: bool = True, shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        self.shard = _shard_info(group, shard)
        p = self.shard.size
        a = _check_divisible("in_features", in_features, p)
        c = _check_divisible("out_features", out_features, p)
        (ghosts,) = resolve_ghosts(ghosts, [in_features], p, type(self).__name__)
        self.in_features, self.out_features, self.ghosts, self.overlap = in_features, out_features, ghosts, overlap
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(c, a, **factory))
        self.bias = nn.Parameter(torch.empty(c, **factory)) if bias else None
        if p > 1:
            self.compress = nn.Parameter(torch.empty(ghosts, a, **factory))
            self.decompress = nn.Parameter(torch.empty(c, (p - 1) * ghosts, **factory))
        else:
            self.register_parameter("compress", None)
            self.register_parameter("decompress", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh initialisation with the output variance of a dense ``nn.Linear(n_in, n_out)``.

        Dense: W ~ U(±1/sqrt(n_in)) has Var W = 1/(3 n_in); for inputs with E[x²] = s each
        output gets n_in · s/(3 n_in) from its n_in inputs, s/(3 n_in) per input.
        Phantom, rank i's output from rank j ≠ i: (D_ij C_j x_j)_r = Σ_m Σ_l D_rm C_ml x_l,
        a sum of k·a independent products with variance k·a·Var D·Var C·s. Matching the
        dense a·s/(3 n_in) needs Var D·Var C = 1/(3 n_in k). Taking C like
        nn.Linear(a, k) (Var C = 1/(3a), ghosts on the scale of a dense output) leaves
        Var D = a/(n_in k) = 1/(p k), i.e. D ~ U(±sqrt(3/(p k))). L_i and b_i are slices of
        the dense layer's initialisation.
        """
        if self.weight.is_meta:
            return
        p, k = self.shard.size, self.ghosts
        gen = _shard_generator(self.shard.rank, self.weight.device)
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=gen)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound, generator=gen)
            if p > 1:
                self.compress.uniform_(-1 / math.sqrt(self.weight.shape[1]), 1 / math.sqrt(self.weight.shape[1]),
                                       generator=gen)
                self.decompress.uniform_(-math.sqrt(3 / (p * k)), math.sqrt(3 / (p * k)), generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        a = self.weight.shape[1]
        self._check_input(x, a)
        if self.shard.size == 1:
            return F.linear(x, self.weight, self.bias)
        self._check_group()
        params = (self.weight, self.bias, self.compress, self.decompress)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # What custom_fwd(cast_inputs=...) does, for whichever device autocasts: run the
            # operator in the autocast dtype; the casts are differentiable, so gradients
            # reach the float32 parameters.
            dtype = torch.get_autocast_dtype(device)
            x = x.to(dtype)
            params = tuple(p.to(dtype) if p is not None else None for p in params)
            with torch.autocast(device, enabled=False):
                return self._apply_op(x, params)
        return self._apply_op(x, params)

    def _apply_op(self, x: Tensor, params) -> Tensor:
        s = self.shard
        z = PhantomLinearFunction.apply(x.reshape(-1, x.shape[-1]), *params, s.group, s.rank, s.size, self.overlap)
        return z.view(*x.shape[:-1], z.shape[-1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghosts={self.ghosts}, overlap={self.overlap}"


def _activation(activation) -> nn.Module:
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return ACTIVATIONS[activation.lower()]()
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or an nn.Module, got {activation!r}")


class PhantomFFN(nn.Sequential):
    """This rank's shard of a feed-forward network in phantom-parallel form.

    ``sizes = [d_in, n_1, …, n_{L-1}, d_out]`` gives L linear layers: column-parallel
    first, L−2 phantom hidden layers, row-parallel last, with ``activation`` (and
    ``dropout`` if > 0) between them. The input is the full tensor, replicated on the
    ranks of the group, with any leading dimensions (B×d or B×T×d); the output is the full
    tensor on every rank, so losses and metrics are written as for one device.
    """

    def __init__(self, sizes: Sequence[int], ghosts: Union[GhostSpec, Sequence[int]] = "auto", activation="relu",
                 dropout: float = 0.0, group=None, bias: bool = True, *, overlap: bool = True,
                 shard: ShardSpec = None, device=None, dtype=None) -> None:
        sizes = list(sizes)
        if len(sizes) < 4:
            raise ValueError(
                f"PhantomFFN needs at least 3 linear layers (sizes = [d_in, n_1, n_2, d_out]), got sizes={sizes}: "
                "with fewer there is no hidden-to-hidden layer to make phantom."
            )
        info = _shard_info(group, shard)
        per_layer = resolve_ghosts(ghosts, sizes[1:-2], info.size, type(self).__name__)
        kw = {"bias": bias, "shard": info, "device": device, "dtype": dtype}

        def drop(width: int) -> list[nn.Module]:  # between sharded layers: this rank's part of the mask
            return [ShardedDropout(dropout, width, shard=info)] if dropout else []

        layers: list[nn.Module] = [ColumnParallelLinear(sizes[0], sizes[1], **kw)]
        for i, k in enumerate(per_layer, start=1):
            layers += [_activation(activation)] + drop(sizes[i])
            layers.append(PhantomLinear(sizes[i], sizes[i + 1], k, overlap=overlap, **kw))
        layers += [_activation(activation)] + drop(sizes[-2])
        layers.append(RowParallelLinear(sizes[-2], sizes[-1], **kw))
        super().__init__(*layers)

    @classmethod
    def from_layers(cls, layers: Union[Sequence[nn.Module], Mapping[str, nn.Module]]) -> "PhantomFFN":
        """Assemble already-built shards (used by conversion and merging); a mapping keeps child names."""
        ffn = cls.__new__(cls)
        if isinstance(layers, Mapping):
            nn.Sequential.__init__(ffn, OrderedDict(layers))
        else:
            nn.Sequential.__init__(ffn, *layers)
        return ffn

    def layers(self) -> list[nn.Module]:
        """The layers in order, with nested ``nn.Sequential`` blocks flattened."""
        return [m for _, m in leaf_layers(self)]

    @property
    def shard(self) -> GroupInfo:
        return next(m for m in self.layers() if isinstance(m, _Shard)).shard

    @property
    def sizes(self) -> list[int]:
        linears = [m for m in self.layers() if isinstance(m, _Shard)]
        return [linears[0].in_features] + [m.out_features for m in linears]

    @property
    def ghosts(self) -> list[int]:
        return [m.ghosts for m in self.layers() if isinstance(m, PhantomLinear)]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"PhantomFFN expects a floating-point tensor, got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')}")
        if x.dim() < 1 or x.shape[-1] != self.sizes[0]:
            raise ValueError(f"PhantomFFN expects inputs of shape (..., {self.sizes[0]}), got {tuple(x.shape)}")
        return super().forward(x)


def leaf_layers(seq: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, layer) of every layer of ``seq``, nested blocks (``blocks.is_block``) flattened."""
    out = []
    # _modules, not named_children(): a layer placed twice must be seen twice (tied weights are refused).
    for name, child in seq._modules.items():
        if is_block(child):  # nn.Sequential, or a subclass keeping its forward
            out += leaf_layers(child, f"{prefix}{name}.")
        else:
            out.append((prefix + name, child))
    return out


def sharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters split over a phantom group (each rank holds a different part).

    A norm over the whole model sums these over the group and counts every other
    parameter (replicated on the group's ranks) once.
    """
    out = []
    for m in module.modules():
        if isinstance(m, _Sharded) and m.shard.size > 1:
            out += [p for name, p in m.named_parameters(recurse=False) if name not in m.replicated]
    return out


def sharded_buffers(module: nn.Module) -> list[Tensor]:
    """Buffers split over a phantom group, e.g. the running statistics of a sharded BatchNorm1d."""
    out = []
    for m in module.modules():
        if isinstance(m, _Sharded) and m.shard.size > 1:
            out += [b for name, b in m.named_buffers(recurse=False) if name not in m.replicated]
    return out


def set_group(module: nn.Module, group) -> nn.Module:
    """Attach the phantom shards in ``module`` to ``group`` (e.g. after ``merge_shards``)."""
    for m in module.modules():
        if isinstance(m, _Sharded):
            info = GroupInfo.of(group)
            if (info.size, info.rank) != (m.shard.size, m.shard.rank):
                raise ValueError(
                    f"{type(m).__name__} is shard {m.shard.rank} of {m.shard.size} but this process is rank "
                    f"{info.rank} of a group of {info.size}; give each rank the shard with its rank in a group "
                    "of the shards' size"
                )
            m.shard = info
    return module
