"""The analytic cost of one training step of a GPT (``lightning_phantom.app.gpt``), per rank.

``gpt_cost(shape, batch, seq, p, scheme=...)`` is the transformer stack of ``cost/transformer.py``
(``stack_cost``: the ``layers`` pre-norm blocks, PP or Megatron TP, attention included) plus what
the GPT has beyond a stack: the embeddings, the final norm, the head and, for a vocab-parallel
head, the parallel loss. Schemes:

* ``"tensor"``: Megatron TP as ``lightning_phantom.app.tensor_parallel.parallelize_gpt`` lays it out
  with DTensor; p = 1 is the dense model on one rank. Embeddings, final norm and a replicated head
  are whole on every rank and send nothing; a vocab-parallel head (``head="vocab_parallel"``) holds
  V/p of the vocabulary, all-reduces the gradient of its input (rows·d) in backward, and its loss
  (``loss_parallel``) all-reduces 3 values per row forward (the rows' maximum, sum of exponentials
  and target logit).
* ``"phantom"``: the blocks are one phantom stack (``strategy=phantom``: the residual stream is split
  on entry, all-gathered once on exit; its input, the embeddings' output, needs a gradient, so the
  split's backward all-gathers it); embeddings, final norm and head are replicated.

Totals use the conventions of ``lightning_phantom.cost.model``: multiply-adds (MACs) as
``LocalFlopCounterMode`` counts them (FLOPs / 2; embeddings and norms cost none), bytes a rank hands
to collectives in the ring convention, exact as Fractions; element sizes as ``stack_cost`` takes
them (``element_size`` for what the linears compute, ``stream_element_size`` for the residual stream
and what is computed outside the linears: 4 under autocast). tests/test_gpt.py and
tests/test_gpt_phantom.py hold both schemes equal to what DTensor and the phantom stack issue and
compute, call for call and byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from lightning_phantom._checks import positive_int
from lightning_phantom.cost.model import LayerCost, _layer
from lightning_phantom.cost.transformer import SCHEMES, PartsCost, StackCost, stack_cost
from lightning_phantom.nn.ghosts import GhostSpec

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
class GPTCost(PartsCost):
    """Per-rank totals of one forward + backward; ``parts`` lists the model's parts in order (the stack's
    included), ``stack`` is the blocks' own ``StackCost``."""

    shape: GPTShape
    scheme: str
    group_size: int
    batch: int
    seq: int
    element_size: int
    head: str
    stack: StackCost


def _outside(shape: GPTShape, rows: int, p: int, head: str, stream: int) -> tuple[list[LayerCost], list[LayerCost]]:
    """The parts before the stack (embeddings) and after it (final norm, head, loss)."""
    d, V = shape.width, shape.vocab
    before = [_layer("embedding", V, d, 0, (V + shape.context) * d, 0, 0, p)]
    after = [_layer("norm_final", d, d, 0, 2 * d, 0, 0, p)]
    if head == "vocab_parallel" and p > 1:  # colwise over the vocabulary, then loss_parallel's reductions
        macs = rows * d * V // p
        after += [_layer("head", d, V, 0, (d * V + V) // p, macs, 2 * macs, p, bwd=[("all_reduce", rows * d, stream)]),
                  _layer("loss", V, 1, 0, 0, 0, 0, p, fwd=[("all_reduce", rows, stream)] * 3)]
    else:
        after.append(_layer("head", d, V, 0, d * V + V, rows * d * V, 2 * rows * d * V, p))
    return before, after


def gpt_cost(shape: GPTShape, batch: int, seq: int, p: int = 1, head: str = "replicated", element_size: int = 4, *,
             scheme: str = "tensor", ghosts: Union[GhostSpec, Sequence[int]] = "auto",
             stream_element_size: Optional[int] = None) -> GPTCost:
    """Per-rank cost of one training step on ``batch`` sequences of ``seq`` tokens (see the module
    docstring); ``scheme`` "tensor" (``head``: ``parallelize_gpt``'s) or "phantom" (``ghosts``: the
    stack's, four per block; the head replicated)."""
    p, e = positive_int("p", p, 1), positive_int("element_size", element_size, 1)
    batch, seq = positive_int("batch", batch, 1), positive_int("seq", seq, 1)
    stream = e if stream_element_size is None else positive_int("stream_element_size", stream_element_size, 1)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if seq > shape.context:
        raise ValueError(f"seq {seq} is longer than the GPT's context {shape.context}")
    if head not in HEADS or (scheme == "phantom" and head != "replicated"):
        raise ValueError(f"head must be one of {HEADS} ('replicated' for scheme 'phantom'), got {head!r}")
    how = "tensor parallelism" if scheme == "tensor" else "phantom parallelism"
    sharded = [("heads", shape.heads), ("hidden", shape.hidden)] + ([("vocab", shape.vocab)]
                                                                     if head == "vocab_parallel" else [])
    for name, n in sharded:
        if n % p:
            raise ValueError(f"{name} = {n} is not divisible by p = {p}; {how} splits it over the ranks")
    stack = stack_cost(scheme, shape.width, shape.heads, shape.hidden, shape.layers, p, batch, seq, ghosts, e,
                       norm_first=True, input_requires_grad=True, stream_element_size=stream)
    before, after = _outside(shape, batch * seq, p, head, stream)
    return GPTCost.of(before + list(stack.parts) + after, shape=shape, scheme=scheme, group_size=p, batch=batch,
                      seq=seq, element_size=e, head=head, stack=stack)
