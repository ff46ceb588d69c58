"""This rank's heads of ``nn.MultiheadAttention``, as a transformer layer uses it (docs/operator.md §10.2–§10.3).

The residual stream reaches a phantom attention split by columns: rank i holds d/p features
of every token. Its shard of the layer is

* ``in_proj``: ONE ``PhantomLinear`` d → 3d (the fused QKV) whose output rows are permuted so
  that rank i's 3d/p outputs are [q of its h/p heads; k of them; v of them] (``qkv_rows``). The
  phantom layer maps shards to shards like any other: its diagonal block and the other ranks'
  ghosts give exactly this rank's heads, so attention needs no communication.
* attention over the local heads alone, with ``F.scaled_dot_product_attention``;
* ``out_proj``: a ``PhantomLinear`` d → d. Its input is the heads' outputs side by side; rank
  i's heads are contiguous columns i·d/p … (i+1)·d/p − 1 of the dense ``out_proj``'s input,
  which is already the residual layout, so it needs no permutation.

Heads per rank are computed once, in ``heads_per_rank``, with an error when they do not divide.

Masks are taken exactly as ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``)
takes them from a transformer layer (``attention_bias``): ``attn_mask`` 2-D (L, S) or 3-D
(N·h, L, S) — then this rank's heads are sliced out — bool (True = NOT allowed to attend, the
opposite of SDPA's bool convention) or float (added to the scores); ``key_padding_mask`` (N, S)
bool or float; ``is_causal`` a hint that ``attn_mask`` is the causal mask, used as torch uses it.

Dropout of the attention probabilities is ``ShardedDropout`` over the heads: each rank keeps its
heads' part of the dense (N, h, L, S) mask, so a phantom stack in training draws the dense
model's masks. SDPA draws its own mask inside, so with dropout active (training, p > 0) the
attention is computed in its math form (softmax, dropout, matmul) instead; otherwise by SDPA.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_phantom.nn.dropout import ShardedDropout
from lightning_phantom.nn.ghosts import GhostSpec, resolve_ghosts
from lightning_phantom.nn.layers import PhantomLinear
from lightning_phantom.nn.shard import ShardSpec, _shard_info
from lightning_phantom.ops.comm import GroupInfo


def heads_per_rank(d_model: int, heads: int, p: int) -> int:
    """h/p, or a ValueError that shows the division that failed and what to change."""
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) is not divisible by nhead ({heads}): each head has d_model/nhead "
                         f"features ({d_model} % {heads} = {d_model % heads}). Choose d_model a multiple of nhead.")
    if heads % p:
        raise ValueError(
            f"nhead ({heads}) is not divisible by the phantom group size ({p}) ({heads} % {p} = {heads % p}): each "
            f"rank attends with nhead/p whole heads. Choose nhead a multiple of {p}, or a phantom group size that "
            f"divides {heads}.")
    return heads // p


def qkv_rows(d_model: int, p: int) -> Tensor:
    """Dense ``in_proj`` row of every output of the phantom QKV on groups of ``p`` (docs/operator.md §10.2).

    Rank i's 3d/p outputs are the rows of W_q, then W_k, then W_v that belong to its heads,
    i.e. dense rows t·d + i·d/p … t·d + (i+1)·d/p − 1 for t = 0 (q), 1 (k), 2 (v).
    """
    width = d_model // p
    return torch.tensor([t * d_model + i * width + r for i in range(p) for t in range(3) for r in range(width)])


def attention_bias(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool, *,
                   batch: int, target: int, source: int, heads: int, own: slice, dtype: torch.dtype,
                   causal: bool = False) -> tuple[Optional[Tensor], bool]:
    """(additive mask over this rank's heads, or None; whether SDPA should mask causally).

    The rules of ``F.multi_head_attention_forward`` (need_weights=False): ``is_causal`` needs
    a mask; with no key-padding mask the hint replaces the mask (SDPA's own causal masking);
    with one, the mask is used and the padding added to it. Bool masks become 0/−inf in
    ``dtype``. ``own`` is this rank's slice of the heads; the result broadcasts to
    (N, h/p, L, S). ``causal``: the block always attends causally (a GPT block), whatever it
    is given; masks given are added to the causal one.
    """
    if causal and attn_mask is None and key_padding_mask is None:
        return None, True
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=dtype)
    if not causal:
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask, and needs that mask, as "
                               "in nn.MultiheadAttention: pass attn_mask=nn.Transformer.generate_square_subsequent_mask(L)")
        if is_causal and key_padding_mask is None:
            return None, True
    bias = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=dtype, check_other=False)
    if bias is not None:
        if bias.dim() == 2 and bias.shape == (target, source):
            bias = bias.view(1, 1, target, source)
        elif bias.dim() == 3 and bias.shape == (batch * heads, target, source):
            bias = bias.view(batch, heads, target, source)[:, own]  # this rank's heads
        else:
            raise ValueError(f"attn_mask must be ({target}, {source}) or (N·nhead, L, S) = ({batch * heads}, "
                             f"{target}, {source}), got shape {tuple(attn_mask.shape)}")
    if causal:  # SDPA's causal mask (top-left aligned), added to what was given
        device = (bias if bias is not None else key_padding_mask).device
        future = torch.full((1, 1, target, source), float("-inf"), dtype=dtype, device=device).triu(1)
        bias = future if bias is None else bias + future
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, source):
            raise ValueError(f"key_padding_mask must be (N, S) = ({batch}, {source}), got shape "
                             f"{tuple(key_padding_mask.shape)}")
        padding = key_padding_mask.view(batch, 1, 1, source)
        bias = padding if bias is None else bias + padding
    return bias, False


class PhantomSelfAttention(nn.Module):
    """This rank's h/p heads of ``nn.MultiheadAttention(embed_dim, num_heads)`` used as self-attention.

    Input and output are this rank's columns of the residual stream, (L, N, d/p) or with
    ``batch_first`` (N, L, d/p), or (L, d/p) unbatched. ``ghosts`` is the setting for its two
    phantom layers, ``in_proj`` and ``out_proj`` (both read d features). ``causal=True``: it
    always attends causally, as a GPT block does, with any mask given added.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, ghosts: GhostSpec = "auto", group=None, *, overlap: bool = True,
                 causal: bool = False, shard: ShardSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        info = _shard_info(group, shard)
        self.local_heads = heads_per_rank(embed_dim, num_heads, info.size)
        self.embed_dim, self.num_heads, self.batch_first, self.causal = embed_dim, num_heads, batch_first, causal
        k_in, k_out = resolve_ghosts(ghosts, [embed_dim, embed_dim], info.size, type(self).__name__)
        kw = {"bias": bias, "overlap": overlap, "shard": info, "device": device, "dtype": dtype}
        self.in_proj = PhantomLinear(embed_dim, 3 * embed_dim, k_in, **kw)
        self.out_proj = PhantomLinear(embed_dim, embed_dim, k_out, **kw)
        self.dropout = ShardedDropout(dropout, num_heads, dim=1, shard=info)

    @classmethod
    def from_parts(cls, in_proj: PhantomLinear, out_proj: PhantomLinear, num_heads: int, dropout: float,
                   batch_first: bool, causal: bool = False) -> "PhantomSelfAttention":
        """Assemble already-built shards (conversion and merging)."""
        attention = cls.__new__(cls)
        nn.Module.__init__(attention)
        info = in_proj.shard
        attention.local_heads = heads_per_rank(in_proj.in_features, num_heads, info.size)
        attention.embed_dim, attention.num_heads = in_proj.in_features, num_heads
        attention.batch_first, attention.causal = batch_first, causal
        attention.in_proj, attention.out_proj = in_proj, out_proj
        attention.dropout = ShardedDropout(dropout, num_heads, dim=1, shard=info)
        return attention

    @property
    def shard(self) -> GroupInfo:
        return self.in_proj.shard

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"PhantomSelfAttention takes (L, N, d/p), (N, L, d/p) with batch_first, or unbatched "
                             f"(L, d/p) inputs, got shape {tuple(x.shape)}")
        unbatched = x.dim() == 2
        if unbatched:  # as F.multi_head_attention_forward: a batch of one, padding mask (S,) → (1, S)
            x = x.unsqueeze(0 if self.batch_first else 1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        batch, length = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        hl, e, rank = self.local_heads, self.head_dim, self.shard.rank
        bias, causal = attention_bias(attn_mask, key_padding_mask, is_causal, batch=batch, target=length,
                                      source=length, heads=self.num_heads, own=slice(rank * hl, (rank + 1) * hl),
                                      dtype=x.dtype, causal=self.causal)
        # [q; k; v] of this rank's heads (qkv_rows), each (N, h/p, L, e).
        qkv = self.in_proj(x).unflatten(-1, (3, hl, e))
        qkv = qkv.permute(2, 0, 3, 1, 4) if self.batch_first else qkv.permute(2, 1, 3, 0, 4)
        q, k, v = qkv.unbind(0)
        if bias is not None and bias.dtype != q.dtype and bias.is_floating_point():
            bias = bias.to(q.dtype)  # under autocast the projections run in the lower precision
        if self.training and self.dropout.p > 0:
            out = self._math_attention(q, k, v, bias, causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        # Back to (L, N, d/p): the heads side by side are this rank's d/p columns. Batch-first
        # output is its transposed view, as nn.MultiheadAttention returns it: the dropout after
        # it draws its mask in that memory layout (ShardedDropout), as the dense model's does.
        out = self.out_proj(out.permute(2, 0, 1, 3).flatten(-2))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out.squeeze(0 if self.batch_first else 1) if unbatched else out

    def _math_attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], causal: bool) -> Tensor:
        """softmax(q kᵀ/√e + bias) v with this rank's heads of the dense dropout mask (SDPA's math form)."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))
        if causal:
            length, source = scores.shape[-2:]
            allowed = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        if bias is not None:
            scores = scores + bias
        return torch.matmul(self.dropout(torch.softmax(scores, dim=-1)), v)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} ({self.local_heads} on rank "
                f"{self.shard.rank}/{self.shard.size}), batch_first={self.batch_first}, causal={self.causal}")
