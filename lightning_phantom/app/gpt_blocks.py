"""The app's GPT as dense block and stack kinds, so that ``strategy=phantom`` shards it as one stack.

``lightning_phantom.nn.dense_blocks`` keeps a registry of the dense blocks and stacks phantom
parallelism converts; the app registers its own here (``nn`` never imports the app):

* ``Block`` (``app/gpt.py``): read into ``BlockParts`` — the fused QKV is [W_q; W_k; W_v] (rows of
  head h at h·e … (h+1)·e − 1 of each, as ``view(B, T, -1, head_dim)`` takes them), ``out``,
  ``fc1``/``fc2``, ``ln1``/``ln2``, the GELU, pre-norm, batch first, always causal; dropout after
  ``out`` and after ``fc2`` (``dropout1``/``dropout2``), none on the hidden features or the
  attention probabilities. Built back by splitting the QKV into ``q``, ``k``, ``v``.
* ``Blocks``: its blocks, no final norm (``GPT.ln_f`` stays outside the stack, replicated), no
  settings.

So ``PhantomStrategy`` finds ``gpt.blocks`` as it finds ``nn.TransformerEncoder``, replaces it by
one ``PhantomTransformerEncoder`` (the stream is split once on entry and all-gathered once on
exit), and ``to_dense`` / ``reshard_checkpoint`` build these classes back (a checkpoint record
names them by ``kind_name``: import this module, or ``app.language_model``, before rebuilding one).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_phantom.app.gpt import MLP, Block, Blocks, CausalSelfAttention
from lightning_phantom.nn.dense_blocks import (
    BlockParts, DenseBlockKind, DenseLinear, DenseStackKind, StackParts, register_dense_block, register_dense_stack,
)


def _refuse(name: str, why: str) -> None:
    raise ValueError(f"{name} (the app's GPT Block) cannot be converted to phantom form: {why}. Keep it dense "
                     "(strategy=tp, ddp or single), or build the block as app/gpt.py does.")


def read_block(block: Block, name: str) -> BlockParts:
    attn, mlp = block.attn, block.mlp
    if type(attn) is not CausalSelfAttention or type(mlp) is not MLP:
        _refuse(name, f"its attn/mlp are {type(attn).__name__}/{type(mlp).__name__}, not the app's "
                      "CausalSelfAttention/MLP (a subclass's forward may differ)")
    linears = {"attn.q": attn.q, "attn.k": attn.k, "attn.v": attn.v, "attn.out": attn.out, "mlp.fc1": mlp.fc1,
               "mlp.fc2": mlp.fc2}
    for part, linear in linears.items():
        if type(linear) is not nn.Linear:
            _refuse(name, f"{part} is {type(linear).__name__}, not nn.Linear")
    if len({linear.bias is None for linear in linears.values()}) > 1:
        _refuse(name, "some of its linears have a bias and others not")
    if any(type(m) is not nn.Dropout for m in (attn.dropout, mlp.dropout)):
        _refuse(name, "its dropout layers are not nn.Dropout")
    width = attn.q.in_features
    if width % attn.head_dim:
        _refuse(name, f"its width {width} is not a whole number of heads of {attn.head_dim} features")
    bias = None if attn.q.bias is None else torch.cat([attn.q.bias, attn.k.bias, attn.v.bias])
    return BlockParts(
        nhead=width // attn.head_dim, qkv=DenseLinear(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]), bias),
        out=DenseLinear.of(attn.out), linear1=DenseLinear.of(mlp.fc1), linear2=DenseLinear.of(mlp.fc2),
        norm1=block.ln1, norm2=block.ln2, activation=mlp.act, norm_first=True, batch_first=True,
        dropout1=attn.dropout.p, dropout2=mlp.dropout.p, causal=True)


def build_block(parts: BlockParts) -> Block:
    d, f = parts.d_model, parts.dim_feedforward
    refusals = [
        (not (parts.norm_first and parts.batch_first and parts.causal),
         "it is pre-norm, batch-first and causal only"),
        (parts.attention_dropout or parts.dropout, "it has no dropout on the attention probabilities or the MLP's "
                                                   "hidden features"),
        (f % d, f"its MLP width is a multiple of its width (mlp_ratio), got {f} for width {d}"),
        (parts.qkv.bias is None, "its linears have biases"),
        (not isinstance(parts.activation, nn.Module), "its activation is a module (mlp.act)"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"these block parts do not make an app GPT Block: {why}")
    w = parts.qkv.weight
    with torch.device("meta"):  # every tensor is set below: no memory, no draw from the global generator
        block = Block(d, parts.nhead, f // d)
    block = block.to_empty(device=w.device).to(w.dtype)
    block.ln1, block.ln2, block.mlp.act = parts.norm1, parts.norm2, parts.activation
    block.attn.dropout.p, block.mlp.dropout.p = parts.dropout1, parts.dropout2
    q, k, v = parts.qkv.weight.chunk(3)
    qb, kb, vb = parts.qkv.bias.chunk(3)
    targets = [(block.attn.q, q, qb), (block.attn.k, k, kb), (block.attn.v, v, vb),
               (block.attn.out, parts.out.weight, parts.out.bias), (block.mlp.fc1, parts.linear1.weight,
                                                                     parts.linear1.bias),
               (block.mlp.fc2, parts.linear2.weight, parts.linear2.bias)]
    with torch.no_grad():
        for linear, weight, bias in targets:
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    return block


def read_blocks(blocks: Blocks, name: str) -> StackParts:
    if not len(blocks):
        raise ValueError(f"{name} has no blocks; there is nothing to convert.")
    return StackParts(list(blocks), None, {})


def build_blocks(parts: StackParts) -> Blocks:
    if parts.norm is not None:
        raise ValueError("the app's GPT keeps its final norm (ln_f) outside its Blocks; these stack parts have one")
    return Blocks(parts.blocks)


register_dense_block(DenseBlockKind(Block, read_block, build_block))
register_dense_stack(DenseStackKind(Blocks, read_blocks, build_blocks))
