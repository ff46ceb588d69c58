"""A small GPT, densely defined: what ``model=gpt`` trains, whatever the strategy does with it.

Pre-norm and causal, as GPT-2 and nanoGPT: token and position embeddings, then ``layers`` blocks

    x = x + attn(ln1(x))        attn: separate q, k, v and out nn.Linear(d, d)
    x = x + mlp(ln2(x))         mlp: fc1 nn.Linear(d, f), GELU, fc2 nn.Linear(f, d)

then a final LayerNorm and the head ``nn.Linear(d, vocab)`` (not tied to the token embedding).

This file knows nothing of parallelism, as torchtitan keeps a model apart from its plan
(``lightning_phantom.app.tensor_parallel.parallelize_gpt``). Two choices make that possible:

* Heads come from ``view(B, T, -1, head_dim)``, never from a head count: a ``q`` whose output
  features a tensor-parallel plan has split over p ranks yields this rank's h/p heads, and the
  block computes on them without knowing it.
* Dropout sits on the embeddings and on each residual branch (after ``out`` and ``fc2``), where
  the tensor is whole on every rank, and not on the attention probabilities: there it would be
  drawn on each rank's heads apart, and ``F.scaled_dot_product_attention`` on CPU keeps its fused
  kernel (and its FLOP formula, ``lightning_phantom.cost.gpt``) only without it.

Initialisation (``GPT.reset_parameters``) is GPT-2's: normal(0, 0.02) for the embeddings and
Linear weights, zero biases, residual projections (``out``, ``fc2``) scaled by 1/sqrt(2·layers).
Drawn from torch's global generator, so the app's seed gives every rank the same dense model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gpt_settings_error(vocab: int, width: int, layers: int, heads: int, mlp_ratio: int, context: int,
                       dropout: float) -> str | None:
    """What is wrong with these settings, in one line naming the ``model.`` key, or None."""
    for name, value in (("vocab", vocab), ("width", width), ("layers", layers), ("heads", heads),
                        ("mlp_ratio", mlp_ratio), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"model.{name} must be an integer >= 1, got {value!r}"
    if width % heads:
        return (f"model.width={width} is not divisible by model.heads={heads} ({width} % {heads} = "
                f"{width % heads}); each head has width/heads features")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"model.dropout must be a number in [0, 1), got {dropout!r}"
    return None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v and out projections."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads, head_dim) -> (B, heads, T, head_dim); "heads" is however many q produced.
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dropout(self.out(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    """fc1, GELU, fc2 (and dropout on the branch's output)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads, dropout)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, mlp_ratio * width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Blocks(nn.ModuleList):
    """The blocks in order, as one module: the residual stream goes through each in turn.

    A ``ModuleList`` (the state-dict keys are ``blocks.0.ln1.weight`` …) with a forward of its own,
    so that a strategy can treat the stack as one module: ``strategy=phantom`` replaces it whole
    by a phantom stack (``lightning_phantom.app.gpt_blocks`` registers it), which keeps the stream
    split over the ranks from the first block to the last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
        return x


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), causal; T <= context."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, mlp_ratio: int = 4, context: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        error = gpt_settings_error(vocab, width, layers, heads, mlp_ratio, context, dropout)
        if error:
            raise ValueError(error)
        self.vocab, self.width, self.layers, self.heads = vocab, width, layers, heads
        self.mlp_ratio, self.context = mlp_ratio, context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = Blocks(Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:  # GPT-2: the residual stream's variance grows with depth otherwise
            for residual in (block.attn.out, block.mlp.fc2):
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * self.layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[-1]
        if T > self.context:
            raise ValueError(f"the GPT takes at most model.context={self.context} tokens, got {T}")
        positions = torch.arange(T, device=tokens.device)
        x = self.dropout(self.tok(tokens) + self.pos(positions))
        return self.head(self.ln_f(self.blocks(x)))
