"""The analytic cost of one training step of a GPT (``lightning_phantom.app.gpt``), per rank.

``gpt_cost(shape, batch, seq, p)`` adds up the parts of the model: embeddings, ``layers``
transformer blocks, the final norm and head, and (vocab-parallel head only) the parallel loss.
With p = 1 it is the dense model on one rank; with p > 1 it is Megatron tensor parallelism as
``lightning_phantom.app.tensor_parallel.parallelize_gpt`` lays it out with DTensor (checked call
for call and byte for byte in tests/test_gpt.py). Totals use the conventions of
``lightning_phantom.cost.model``: multiply-adds (MACs) as ``LocalFlopCounterMode`` counts them
(FLOPs / 2, bias additions and element-wise work left out), bytes a rank hands to collectives in
the ring convention of ``lightning_phantom.cost.counting``, exact as Fractions.

Per block of width d, MLP width f, h heads, on rows = batch·seq tokens, per rank:

==========================  =====================================  ==============================
                            forward                                backward
==========================  =====================================  ==============================
q, k, v, out, fc1, fc2      rows·(4d² + 2df)/p MACs                twice that (input and weight
                                                                   gradients)
attention scores            2·rows·seq·d/p (QKᵀ and PV)            5·rows·seq·d/p (torch's FLOP
                                                                   formula for the fused kernel:
                                                                   scores recomputed, 4 products)
collectives (p > 1)         all-reduce rows·d after out and fc2    all-reduce rows·d before q/k/v
                                                                   and before fc1
==========================  =====================================  ==============================

The attention scores are counted over the whole seq × seq square, as torch's formula does,
although a causal kernel may skip the masked half. Embeddings and norms cost no MACs (lookups
and element-wise work) and, replicated, no collective.

The TP block here is the provisional one until the transformer cost model
(``cost/transformer.py``, phantom and TP blocks) lands; ``gpt_cost`` takes its block from
``tp_block_cost`` alone, so that swapping it, and adding the phantom GPT, stays local.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from lightning_phantom._checks import positive_int
from lightning_phantom.cost.model import LayerCost, _ForwardBackward, _layer

HEADS = ("replicated", "vocab_parallel")


@dataclass(frozen=True)
class GPTShape:
    """A GPT's sizes: vocabulary, width d, blocks, attention heads, MLP width f, longest context."""

    vocab: int
    width: int
    layers: int
    heads: int
    hidden: int
    context: int

    def __post_init__(self) -> None:
        for name in ("vocab", "width", "layers", "heads", "hidden", "context"):
            positive_int(name, getattr(self, name), 1)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def params(self) -> int:
        """Parameters of the whole dense model."""
        return gpt_cost(self, batch=1, seq=1).params


@dataclass(frozen=True)
class GPTCost(_ForwardBackward):
    """Per-rank totals of one forward + backward, with the model's parts in ``parts``."""

    shape: GPTShape
    group_size: int
    batch: int
    seq: int
    element_size: int
    head: str
    parts: tuple[LayerCost, ...]
    params: int
    macs_fwd: int
    macs_bwd: int
    sent_bytes_fwd: Fraction
    sent_bytes_bwd: Fraction

    def payloads(self) -> list[tuple[str, int, str]]:
        """Every collective as (kind, payload elements, phase), sorted: comparable with
        ``sorted((r.op, r.numel, r.phase) for r in CommCounter().records)``."""
        return sorted([(op, n, "forward") for part in self.parts for op, n in part.collectives_fwd]
                      + [(op, n, "backward") for part in self.parts for op, n in part.collectives_bwd])

    @property
    def calls(self) -> Counter:
        return Counter(op for op, _, _ in self.payloads())


def _part(kind: str, n_in: int, n_out: int, params: int, macs_fwd: int = 0, macs_bwd: int = 0,
          fwd: tuple = (), bwd: tuple = (), p: int = 1, e: int = 4) -> LayerCost:
    """One part of the model; ``fwd``/``bwd``: its all-reduces as (kind, elements)."""
    return _layer(kind, n_in, n_out, 0, params, macs_fwd, macs_bwd, p,
                  fwd=tuple((op, n, e) for op, n in fwd), bwd=tuple((op, n, e) for op, n in bwd))


def tp_block_cost(width: int, hidden: int, p: int, batch: int, seq: int, element_size: int = 4) -> LayerCost:
    """One pre-norm block (``app/gpt.py``'s ``Block``), Megatron TP over p ranks (p = 1: dense), one
    training step on ``batch`` sequences of ``seq`` tokens; see the module's table."""
    d, f, rows, e = width, hidden, batch * seq, element_size
    linears = rows * (4 * d * d + 2 * d * f) // p
    scores = rows * seq * d // p  # one of the two products QKᵀ, PV
    params = (4 * d * d + 2 * d * f) // p + (3 * d + f) // p + 2 * d + 4 * d  # colwise biases split; rowwise
    reduce = (("all_reduce", rows * d),) * 2 if p > 1 else ()                  # biases and 2 norms whole
    return _part("block", d, d, params, linears + 2 * scores, 2 * linears + 5 * scores, reduce, reduce, p, e)


def gpt_cost(shape: GPTShape, batch: int, seq: int, p: int = 1, head: str = "replicated",
             element_size: int = 4) -> GPTCost:
    """Per-rank cost of one training step on ``batch`` sequences of ``seq`` tokens (see the module
    docstring); ``head``: ``"replicated"`` or ``"vocab_parallel"`` (``parallelize_gpt``'s)."""
    p, e = positive_int("p", p, 1), positive_int("element_size", element_size, 1)
    batch, seq = positive_int("batch", batch, 1), positive_int("seq", seq, 1)
    if seq > shape.context:
        raise ValueError(f"seq {seq} is longer than the GPT's context {shape.context}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    sharded = [("heads", shape.heads), ("hidden", shape.hidden)] + ([("vocab", shape.vocab)]
                                                                     if head == "vocab_parallel" else [])
    for name, n in sharded:
        if n % p:
            raise ValueError(f"{name} = {n} is not divisible by p = {p}; tensor parallelism splits it over "
                             "the ranks")
    d, V, rows = shape.width, shape.vocab, batch * seq
    parts = [_part("embedding", V, d, (V + shape.context) * d)]
    parts += [tp_block_cost(d, shape.hidden, p, batch, seq, e) for _ in range(shape.layers)]
    parts.append(_part("norm", d, d, 2 * d))
    if head == "vocab_parallel" and p > 1:  # colwise over the vocabulary, then loss_parallel's reductions
        head_macs = rows * d * V // p
        parts.append(_part("head", d, V, (d * V + V) // p, head_macs, 2 * head_macs,
                           bwd=(("all_reduce", rows * d),), p=p, e=e))
        # Cross-entropy on sharded logits: the rows' maximum, sum of exponentials and target logit.
        parts.append(_part("loss", V, 1, 0, fwd=(("all_reduce", rows),) * 3, p=p, e=e))
    else:
        parts.append(_part("head", d, V, d * V + V, rows * d * V, 2 * rows * d * V))
    return GPTCost(
        shape=shape, group_size=p, batch=batch, seq=seq, element_size=e, head=head, parts=tuple(parts),
        params=sum(part.params for part in parts), macs_fwd=sum(part.macs_fwd for part in parts),
        macs_bwd=sum(part.macs_bwd for part in parts),
        sent_bytes_fwd=sum((part.sent_bytes_fwd for part in parts), Fraction(0)),
        sent_bytes_bwd=sum((part.sent_bytes_bwd for part in parts), Fraction(0)))
