"""Conversion between dense FFNs and phantom shards, and exact re-sharding.

* ``to_phantom``: a dense ``nn.Sequential`` → this rank's ``PhantomFFN`` (``svd``: the
  closest phantom model by Eckart–Young; ``random``: fresh, variance-matched).
* ``merge_shards``: p shards → p/m shards computing exactly the same function
  (docs/operator.md §7); m = p gives the dense model.
* ``gather_shards`` / ``to_dense``: collect a group's shards on every rank and rebuild the
  dense module, for serving on one device (of the user's classes: ``blocks``).

Other phantom modules (transformer stacks, ``nn/convert_transformer.py``) register a
``PhantomKind``; the four functions above hand such modules to it, so one ``to_phantom``,
``merge_shards``, ``gather_shards`` and ``to_dense`` serve every kind.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from lightning_phantom.ops.comm import GroupInfo, all_gather_into
from lightning_phantom.nn.blocks import (
    Block, check_blocks, dense_blocks, is_block, keep_blocks, plain_block, user_block,
)
from lightning_phantom.nn.ghosts import resolve_ghosts
from lightning_phantom.nn.layers import (
    ELEMENTWISE, ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, _Shard, leaf_layers,
)
from lightning_phantom.nn.dropout import ShardedDropout
from lightning_phantom.nn.norms import PHANTOM_NORMS, PhantomNorm, merge_norms, norm_refusal, shard_norm


@dataclass(frozen=True)
class PhantomKind:
    """A phantom module besides ``PhantomFFN``: which dense modules it converts, and how it is converted,
    gathered, merged and turned back into its dense form (the signatures of this module's functions)."""

    phantom: type[nn.Module]
    converts: Callable[[nn.Module], bool]  # is this dense module one of its kind?
    to_phantom: Callable[..., nn.Module]  # (dense, ghosts, group, init, overlap)
    gather: Callable[[nn.Module], list]
    merge: Callable[[Sequence[nn.Module], int], list]
    to_dense: Callable[[nn.Module], nn.Module]


PHANTOM_KINDS: list[PhantomKind] = []


def register_phantom_kind(kind: PhantomKind) -> PhantomKind:
    PHANTOM_KINDS.append(kind)
    return kind


def _kind_of(module: nn.Module) -> Optional[PhantomKind]:
    return next((k for k in PHANTOM_KINDS if isinstance(module, k.phantom)), None)


def ffn_linears(module: nn.Module, name: str = "module") -> list[nn.Linear]:
    """The Linear layers of an FFN, or a ValueError saying why ``module`` is not one.

    An FFN is an ``nn.Sequential`` (or a subclass keeping its forward, ``blocks.is_block``) whose
    layers — nested blocks flattened — are ``nn.Linear``, element-wise layers, and
    ``nn.LayerNorm``/``nn.RMSNorm``/``nn.BatchNorm1d`` over the features of the layer before.
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"{name} must be an nn.Sequential of nn.Linear, norm and element-wise layers "
                        f"(blocks may be nested nn.Sequentials), got {type(module).__name__}. A module with its "
                        "own forward (a residual connection, say) cannot be split: shard the nn.Sequential "
                        "inside it instead, or keep it dense.")
    check_blocks(module, name)
    linears = []
    seen: dict[int, str] = {}
    width = None  # features of the activation at this point, once a Linear has set them
    for path, child in leaf_layers(module):
        # module[1][0] for nn.Sequential(...) positions, module.fc for named children
        where = name + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in path.split("."))
        for pname, param in child.named_parameters():
            if id(param) in seen:
                raise ValueError(
                    f"{where}.{pname} is the same tensor as {seen[id(param)]}: sharding would untie "
                    "shared weights silently. Give each layer its own weights (or keep this FFN dense)."
                )
            seen[id(param)] = f"{where}.{pname}"
        if type(child) is nn.Linear:
            if linears and child.in_features != linears[-1].out_features:
                raise ValueError(f"{where} takes {child.in_features} features but the Linear before it "
                                 f"gives {linears[-1].out_features}")
            linears.append(child)
            width = child.out_features
        elif type(child) in PHANTOM_NORMS:
            features, _ = PHANTOM_NORMS[type(child)].dense_config(child)
            why = norm_refusal(child) or (
                f"it normalises {features} features but the Linear before it gives {width}"
                if width is not None and features != width else None)
            if why:
                raise ValueError(f"{where} is {type(child).__name__}, which phantom parallelism cannot shard: "
                                 f"{why}. Make it match its Linear layer, or keep this FFN dense.")
        elif not isinstance(child, ELEMENTWISE):
            raise ValueError(
                f"{where} is {type(child).__name__}, which is not an nn.Linear, a norm "
                f"({', '.join(t.__name__ for t in PHANTOM_NORMS)}) or an element-wise layer "
                f"({', '.join(t.__name__ for t in ELEMENTWISE[:8])}, …); phantom parallelism shards only such "
                "FFNs. A residual connection or another custom block cannot be split: keep the FFN inside it "
                "an nn.Sequential (a residual block's inner FFN is then sharded), or keep this module dense."
            )
    if len(linears) < 3:
        raise ValueError(f"{name} has {len(linears)} Linear layer(s); phantom parallelism needs at least 3 "
                         "(first, one hidden-to-hidden, last).")
    return linears


def _rebuild(seq: nn.Sequential, layer_fn, top=PhantomFFN.from_layers, prefix: str = "",
             block: Block = plain_block) -> nn.Sequential:
    """``seq`` with every layer replaced by ``layer_fn(path, layer)``, the nesting and child names kept,
    so the result has the state-dict keys of ``seq`` (``0.0.weight``, ``block1.fc.weight`` …).
    ``top(children)`` makes the outer module, ``block(path, children)`` each nested block."""
    children = OrderedDict()
    for name, child in seq._modules.items():
        path = prefix + name
        children[name] = (_rebuild(child, layer_fn, lambda c, path=path: block(path, c), path + ".", block)
                          if is_block(child) else layer_fn(path, child))
        children[name].training = child.training  # a BatchNorm in eval mode stays in eval mode
    out = top(children)
    out.training = seq.training
    return out


def _new_like(cls, *args, info: GroupInfo, bias: bool, like: Tensor, **kw):
    # Built on the meta device: every parameter is assigned right after, so a random
    # initialisation would only be wasted work (and memory for wide layers).
    layer = cls(*args, bias=bias, shard=info, device="meta", **kw)
    layer.to_empty(device=like.device)
    return layer.to(like.dtype)


def _assign(layer: nn.Module, **tensors: Optional[Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(layer, name).copy_(value)
    return layer


def _block(w: Tensor, i: int, j: int, c: int, a: int) -> Tensor:
    return w[i * c:(i + 1) * c, j * a:(j + 1) * a]


def _svd_factors(m: Tensor, ghosts: int) -> tuple[Tensor, Tensor]:
    """Best rank-``ghosts`` factors of m: (U S^½, S^½ Vᵀ), padded with zeros past m's rank."""
    work = m.double() if m.dtype == torch.float64 else m.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(ghosts, s.numel())
    root = s[:r].sqrt()
    left = work.new_zeros(m.shape[0], ghosts)
    right = work.new_zeros(ghosts, m.shape[1])
    left[:, :r] = u[:, :r] * root
    right[:r] = root[:, None] * vh[:r]
    return left.to(m.dtype), right.to(m.dtype)


def _phantom_from_dense(lin: nn.Linear, ghosts: int, info: GroupInfo, overlap: bool) -> PhantomLinear:
    """docs/operator.md §6.1, the closest phantom layer to a dense one, for rank ``info.rank``.

    Rank j factors M_j = [W_ij]_{i≠j} itself and sends the decompressor rows to their
    receivers with one all-gather: SVD signs are not unique, so each C_j and the D_ij
    that multiply it must come from the same factorisation.
    """
    p, i = info.size, info.rank
    w = lin.weight.detach()
    c, a = lin.out_features // p, lin.in_features // p
    layer = _new_like(PhantomLinear, lin.in_features, lin.out_features, ghosts, info=info,
                      bias=lin.bias is not None, like=w, overlap=overlap)
    bias = None if lin.bias is None else lin.bias.detach()[i * c:(i + 1) * c]
    _assign(layer, weight=_block(w, i, i, c, a), bias=bias)
    if p == 1:
        return layer
    stacked = torch.cat([_block(w, r, i, c, a) for r in range(p) if r != i])  # M_i, (p−1)c × a
    left, right = _svd_factors(stacked, ghosts)  # [D_ri]_{r≠i} and C_i
    every_left = left.new_empty(p * left.shape[0], ghosts)
    all_gather_into(every_left, left.contiguous(), info.group)
    every_left = every_left.view(p, p - 1, c, ghosts)
    # Rank j's stack lists receivers r ≠ j in order; receiver i sits at i − (i > j).
    decompress = torch.cat([every_left[j, i - (i > j)] for j in range(p) if j != i], dim=1)
    return _assign(layer, compress=right, decompress=decompress)


def to_phantom(module: nn.Sequential, ghosts, group=None, init: str = "svd", overlap: bool = True) -> PhantomFFN:
    """This rank's shard of a dense FFN (a collective call when ``init="svd"``).

    ``init="svd"`` gives the closest phantom model to the dense weights (exact when
    ghosts >= min((p−1)·c, a)); ``init="random"`` keeps only the architecture and
    initialises fresh, matched in variance to the dense layers.
    The dense module must hold the same weights on every rank of the group.
    """
    other = next((k for k in PHANTOM_KINDS if k.converts(module)), None)
    if other is not None:
        return other.to_phantom(module, ghosts, group, init, overlap)
    linears = ffn_linears(module)
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    info = GroupInfo.of(group)
    ghost_iter = iter(resolve_ghosts(ghosts, [lin.in_features for lin in linears[1:-1]], info.size, "to_phantom"))
    leaves = leaf_layers(module)
    first, last = ([i for i, (_, m) in enumerate(leaves) if m is lin][0] for lin in (linears[0], linears[-1]))
    # Layers between the first and the last Linear see activations split over the group, of the
    # width the Linear before them gives.
    width, sharded = linears[0].out_features, {}
    for path, m in leaves[first + 1:last]:
        width = m.out_features if type(m) is nn.Linear else width
        sharded[path] = width

    def convert(path: str, child: nn.Module) -> nn.Module:
        if type(child) in PHANTOM_NORMS and path in sharded:
            return shard_norm(child, info, fresh=init == "random")
        if type(child) is nn.Dropout and path in sharded:  # elsewhere the tensor is whole: nn.Dropout as it is
            return ShardedDropout(child.p, sharded[path], shard=info)
        return _convert_child(child, linears, ghost_iter, info, overlap, random=init == "random")

    ffn = _rebuild(module, convert)
    ffn.dense_blocks = dense_blocks(module)  # the user's classes, for to_dense
    return ffn


def _convert_child(child, linears, ghost_iter, info: GroupInfo, overlap: bool, random: bool) -> nn.Module:
    if type(child) is not nn.Linear:
        return copy.deepcopy(child)  # element-wise, or a norm on the replicated input/output
    p, i = info.size, info.rank
    w, b = child.weight.detach(), None if child.bias is None else child.bias.detach()
    kw = {"bias": b is not None, "shard": info, "device": w.device, "dtype": w.dtype}
    if child is linears[0]:
        if random:
            return ColumnParallelLinear(child.in_features, child.out_features, **kw)
        c = child.out_features // p
        layer = _new_like(ColumnParallelLinear, child.in_features, child.out_features, info=info,
                          bias=b is not None, like=w)
        return _assign(layer, weight=w[i * c:(i + 1) * c], bias=None if b is None else b[i * c:(i + 1) * c])
    if child is linears[-1]:
        if random:
            return RowParallelLinear(child.in_features, child.out_features, **kw)
        a = child.in_features // p
        layer = _new_like(RowParallelLinear, child.in_features, child.out_features, info=info,
                          bias=b is not None, like=w)
        return _assign(layer, weight=w[:, i * a:(i + 1) * a], bias=b)
    ghosts = next(ghost_iter)
    if random:
        return PhantomLinear(child.in_features, child.out_features, ghosts, overlap=overlap, **kw)
    return _phantom_from_dense(child, ghosts, info, overlap)


def _empty_shard(layer: _Shard, info: GroupInfo, like: Tensor, ghosts: Optional[int] = None) -> _Shard:
    cls = type(layer)
    if cls is PhantomLinear:
        return _new_like(cls, layer.in_features, layer.out_features, ghosts or layer.ghosts, info=info,
                         bias=layer.bias is not None, like=like, overlap=layer.overlap)
    return _new_like(cls, layer.in_features, layer.out_features, info=info, bias=layer.bias is not None, like=like)


def gather_shards(ffn: PhantomFFN) -> list[PhantomFFN]:
    """Every rank's shard of ``ffn``, on every rank of its group (a collective call).

    All shards of a phantom model have the same shapes, so one all-gather per tensor
    suffices: no pickling, and it works on NCCL as on gloo. The returned shards carry
    (rank, size) but no process group: they are for merging, not for running.
    """
    if _kind_of(ffn) is not None:
        return _kind_of(ffn).gather(ffn)

    def shell(shard_info: GroupInfo) -> PhantomFFN:
        def empty(path: str, m: nn.Module) -> nn.Module:
            if isinstance(m, _Shard):
                return _empty_shard(m, shard_info, m.weight)
            return m.rebuild(shard_info) if isinstance(m, (PhantomNorm, ShardedDropout)) else copy.deepcopy(m)

        return keep_blocks(ffn, _rebuild(ffn, empty))

    return gather_with(ffn, shell)


def gather_with(module: nn.Module, shell: Callable[[GroupInfo], nn.Module]) -> list:
    """Every rank's shard of ``module``: ``shell(info)`` builds an empty shard for (rank, size) ``info`` and
    the gathered tensors fill it. All shards of a phantom model have the same shapes, so one all-gather
    per tensor suffices (no pickling; NCCL as gloo)."""
    info = module.shard
    if info.size == 1:
        return [module]
    gathered = {}
    for name, t in module.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t  # sharded over the replicas by FSDP
        out = t.new_empty(info.size * t.numel())
        all_gather_into(out, t.detach().reshape(-1), info.group)
        gathered[name] = out.view(info.size, *t.shape)
    shards = []
    for rank in range(info.size):
        shard = shell(GroupInfo(None, rank, info.size))
        shard.load_state_dict({name: t[rank] for name, t in gathered.items()})
        shards.append(shard)
    return shards


def _merge_phantom(parts: Sequence[PhantomLinear], r: int, m: int, info: GroupInfo) -> PhantomLinear:
    """docs/operator.md §7: merge old ranks R = r·m … r·m+m−1 into new rank r."""
    p, k = len(parts), parts[0].ghosts
    c, a = parts[0].weight.shape
    R = range(r * m, (r + 1) * m)

    def d(i: int, j: int) -> Tensor:  # D_ij, c × k, from rank i's side-by-side decompressors
        col = (j - (j > i)) * k
        return parts[i].decompress[:, col:col + k]

    layer = _empty_shard(parts[0], info, parts[0].weight, ghosts=m * k)
    with torch.no_grad():
        # Local block: the dense submatrix of R, including their D·C products among themselves.
        for bi, i in enumerate(R):
            for bj, j in enumerate(R):
                block = parts[i].weight if i == j else d(i, j) @ parts[j].compress
                layer.weight[bi * c:(bi + 1) * c, bj * a:(bj + 1) * a] = block
        if layer.bias is not None:
            layer.bias.copy_(torch.cat([parts[i].bias for i in R]))
        if info.size > 1:
            layer.compress.copy_(torch.block_diag(*[parts[j].compress for j in R]))
            others = [s for s in range(p // m) if s != r]
            for bs, s in enumerate(others):
                for bi, i in enumerate(R):
                    for bj, j in enumerate(range(s * m, (s + 1) * m)):
                        layer.decompress[bi * c:(bi + 1) * c, (bs * m + bj) * k:(bs * m + bj + 1) * k] = d(i, j)
    return layer


def merge_shards(shards: Sequence[PhantomFFN], m: int) -> list[PhantomFFN]:
    """Re-shard the p shards of one phantom model onto p/m ranks, exactly (ghosts become m·k).

    ``shards[i]`` is rank i's ``PhantomFFN`` (from ``gather_shards``, or loaded from each
    rank's checkpoint). The result's shard r is for rank r of a group of p/m; ``m = p``
    gives one shard that is the dense model.
    """
    check_merge(shards, m)
    if _kind_of(shards[0]) is not None:
        return _kind_of(shards[0]).merge(shards, m)
    p = len(shards)
    merged = []
    for r in range(p // m):
        info = GroupInfo(None, r, p // m)
        own = range(r * m, (r + 1) * m)

        def merge(path: str, layer: nn.Module, r=r, own=own, info=info) -> nn.Module:
            parts = [s.get_submodule(path) for s in shards]
            if isinstance(layer, PhantomLinear):
                return _merge_phantom(parts, r, m, info)
            if isinstance(layer, ColumnParallelLinear):
                new = _empty_shard(layer, info, layer.weight)
                bias = None if layer.bias is None else torch.cat([parts[i].bias for i in own])
                return _assign(new, weight=torch.cat([parts[i].weight for i in own]), bias=bias)
            if isinstance(layer, RowParallelLinear):
                new = _empty_shard(layer, info, layer.weight)
                return _assign(new, weight=torch.cat([parts[i].weight for i in own], dim=1), bias=layer.bias)
            if isinstance(layer, PhantomNorm):
                return merge_norms(parts, own, info)
            if isinstance(layer, ShardedDropout):
                return layer.rebuild(info)
            return copy.deepcopy(layer)

        merged.append(keep_blocks(shards[0], _rebuild(shards[0], merge)))
    return merged


def check_merge(shards: Sequence[nn.Module], m: int) -> None:
    """``shards`` are the p shards of one model in rank order, and ``m`` divides p."""
    p = len(shards)
    if not isinstance(m, int) or m < 1 or p % m:
        raise ValueError(f"can merge {p} shards only by a factor m that divides {p}, got m={m!r}")
    ranks = [s.shard for s in shards]
    if [(g.rank, g.size) for g in ranks] != [(i, p) for i in range(p)]:
        raise ValueError("merge_shards needs the shards of every rank in rank order; got (rank, size) = "
                         f"{[(g.rank, g.size) for g in ranks]}")


def _dense_sequential(ffn: PhantomFFN) -> nn.Sequential:
    """A one-shard PhantomFFN as plain torch modules, nested and named as the user's FFN was, each
    block of the user's class (``blocks.dense_blocks``)."""

    def dense(path: str, layer: nn.Module) -> nn.Module:
        if isinstance(layer, _Shard):
            w = layer.weight
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=w.device, dtype=w.dtype)
            return _assign(linear, weight=w, bias=layer.bias)
        if isinstance(layer, (PhantomNorm, ShardedDropout)):
            return layer.to_dense()
        return copy.deepcopy(layer)

    block = user_block(getattr(ffn, "dense_blocks", None) or {})
    return _rebuild(ffn, dense, lambda children: block("", children), block=block)


def to_dense(module: nn.Module) -> nn.Module:
    """The dense model a phantom model computes; a collective call, every rank gets it.

    For a ``PhantomFFN``: the dense ``nn.Sequential`` (same layer order and activations
    as the FFN it came from; an instance of its class where that was a subclass, such as
    torchvision's ``MLP``); for another registered kind (a transformer stack), its dense form. For
    any module containing those (a LightningModule, say): a deep copy with each replaced by its
    dense form, for one process: detached from any Trainer, and every process group a submodule
    holds (a torchmetrics ``Metric``'s, which the strategy sets) left ``None``, so that its
    metrics compute on the one process.
    """
    if isinstance(module, PhantomFFN):
        return _dense_sequential(merge_shards(gather_shards(module), module.shard.size)[0])
    if _kind_of(module) is not None:
        return _kind_of(module).to_dense(module)
    # modules() has the same order on every rank, so the collectives line up.
    memo: dict[int, Any] = {id(ffn): to_dense(ffn) for ffn in module.modules()
                            if isinstance(ffn, (PhantomFFN, *(k.phantom for k in PHANTOM_KINDS)))}
    for attr in ("_trainer", "_fabric", "_device_mesh"):
        if getattr(module, attr, None) is not None:
            memo[id(getattr(module, attr))] = None
    for sub in module.modules():  # a ProcessGroup cannot be copied, and means nothing to one process
        memo.update((id(v), None) for v in vars(sub).values() if isinstance(v, ProcessGroup))
    return copy.deepcopy(module, memo)
