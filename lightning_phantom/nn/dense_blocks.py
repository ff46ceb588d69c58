"""Dense transformer blocks and stacks that phantom parallelism converts: a small registry of kinds.

A dense model knows nothing of parallelism; its phantom form is built by a conversion that
reads the dense block into its *parts* (``BlockParts``: the fused QKV, the attention output,
the MLP's two linears, two norms, the activation, the dropouts and the block's layout) and
builds a dense block back from parts. A ``DenseBlockKind`` is that pair, reader and builder, for
one class; a ``DenseStackKind`` does the same for a stack of blocks (its blocks, its final norm,
its own settings). ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are the built-in
entries; ``register_dense_block`` / ``register_dense_stack`` add others (a GPT block with
separate q/k/v/out ``nn.Linear`` s, say: its reader concatenates [W_q; W_k; W_v]).

Kinds are looked up by exact class: a subclass may change ``forward``, so it is converted only
once it is registered itself. A reader refuses what it cannot convert with a ``ValueError``
that names the module and the reason. A record of a phantom stack
(``nn/transformer_architecture.py``) names its kinds by ``kind_name`` and holds the stack's
``StackParts.config``, which must therefore be plain data (str, int, float, bool, None, lists
and dicts of them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_phantom.nn.norms import PHANTOM_NORMS, norm_refusal
from lightning_phantom.nn.transformer import Activation, elementwise_activation


@dataclass(frozen=True)
class DenseLinear:
    """A dense linear map as tensors: ``weight`` (out × in) and ``bias`` (out) or None."""

    weight: Tensor
    bias: Optional[Tensor]

    @classmethod
    def of(cls, linear: nn.Linear) -> "DenseLinear":
        return cls(linear.weight, linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class BlockParts:
    """One dense transformer block, as the parts its phantom form is built from.

    ``qkv`` is d → 3d with rows [W_q; W_k; W_v], head h in rows h·e … (h+1)·e − 1 of each
    (e = d/nhead), as ``nn.MultiheadAttention.in_proj_weight``. ``norm1``/``norm2`` are dense
    ``nn.LayerNorm``/``nn.RMSNorm`` over d. With ``norm_first`` the norms come before attention
    and MLP, otherwise after the residual additions (as ``nn.TransformerEncoderLayer``).
    """

    nhead: int
    qkv: DenseLinear
    out: DenseLinear
    linear1: DenseLinear
    linear2: DenseLinear
    norm1: nn.Module
    norm2: nn.Module
    activation: Activation
    norm_first: bool
    batch_first: bool
    attention_dropout: float = 0.0
    dropout: float = 0.0  # on the MLP's hidden features
    dropout1: float = 0.0  # on the attention's output
    dropout2: float = 0.0  # on the MLP's output
    causal: bool = False  # attends causally whatever masks it is given (a GPT block)

    @property
    def d_model(self) -> int:
        return self.qkv.in_features

    @property
    def dim_feedforward(self) -> int:
        return self.linear1.out_features

    def tensors(self) -> list[Tensor]:
        linears = (self.qkv, self.out, self.linear1, self.linear2)
        return [t for lin in linears for t in (lin.weight, lin.bias) if t is not None] + [
            *self.norm1.parameters(), *self.norm2.parameters()]


@dataclass(frozen=True)
class StackParts:
    """A dense stack: its blocks (dense modules, in order), its final norm or None, and settings of its own."""

    blocks: Sequence[nn.Module]
    norm: Optional[nn.Module]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseBlockKind:
    """How to read one class of dense block into ``BlockParts`` (``read(module, name)``) and build one back."""

    type: type[nn.Module]
    read: Callable[[nn.Module, str], BlockParts]
    build: Callable[[BlockParts], nn.Module]


@dataclass(frozen=True)
class DenseStackKind:
    """How to read one class of dense stack into ``StackParts`` and build one back from built blocks."""

    type: type[nn.Module]
    read: Callable[[nn.Module, str], StackParts]
    build: Callable[[StackParts], nn.Module]


DENSE_BLOCKS: dict[type, DenseBlockKind] = {}
DENSE_STACKS: dict[type, DenseStackKind] = {}


def register_dense_block(kind: DenseBlockKind) -> DenseBlockKind:
    DENSE_BLOCKS[kind.type] = kind
    return kind


def register_dense_stack(kind: DenseStackKind) -> DenseStackKind:
    DENSE_STACKS[kind.type] = kind
    return kind


def kind_name(cls: type) -> str:
    """The name a dense kind goes by in plain-data records (checkpoints): its class's module and qualname."""
    return f"{cls.__module__}.{cls.__qualname__}"


def registered(name: str, registry: dict[type, Any]) -> type:
    """The class in ``registry`` (``DENSE_BLOCKS``, ``DENSE_STACKS``) whose ``kind_name`` is ``name``."""
    found = next((cls for cls in registry if kind_name(cls) == name), None)
    if found is None:
        raise ValueError(f"{name} is not a registered dense kind ({', '.join(map(kind_name, registry))}). "
                         "Import the module that registers it (register_dense_block / register_dense_stack) "
                         "first.")
    return found


def read_block(module: nn.Module, name: str) -> BlockParts:
    """The parts of dense block ``module`` (called ``name`` in messages), checked; ValueError if it has no kind."""
    kind = DENSE_BLOCKS.get(type(module))
    if kind is None:
        raise ValueError(
            f"{name} is {type(module).__name__}, which is not a dense block kind phantom parallelism knows "
            f"({', '.join(t.__name__ for t in DENSE_BLOCKS)}); a subclass may change forward, so it is not converted "
            "as its base. Register it with lightning_phantom.nn.dense_blocks.register_dense_block, or keep it dense.")
    parts = kind.read(module, name)
    for which in ("norm1", "norm2"):
        check_norm(getattr(parts, which), parts.d_model, f"{name}.{which}")
    elementwise_activation(parts.activation, f"{name}.activation")
    return parts


def check_norm(norm: Optional[nn.Module], width: int, name: str) -> None:
    """A dense norm the stream's norms can be sharded from: LayerNorm/RMSNorm over the ``width`` features."""
    if norm is None:
        return
    if type(norm) not in PHANTOM_NORMS or type(norm) is nn.BatchNorm1d:
        raise ValueError(f"{name} is {type(norm).__name__}; a sharded residual stream is normalised by "
                         "nn.LayerNorm or nn.RMSNorm only. Keep this stack dense, or use one of those.")
    why = norm_refusal(norm)
    features, _ = PHANTOM_NORMS[type(norm)].dense_config(norm)
    if why is None and features != width:
        why = f"it normalises {features} features but the stream has d_model = {width}"
    if why:
        raise ValueError(f"{name} cannot be sharded: {why}.")


def check_untied(tensors: Sequence[tuple[str, Tensor]]) -> None:
    """Sharding would untie shared weights silently: refuse a tensor used in two places."""
    seen: dict[int, str] = {}
    for name, t in tensors:
        if id(t) in seen:
            raise ValueError(f"{name} is the same tensor as {seen[id(t)]}: sharding would untie shared weights "
                             "silently. Give each its own weights, or keep this stack dense.")
        seen[id(t)] = name


# ------------------------------------------------------------- torch's own: the built-in kinds
def _read_encoder_layer(layer: nn.TransformerEncoderLayer, name: str) -> BlockParts:
    attn = layer.self_attn
    refusals = [
        (type(attn) is not nn.MultiheadAttention, f"self_attn is {type(attn).__name__}, not nn.MultiheadAttention"),
        (not attn._qkv_same_embed_dim, f"self_attn has kdim/vdim ({attn.kdim}/{attn.vdim}) other than embed_dim "
                                       f"({attn.embed_dim}): its keys and values are not read from the stream"),
        (attn.bias_k is not None, "self_attn has add_bias_kv=True (learned key/value rows appended to the sequence)"),
        (attn.add_zero_attn, "self_attn has add_zero_attn=True (a zero key/value appended to the sequence)"),
        (any(type(m) is not nn.Linear for m in (layer.linear1, layer.linear2)), "linear1/linear2 are not nn.Linear"),
        (any(type(m) is not nn.Dropout for m in (layer.dropout, layer.dropout1, layer.dropout2)),
         "its dropout layers are not nn.Dropout"),
        (len({attn.in_proj_bias is None, attn.out_proj.bias is None, layer.linear1.bias is None,
              layer.linear2.bias is None}) > 1, "some of its linears have a bias and others not"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{name} ({type(layer).__name__}) cannot be converted to phantom form: {why}. Keep "
                             "this stack dense, or build it from phantom blocks (lightning_phantom.nn.transformer).")
    return BlockParts(
        nhead=attn.num_heads, qkv=DenseLinear(attn.in_proj_weight, attn.in_proj_bias), out=DenseLinear.of(attn.out_proj),
        linear1=DenseLinear.of(layer.linear1), linear2=DenseLinear.of(layer.linear2), norm1=layer.norm1,
        norm2=layer.norm2, activation=layer.activation, norm_first=layer.norm_first, batch_first=attn.batch_first,
        attention_dropout=attn.dropout, dropout=layer.dropout.p, dropout1=layer.dropout1.p, dropout2=layer.dropout2.p)


def _copy(target: Optional[Tensor], value: Optional[Tensor]) -> None:
    if target is not None:
        with torch.no_grad():
            target.copy_(value)


def _build_encoder_layer(parts: BlockParts) -> nn.TransformerEncoderLayer:
    if parts.causal:
        raise ValueError("nn.TransformerEncoderLayer has no always-causal form; build another registered block kind")
    w = parts.qkv.weight
    layer = nn.TransformerEncoderLayer(
        parts.d_model, parts.nhead, parts.dim_feedforward, dropout=parts.dropout, activation=parts.activation,
        batch_first=parts.batch_first, norm_first=parts.norm_first, bias=parts.qkv.bias is not None,
        device=w.device, dtype=w.dtype)
    attn = layer.self_attn
    attn.dropout, layer.dropout1.p, layer.dropout2.p = parts.attention_dropout, parts.dropout1, parts.dropout2
    layer.norm1, layer.norm2 = parts.norm1, parts.norm2  # dense norms, whatever their eps and kind
    for target, source in ((attn.in_proj_weight, parts.qkv.weight), (attn.in_proj_bias, parts.qkv.bias),
                           (attn.out_proj.weight, parts.out.weight), (attn.out_proj.bias, parts.out.bias)):
        _copy(target, source)
    for linear, dense in ((layer.linear1, parts.linear1), (layer.linear2, parts.linear2)):
        _copy(linear.weight, dense.weight)
        _copy(linear.bias, dense.bias)
    return layer


def _read_encoder(stack: nn.TransformerEncoder, name: str) -> StackParts:
    layers = list(stack.layers)
    if not layers:
        raise ValueError(f"{name} has no layers; there is nothing to convert.")
    layouts = {getattr(getattr(layer, "self_attn", None), "batch_first", None) for layer in layers}
    if len(layouts) > 1:
        raise ValueError(f"{name} mixes layers with batch_first True and False; nn.TransformerEncoder reads the "
                         "sequence length by the first layer's. Give every layer the same batch_first.")
    return StackParts(layers, stack.norm, {"enable_nested_tensor": stack.enable_nested_tensor,
                                           "mask_check": getattr(stack, "mask_check", True)})


def _build_encoder(parts: StackParts) -> nn.TransformerEncoder:
    # torch's constructor deep-copies one layer num_layers times; the built layers replace the copies.
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ..." is torch's, about its fast path
        warnings.simplefilter("ignore")
        stack = nn.TransformerEncoder(parts.blocks[0], len(parts.blocks), parts.norm, **parts.config)
    stack.layers = nn.ModuleList(parts.blocks)
    return stack


register_dense_block(DenseBlockKind(nn.TransformerEncoderLayer, _read_encoder_layer, _build_encoder_layer))
register_dense_stack(DenseStackKind(nn.TransformerEncoder, _read_encoder, _build_encoder))
