"""Conversion between dense transformer stacks and phantom shards, and exact re-sharding (docs/operator.md §10.7).

The conversion reads like a parallel plan: a registered dense stack (``nn/dense_blocks.py``)
is read into blocks, each block into its parts, and every part becomes its sharded form:

==========================  ==================================================================
dense part                  this rank's shard
==========================  ==================================================================
QKV d → 3d ([W_q; W_k; W_v]) ``PhantomLinear`` of the rows permuted by ``qkv_rows`` (own heads)
attention output d → d      ``PhantomLinear`` (its input columns are the heads side by side)
linear1 d → f, linear2 f → d ``PhantomLinear`` each
norm1, norm2, final norm    ``PhantomLayerNorm`` / ``PhantomRMSNorm``: this rank's features
dropouts                    ``ShardedDropout``: this rank's slice of the dense mask
activation                  unchanged (element-wise)
==========================  ==================================================================

``init="svd"`` converts every linear by Eckart–Young per source rank (``_phantom_from_dense``,
docs/operator.md §6.1), so ``ghosts="full"`` is the dense stack exactly; ``init="random"`` (and
a dense stack on the meta device) builds fresh shards of the same architecture, never
materialising dense weights. ``merge_stack_shards`` re-shards p → p/m exactly (§7), and
re-permutes each merged QKV's rows into [q; k; v] of the merged heads; ``stack_to_dense`` builds
the user's dense classes back through their kinds. The four are registered with
``nn/convert.py``, so ``to_phantom``, ``gather_shards``, ``merge_shards`` and ``to_dense`` take
stacks as they take FFNs.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_phantom.nn.attention import PhantomSelfAttention, heads_per_rank, qkv_rows
from lightning_phantom.nn.convert import (
    PhantomKind, _empty_shard, _merge_phantom, _phantom_from_dense, gather_with, register_phantom_kind,
)
from lightning_phantom.nn.dense_blocks import (
    DENSE_BLOCKS, DENSE_STACKS, BlockParts, DenseLinear, StackParts, check_norm, check_untied, read_block,
)
from lightning_phantom.nn.ghosts import resolve_ghosts
from lightning_phantom.nn.layers import PhantomLinear
from lightning_phantom.nn.norms import PhantomNorm, merge_norms, shard_norm
from lightning_phantom.nn.shard import _check_divisible
from lightning_phantom.nn.transformer import PhantomTransformerEncoder, PhantomTransformerEncoderLayer
from lightning_phantom.ops.comm import GroupInfo

INITS = ("svd", "random")


def read_stack(module: nn.Module, name: str = "module") -> tuple[StackParts, list[BlockParts]]:
    """The parts of dense stack ``module`` and of each of its blocks, checked; ValueError saying why not."""
    kind = DENSE_STACKS.get(type(module))
    if kind is None:
        raise TypeError(f"{name} is {type(module).__name__}, not a dense stack kind phantom parallelism converts "
                        f"({', '.join(t.__name__ for t in DENSE_STACKS)}); register it with "
                        "lightning_phantom.nn.dense_blocks.register_dense_stack.")
    stack = kind.read(module, name)
    blocks = [read_block(block, f"{name}.layers[{i}]") for i, block in enumerate(stack.blocks)]
    check_norm(stack.norm, blocks[0].d_model, f"{name}.norm")
    widths = {(b.d_model, b.nhead, b.batch_first) for b in blocks}
    if len(widths) > 1:
        raise ValueError(f"{name}'s blocks differ in (d_model, nhead, batch_first): {sorted(widths)}; a phantom "
                         "stack splits one residual stream of one width.")
    check_untied([(f"{name}.{n}", t) for n, t in module.named_parameters(remove_duplicate=False)])
    return stack, blocks


def check_stack_divisible(blocks: Sequence[BlockParts], p: int, name: str) -> None:
    """Heads and widths split over ``p`` ranks, or a ValueError naming the block and the arithmetic."""
    for i, b in enumerate(blocks):
        where = f"{name}.layers[{i}]"
        try:
            heads_per_rank(b.d_model, b.nhead, p)
            _check_divisible("dim_feedforward", b.dim_feedforward, p)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def stack_ghost_widths(blocks: Sequence[BlockParts]) -> list[int]:
    """Input width of each phantom layer in order: per block QKV (d), attention output (d), linear1 (d), linear2 (f)."""
    return [w for b in blocks for w in (b.d_model, b.d_model, b.d_model, b.dim_feedforward)]


def _linear(dense: DenseLinear, ghosts: int, info: GroupInfo, overlap: bool, random: bool) -> PhantomLinear:
    if random:
        w = dense.weight
        return PhantomLinear(dense.in_features, dense.out_features, ghosts, bias=dense.bias is not None,
                             overlap=overlap, shard=info, device=w.device, dtype=w.dtype)
    return _phantom_from_dense(dense, ghosts, info, overlap)


def _activation(activation):
    return copy.deepcopy(activation) if isinstance(activation, nn.Module) else activation


def phantom_block(parts: BlockParts, ghosts: Sequence[int], info: GroupInfo, overlap: bool, random: bool,
                  dense_type: type[nn.Module]) -> PhantomTransformerEncoderLayer:
    """Rank ``info.rank``'s shard of one dense block (a collective call unless ``random``)."""
    rows = qkv_rows(parts.d_model, info.size).to(parts.qkv.weight.device)
    qkv = DenseLinear(parts.qkv.weight.detach()[rows], None if parts.qkv.bias is None else parts.qkv.bias.detach()[rows])
    in_proj, out_proj, linear1, linear2 = (
        _linear(dense, k, info, overlap, random)
        for dense, k in zip((qkv, parts.out, parts.linear1, parts.linear2), ghosts))
    attention = PhantomSelfAttention.from_parts(in_proj, out_proj, parts.nhead, parts.attention_dropout,
                                                parts.batch_first, parts.causal)
    layer = PhantomTransformerEncoderLayer.from_parts(
        attention, linear1, linear2, shard_norm(parts.norm1, info, fresh=random),
        shard_norm(parts.norm2, info, fresh=random), _activation(parts.activation), norm_first=parts.norm_first,
        dropout=parts.dropout, dropout1=parts.dropout1, dropout2=parts.dropout2)
    layer.dense_type = dense_type
    return layer


def to_phantom_stack(module: nn.Module, ghosts="auto", group=None, init: str = "svd",
                     overlap: bool = True) -> PhantomTransformerEncoder:
    """This rank's shard of a dense transformer stack (a collective call when ``init="svd"``).

    ``ghosts``: a setting for all phantom layers, four per block (``stack_ghost_widths``).
    The dense stack must hold the same weights on every rank of the group; on the meta device
    it gets ``init="random"`` shards on the meta device.
    """
    if init not in INITS:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    stack, blocks = read_stack(module)
    info = GroupInfo.of(group)
    check_stack_divisible(blocks, info.size, "module")
    per_layer = resolve_ghosts(ghosts, stack_ghost_widths(blocks), info.size, type(module).__name__)
    random = init == "random" or any(t.is_meta for b in blocks for t in b.tensors())
    layers = [phantom_block(parts, per_layer[4 * i:4 * i + 4], info, overlap, random, type(block))
              for i, (parts, block) in enumerate(zip(blocks, stack.blocks))]
    norm = None if stack.norm is None else shard_norm(stack.norm, info, fresh=random)
    phantom = PhantomTransformerEncoder.from_layers(layers, norm, dense_type=type(module), dense_config=stack.config)
    return phantom.train(module.training)


# --------------------------------------------------------------- gather, merge, to_dense
LinearFn = Callable[[str, PhantomLinear, GroupInfo], PhantomLinear]
NormFn = Callable[[str, PhantomNorm, GroupInfo], PhantomNorm]


def _rebuild_stack(stack: PhantomTransformerEncoder, info: GroupInfo, linear: LinearFn,
                   norm: NormFn) -> PhantomTransformerEncoder:
    """``stack``'s architecture for shard ``info``, every linear and norm made by ``linear(path, old, info)`` and
    ``norm(path, old, info)`` (``path``: its name in ``stack``)."""
    layers = []
    for i, old in enumerate(stack.layers):
        at = f"layers.{i}."
        attn = old.self_attn
        attention = PhantomSelfAttention.from_parts(
            linear(at + "self_attn.in_proj", attn.in_proj, info), linear(at + "self_attn.out_proj", attn.out_proj, info),
            attn.num_heads, attn.dropout.p, attn.batch_first, attn.causal)
        layer = PhantomTransformerEncoderLayer.from_parts(
            attention, linear(at + "linear1", old.linear1, info), linear(at + "linear2", old.linear2, info),
            norm(at + "norm1", old.norm1, info), norm(at + "norm2", old.norm2, info), _activation(old.activation),
            norm_first=old.norm_first, dropout=old.dropout.p, dropout1=old.dropout1.p, dropout2=old.dropout2.p)
        layer.dense_type = old.dense_type
        layers.append(layer)
    final = None if stack.norm is None else norm("norm", stack.norm, info)
    rebuilt = PhantomTransformerEncoder.from_layers(layers, final, dense_type=stack.dense_type,
                                                    dense_config=stack.dense_config)
    return rebuilt.train(stack.training)


def gather_stack_shards(stack: PhantomTransformerEncoder) -> list[PhantomTransformerEncoder]:
    """Every rank's shard of ``stack``, on every rank of its group (a collective call); for merging, not running."""
    return gather_with(stack, lambda info: _rebuild_stack(stack, info,
                                                          lambda path, old, new: _empty_shard(old, new, old.weight),
                                                          lambda path, old, new: old.rebuild(new)))


def qkv_regroup(d_model: int, p: int, m: int, r: int) -> Tensor:
    """Order of the rows of a merged QKV (old ranks r·m … r·m+m−1 side by side) for rank r of p/m.

    Old rank i's rows are [q; k; v] of its heads; merged, they must be [q; k; v] of all the
    merged heads (``qkv_rows`` on p/m ranks). Returns, for each new row, its index in the
    side-by-side old rows.
    """
    old, new = qkv_rows(d_model, p), qkv_rows(d_model, p // m)
    position = torch.empty_like(old)
    position[old] = torch.arange(old.numel())  # dense row → its position among the p shards' rows
    width = 3 * d_model * m // p
    return position[new[r * width:(r + 1) * width]] - r * width


def _regroup_rows(layer: PhantomLinear, order: Tensor) -> PhantomLinear:
    """Permute the output rows of a phantom layer: its local block, bias and decompressors (the compressor
    acts on the input and is unchanged)."""
    with torch.no_grad():
        for t in (layer.weight, layer.bias, layer.decompress):
            if t is not None:
                t.copy_(t[order.to(t.device)])
    return layer


def merge_stack_shards(shards: Sequence[PhantomTransformerEncoder], m: int) -> list[PhantomTransformerEncoder]:
    """Re-shard the p shards of one phantom stack onto p/m ranks, exactly (ghosts become m·k; docs/operator.md §7)."""
    p, d = len(shards), shards[0].d_model
    merged = []
    for r in range(p // m):
        own = range(r * m, (r + 1) * m)

        def linear(path: str, old: PhantomLinear, info: GroupInfo, r=r) -> PhantomLinear:
            layer = _merge_phantom([s.get_submodule(path) for s in shards], r, m, info)
            return _regroup_rows(layer, qkv_regroup(d, p, m, r)) if path.endswith("in_proj") else layer

        def norm(path: str, old: PhantomNorm, info: GroupInfo, own=own) -> PhantomNorm:
            return merge_norms([s.get_submodule(path) for s in shards], own, info)

        merged.append(_rebuild_stack(shards[0], GroupInfo(None, r, p // m), linear, norm))
    return merged


def _dense_linear(layer: PhantomLinear) -> DenseLinear:
    return DenseLinear(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())


def block_parts(layer: PhantomTransformerEncoderLayer) -> BlockParts:
    """The dense parts of a one-shard phantom block."""
    attn = layer.self_attn
    return BlockParts(
        nhead=attn.num_heads, qkv=_dense_linear(attn.in_proj), out=_dense_linear(attn.out_proj),
        linear1=_dense_linear(layer.linear1), linear2=_dense_linear(layer.linear2), norm1=layer.norm1.to_dense(),
        norm2=layer.norm2.to_dense(), activation=_activation(layer.activation), norm_first=layer.norm_first,
        batch_first=attn.batch_first, attention_dropout=attn.dropout.p, dropout=layer.dropout.p,
        dropout1=layer.dropout1.p, dropout2=layer.dropout2.p, causal=attn.causal)


def stack_to_dense(stack: PhantomTransformerEncoder) -> nn.Module:
    """The dense stack ``stack`` computes, as the user's classes (a collective call; every rank gets it)."""
    one = merge_stack_shards(gather_stack_shards(stack), stack.shard.size)[0]
    blocks = [DENSE_BLOCKS[layer.dense_type].build(block_parts(layer)) for layer in one.layers]
    final: Optional[nn.Module] = None if one.norm is None else one.norm.to_dense()
    dense = DENSE_STACKS[one.dense_type].build(StackParts(blocks, final, dict(one.dense_config)))
    return dense.train(stack.training)


register_phantom_kind(PhantomKind(
    PhantomTransformerEncoder, converts=lambda module: type(module) in DENSE_STACKS, to_phantom=to_phantom_stack,
    gather=gather_stack_shards, merge=merge_stack_shards, to_dense=stack_to_dense))
