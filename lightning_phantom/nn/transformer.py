"""Phantom transformer stacks: the residual stream stays split by columns (docs/operator.md §10).

* ``PhantomTransformerEncoderLayer`` — this rank's shard of ``nn.TransformerEncoderLayer``:
  its input and output are this rank's d/p columns of the residual stream. Every linear is a
  ``PhantomLinear`` from shards to shards (QKV d → 3d and the attention output d → d in
  ``PhantomSelfAttention``, the MLP d → f → d), the norms are ``PhantomLayerNorm`` /
  ``PhantomRMSNorm`` (one all-reduce of the row statistics each), dropouts ``ShardedDropout``
  (this rank's slice of the dense model's mask). Pre-norm and post-norm, as torch writes them.
* ``PhantomTransformerEncoder`` — this rank's shard of ``nn.TransformerEncoder``: the input is
  the whole tensor, replicated on the group; it is split once on entry (no communication),
  runs the layers and the optional final norm on the shards, and is all-gathered once on exit,
  so every rank gets the whole output, as from the dense stack. ``forward`` has torch's
  signature and handles masks and ``is_causal`` as torch does.

Submodule names are torch's (``self_attn``, ``linear1``, ``norm1``, ``dropout1`` …, and the
stack's ``layers`` and ``norm``), with ``self_attn.in_proj`` holding the fused QKV.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from lightning_phantom.nn.attention import PhantomSelfAttention
from lightning_phantom.nn.dropout import ShardedDropout
from lightning_phantom.nn.ghosts import GhostSpec, resolve_ghosts
from lightning_phantom.nn.layers import ELEMENTWISE, PhantomLinear
from lightning_phantom.nn.norms import PhantomLayerNorm, PhantomNorm
from lightning_phantom.nn.shard import ShardSpec, _shard_info
from lightning_phantom.ops.comm import GroupInfo, gather_from_phantom, split_to_phantom

Activation = Union[str, Callable[[Tensor], Tensor], nn.Module]
#: Element-wise functions a layer may use as its activation (they commute with slicing features).
ELEMENTWISE_FUNCTIONS = (F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.elu, F.leaky_relu, F.mish, F.relu6,
                         F.softplus, F.hardswish, F.hardsigmoid)


def elementwise_activation(activation: Activation, where: str = "activation") -> Callable[[Tensor], Tensor]:
    """``activation`` as torch's layer takes it ("relu", "gelu", a function, a module), if it acts element by
    element; a ValueError that names ``where`` otherwise (the MLP's hidden features are split over ranks)."""
    if isinstance(activation, str):
        if activation in ("relu", "gelu"):
            return F.relu if activation == "relu" else F.gelu
        raise ValueError(f"{where} must be 'relu' or 'gelu' as a string (as nn.TransformerEncoderLayer takes "
                         f"it), got {activation!r}")
    if isinstance(activation, ELEMENTWISE) or any(activation is f for f in ELEMENTWISE_FUNCTIONS):
        return activation
    raise ValueError(
        f"{where} is {activation!r}, which phantom parallelism cannot shard: the MLP's hidden features are split "
        "over the ranks, so the activation must act on each element alone. Use 'relu', 'gelu', an element-wise "
        f"function ({', '.join(f.__name__ for f in ELEMENTWISE_FUNCTIONS)}) or module "
        f"({', '.join(t.__name__ for t in ELEMENTWISE[:8])}, …), or keep this stack dense.")


class PhantomTransformerEncoderLayer(nn.Module):
    """This rank's shard of ``nn.TransformerEncoderLayer``; sharded stream (…, d/p) in and out.

    The arguments are torch's, plus phantom parallelism's: ``ghosts`` for the layer's four
    phantom layers (in order QKV, attention output, linear1, linear2, reading d, d, d and f
    features), ``group``/``shard`` and ``overlap`` as for ``PhantomLinear``; ``causal=True``
    attends causally whatever masks it is given (a GPT block).
    """

    #: The dense block ``to_dense`` builds (a kind of ``lightning_phantom.nn.dense_blocks``).
    dense_type: type[nn.Module] = nn.TransformerEncoderLayer

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, ghosts: GhostSpec = "auto", group=None, *,
                 overlap: bool = True, causal: bool = False, shard: ShardSpec = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        info = _shard_info(group, shard)
        k_qkv, k_out, k_fc1, k_fc2 = resolve_ghosts(ghosts, [d_model, d_model, d_model, dim_feedforward], info.size,
                                                    type(self).__name__)
        kw = {"bias": bias, "overlap": overlap, "shard": info, "device": device, "dtype": dtype}
        self.self_attn = PhantomSelfAttention(d_model, nhead, dropout, batch_first=batch_first,
                                              ghosts=[k_qkv, k_out], causal=causal, **kw)
        self.linear1 = PhantomLinear(d_model, dim_feedforward, k_fc1, **kw)
        self.dropout = ShardedDropout(dropout, dim_feedforward, shard=info)
        self.linear2 = PhantomLinear(dim_feedforward, d_model, k_fc2, **kw)
        self.norm_first = norm_first
        norm_kw = {"eps": layer_norm_eps, "bias": bias, "shard": info, "device": device, "dtype": dtype}
        self.norm1 = PhantomLayerNorm(d_model, **norm_kw)
        self.norm2 = PhantomLayerNorm(d_model, **norm_kw)
        self.dropout1 = ShardedDropout(dropout, d_model, shard=info)
        self.dropout2 = ShardedDropout(dropout, d_model, shard=info)
        self.activation = elementwise_activation(activation)

    @classmethod
    def from_parts(cls, self_attn: PhantomSelfAttention, linear1: PhantomLinear, linear2: PhantomLinear,
                   norm1: PhantomNorm, norm2: PhantomNorm, activation: Activation, *, norm_first: bool,
                   dropout: float, dropout1: float, dropout2: float) -> "PhantomTransformerEncoderLayer":
        """Assemble already-built shards (conversion and merging); the dropout probabilities may differ."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        info = self_attn.shard
        layer.self_attn, layer.linear1, layer.linear2 = self_attn, linear1, linear2
        layer.dropout = ShardedDropout(dropout, linear1.out_features, shard=info)
        layer.norm_first, layer.norm1, layer.norm2 = norm_first, norm1, norm2
        layer.dropout1 = ShardedDropout(dropout1, self_attn.embed_dim, shard=info)
        layer.dropout2 = ShardedDropout(dropout2, self_attn.embed_dim, shard=info)
        layer.activation = elementwise_activation(activation)
        return layer

    def reset_parameters(self) -> None:
        """Draw every phantom linear and norm afresh (each rank its own shard, docs/operator.md §6.2)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @property
    def shard(self) -> GroupInfo:
        return self.self_attn.shard

    @property
    def batch_first(self) -> bool:
        return self.self_attn.batch_first

    @property
    def ghosts(self) -> list[int]:
        """Ghosts of the four phantom layers: QKV, attention output, linear1, linear2."""
        return [m.ghosts for m in (self.self_attn.in_proj, self.self_attn.out_proj, self.linear1, self.linear2)]

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool) -> Tensor:
        return self.dropout1(self.self_attn(x, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class PhantomTransformerEncoder(nn.Module):
    """This rank's shard of ``nn.TransformerEncoder``: replicated input, split, layers, final norm, gathered output.

    Built like torch's: ``encoder_layer`` is copied ``num_layers`` times, so every layer starts
    from the same values, as in torch (``reset_parameters()`` on each layer draws them afresh;
    ``from_layers`` takes layers built one by one). ``norm`` is a sharded norm over d or None.
    ``enable_nested_tensor`` and ``mask_check`` only go back into ``to_dense``'s
    ``nn.TransformerEncoder``: a phantom stack runs padded tensors, and what it computes at
    padded positions is what torch's ordinary (not nested-tensor) path computes there.
    """

    def __init__(self, encoder_layer: PhantomTransformerEncoderLayer, num_layers: int,
                 norm: Optional[PhantomNorm] = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        super().__init__()
        self._assemble([copy.deepcopy(encoder_layer) for _ in range(num_layers)], norm, nn.TransformerEncoder,
                       {"enable_nested_tensor": enable_nested_tensor, "mask_check": mask_check})

    @classmethod
    def from_layers(cls, layers: Sequence[PhantomTransformerEncoderLayer], norm: Optional[PhantomNorm] = None, *,
                    dense_type: type[nn.Module] = nn.TransformerEncoder,
                    dense_config: Optional[dict] = None) -> "PhantomTransformerEncoder":
        """A stack of built layers; ``dense_type(..., **dense_config)`` is what ``to_dense`` builds back."""
        stack = cls.__new__(cls)
        nn.Module.__init__(stack)
        stack._assemble(layers, norm, dense_type, dict(dense_config or {}))
        return stack

    def _assemble(self, layers, norm, dense_type: type[nn.Module], dense_config: dict) -> None:
        self.layers = nn.ModuleList(layers)
        self.num_layers, self.norm = len(self.layers), norm
        self.dense_type, self.dense_config = dense_type, dense_config
        self._check_norm()

    def _check_norm(self) -> None:
        if not len(self.layers):
            raise ValueError("a PhantomTransformerEncoder needs at least one layer")
        if self.norm is not None and not isinstance(self.norm, PhantomNorm):
            raise TypeError(f"norm must be a sharded norm (PhantomLayerNorm, PhantomRMSNorm) or None, got "
                            f"{type(self.norm).__name__}")

    @property
    def shard(self) -> GroupInfo:
        return self.layers[0].shard

    @property
    def d_model(self) -> int:
        return self.layers[0].self_attn.embed_dim

    @property
    def ghosts(self) -> list[int]:
        """Ghosts of every phantom layer, four per layer (QKV, attention output, linear1, linear2)."""
        return [k for layer in self.layers for k in layer.ghosts]

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        if src.is_nested:
            raise ValueError("PhantomTransformerEncoder takes padded tensors, not nested ones: pass the padded "
                             "tensor and src_key_padding_mask")
        if src.shape[-1] != self.d_model:
            raise ValueError(f"PhantomTransformerEncoder expects inputs of shape (..., {self.d_model}), got "
                             f"{tuple(src.shape)}")
        # The masks and the causal hint exactly as nn.TransformerEncoder.forward reads them.
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].batch_first))
        info = self.shard
        group = info.group if info.size > 1 else None
        self.layers[0].self_attn.in_proj._check_group()  # before the split, which trusts the group
        x = split_to_phantom(src, group) if info.size > 1 else src  # docs/operator.md §10.5: entering
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if self.norm is not None:
            x = self.norm(x)
        return gather_from_phantom(x, group) if info.size > 1 else x  # §10.5: leaving, once per stack
