"""The analytic cost of a transformer stack, per rank and step: phantom (PP) against Megatron TP.

``stack_cost("phantom" | "tensor", ...)`` describes ``layers`` blocks of width d, ``heads``
heads and MLP width f on a group of p, for ``batch`` sequences of ``seq`` tokens (rows =
batch × seq), part by part (docs/operator.md §10.6, §10.8):

* PP (``PhantomTransformerEncoder``): per block the QKV, attention output, MLP in and MLP
  out are phantom layers (one ghost all-gather forward, one reduce-scatter backward each; the
  arithmetic of §8), the two norms all-reduce 2 row statistics forward and backward; the stack
  enters with a split (its backward all-gathers the input gradient, if the input needs one) and
  leaves with one all-gather, and its final norm, if any, all-reduces like the others.
* TP (Megatron, no sequence parallelism): QKV and MLP in column-parallel (backward: an
  all-reduce of the input gradient, for the first block's QKV only when its input needs a
  gradient), attention output and MLP out row-parallel (forward: an all-reduce of d per row),
  norms replicated.
* Attention (scores and values) on h/p heads per rank in both, counted as
  ``torch.utils.flop_counter`` counts SDPA: 2 products of L × L × e per head forward, 5
  backward (the scores recomputed), or 4 in the math form that attention dropout uses.

Bytes follow ``cost/model.py``'s ring convention and element sizes: ghosts and the linears'
outputs in ``element_size``; sums of partial results (the ghost-gradient reduce-scatter, the norm
statistics) in ``accumulation_size`` of the values summed (at least float32), as ``ops/comm.py``
and ``nn/norms.py`` send them; what the blocks pass between their linears — the residual stream
(PP's entry and exit) and the norms' outputs, whose gradients TP's column-parallel linears
all-reduce — in ``stream_element_size``. Under autocast only the linears compute in 16 bits, so
that is the stream's own float32 (4) while ``element_size`` is 2; otherwise the two are equal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Optional, Sequence, Union

from lightning_phantom._checks import positive_int
from lightning_phantom.cost.model import LayerCost, _ForwardBackward, _layer, _ratio, accumulation_size, norm_cost
from lightning_phantom.nn.ghosts import GhostSpec, resolve_ghosts

SCHEMES = ("phantom", "tensor")


@dataclass(frozen=True)
class PartsCost(_ForwardBackward):
    """Totals over a block's (or a whole stack's) parts; ``parts`` lists them, each a ``LayerCost``."""

    parts: tuple[LayerCost, ...]
    params: int
    macs_fwd: int
    macs_bwd: int
    sent_bytes_fwd: Fraction
    sent_bytes_bwd: Fraction

    @classmethod
    def of(cls, parts: Sequence[LayerCost], **fields):
        """The totals over ``parts``; ``fields``: a subclass's own."""
        return cls(tuple(parts), sum(x.params for x in parts), sum(x.macs_fwd for x in parts),
                   sum(x.macs_bwd for x in parts), sum((x.sent_bytes_fwd for x in parts), Fraction(0)),
                   sum((x.sent_bytes_bwd for x in parts), Fraction(0)), **fields)

    def part(self, kind: str) -> LayerCost:
        return next(x for x in self.parts if x.kind == kind)

    def payloads(self) -> list[tuple[str, int, str]]:
        """Every collective as (kind, payload elements, phase), sorted, as ``CommCounter`` records them."""
        return sorted([(op, n, "forward") for x in self.parts for op, n in x.collectives_fwd]
                      + [(op, n, "backward") for x in self.parts for op, n in x.collectives_bwd])

    @property
    def calls(self) -> Counter:
        return Counter(op for op, _, _ in self.payloads())


@dataclass(frozen=True)
class StackCost(PartsCost):
    """One step of a stack: its blocks (``blocks``, each a ``PartsCost``) and, in ``parts``, everything."""

    scheme: str = "phantom"
    blocks: tuple[PartsCost, ...] = ()


def _linear(kind: str, n_in: int, n_out: int, p: int, k: int, rows: int, e: int, bias: bool,
            input_grad: bool) -> LayerCost:
    """One phantom layer n_in → n_out on rank i (docs/operator.md §8), or a plain Linear when p = 1."""
    a, c = n_in // p, n_out // p
    local = rows * c * a
    if p == 1:
        return _layer(kind, n_in, n_out, 0, c * a + c * bias, local, local * (1 + input_grad), p)
    fwd = rows * (c * a + k * a + (p - 1) * k * c)
    # Backward: dL, dD, dC and the ghost gradients always; dX (local block and through C) if needed.
    bwd = 2 * fwd - (0 if input_grad else rows * (c * a + k * a))
    return _layer(kind, n_in, n_out, k, c * a + c * bias + k * a + (p - 1) * c * k, fwd, bwd, p,
                  [("all_gather", rows * k, e)], [("reduce_scatter", p * rows * k, accumulation_size(e))])


def _megatron(kind: str, n_in: int, n_out: int, p: int, rows: int, e: int, bias: bool, column: bool,
              input_grad: bool, stream: int) -> LayerCost:
    """A Megatron column-parallel (backward: all-reduce of the gradient of its input, a norm's output, in
    ``stream`` bytes) or row-parallel (forward: output all-reduce; bias replicated) linear on one rank."""
    comm = p > 1
    if column:
        fwd = rows * (n_out // p) * n_in
        reduce = [("all_reduce", rows * n_in, stream)] if comm and input_grad else []
        return _layer(kind, n_in, n_out, 0, (n_out // p) * (n_in + bias), fwd, fwd * (1 + input_grad), p, (),
                      reduce)
    fwd = rows * n_out * (n_in // p)
    reduce = [("all_reduce", rows * n_out, e)] if comm else []
    return _layer(kind, n_in, n_out, 0, n_out * (n_in // p) + n_out * bias, fwd, 2 * fwd, p, reduce)


def _attention(d: int, heads: int, p: int, batch: int, seq: int, math: bool) -> LayerCost:
    """Scores and values of h/p heads: 2·N·(h/p)·L·L·e MACs forward; backward 5/2 of that (SDPA), 2 (math)."""
    per_product = batch * (heads // p) * seq * seq * (d // heads)
    return _layer("attention", d, d, 0, 0, 2 * per_product, (4 if math else 5) * per_product, p)


def _norm(scheme: str, kind: str, d: int, p: int, rows: int, stream: int, bias: bool) -> LayerCost:
    per_feature = 1 + bias if kind == "layernorm" else 1
    if scheme == "tensor":  # replicated on every rank: nothing sent
        return _layer(kind, d, d, 0, per_feature * d, 0, 0, p)
    # Statistics of the stream, summed in accumulation_size(stream) bytes (norm_cost).
    return replace(norm_cost(kind, d, p, rows, stream), params=per_feature * (d // p))


def _column_ends(p: int, rows: int, d: int, e: int, input_requires_grad: bool) -> tuple[LayerCost, LayerCost]:
    """docs/operator.md §10.5: the split (backward: all-gather of the input gradient) and the exit all-gather."""
    gather = [("all_gather", rows * d // p, e)] if p > 1 else []
    entry = _layer("entry", d, d, 0, 0, 0, 0, p, (), gather if input_requires_grad else [])
    return entry, _layer("exit", d, d, 0, 0, 0, 0, p, gather)


def stack_cost(scheme: str, d_model: int, heads: int, dim_feedforward: int, layers: int, p: int, batch: int,
               seq: int, ghosts: Union[GhostSpec, Sequence[int]] = "auto", element_size: int = 4, *,
               norm_first: bool = False, final_norm: bool = False, norm: str = "layernorm", bias: bool = True,
               input_requires_grad: bool = False, attention_dropout: bool = False,
               stream_element_size: Optional[int] = None) -> StackCost:
    """Per-rank cost of one forward + backward of a transformer stack (see the module docstring).

    ``ghosts`` is resolved as for the phantom stack (four phantom layers per block, reading d, d, d
    and f features); TP ignores it. ``attention_dropout``: training with attention dropout > 0, where
    the phantom attention runs in its math form (TP's SDPA would too). ``stream_element_size``: bytes
    of the residual stream (default ``element_size``; 4 under autocast, see the module docstring).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    d, h, f = (positive_int(n, v) for n, v in (("d_model", d_model), ("heads", heads), ("dim_feedforward",
                                                                                        dim_feedforward)))
    p, layers = positive_int("p", p), positive_int("layers", layers)
    batch, seq, e = positive_int("batch", batch), positive_int("seq", seq), positive_int("element_size", element_size)
    s = e if stream_element_size is None else positive_int("stream_element_size", stream_element_size)
    if d % h or h % p or f % p:
        raise ValueError(f"d_model ({d}) must be divisible by heads ({h}), and heads ({h}) and dim_feedforward "
                         f"({f}) by p ({p}); got {d} % {h} = {d % h}, {h} % {p} = {h % p}, {f} % {p} = {f % p}")
    rows = batch * seq
    per_layer = resolve_ghosts(ghosts, [d, d, d, f] * layers, p, "the transformer stack")
    blocks = []
    for b in range(layers):
        # The first block's QKV reads the stack's input itself only with post-norm.
        grad_in = input_requires_grad or norm_first or b > 0
        k = per_layer[4 * b:4 * b + 4]
        if scheme == "phantom":
            linears = [_linear(kind, n_in, n_out, p, k[i], rows, e, bias, i > 0 or grad_in)
                       for i, (kind, n_in, n_out) in enumerate((("qkv", d, 3 * d), ("out", d, d), ("fc1", d, f),
                                                                 ("fc2", f, d)))]
        else:
            linears = [_megatron("qkv", d, 3 * d, p, rows, e, bias, True, grad_in, s),
                       _megatron("out", d, d, p, rows, e, bias, False, True, s),
                       _megatron("fc1", d, f, p, rows, e, bias, True, True, s),
                       _megatron("fc2", f, d, p, rows, e, bias, False, True, s)]
        qkv, out, fc1, fc2 = linears
        norm1, norm2 = (replace(_norm(scheme, norm, d, p, rows, s, bias), kind=f"{norm}{i}") for i in (1, 2))
        blocks.append(PartsCost.of([norm1, qkv, _attention(d, h, p, batch, seq, attention_dropout), out, norm2,
                                    fc1, fc2]))
    ends = []
    if scheme == "phantom":
        entry, leave = _column_ends(p, rows, d, s, input_requires_grad)
        ends = [entry, leave]
    if final_norm:
        ends.append(replace(_norm(scheme, norm, d, p, rows, s, bias), kind=f"{norm}_final"))
    return StackCost.of([x for block in blocks for x in block.parts] + ends, scheme=scheme, blocks=tuple(blocks))


@dataclass(frozen=True)
class StackComparison:
    """PP against TP for the same stack; ratios PP/TP, exact, None where TP's figure is 0."""

    phantom: StackCost
    tensor: StackCost

    @property
    def communication(self):
        return _ratio(self.phantom.sent_bytes, self.tensor.sent_bytes)

    @property
    def arithmetic(self):
        return _ratio(self.phantom.macs, self.tensor.macs)

    @property
    def params(self):
        return _ratio(self.phantom.params, self.tensor.params)

    def describe(self) -> str:
        """One line for logs."""
        def ratio(r) -> str:
            return "n/a" if r is None else f"{float(r):.3g}x"

        pp, tp = self.phantom, self.tensor
        return (f"params/rank PP {pp.params:,} vs TP {tp.params:,} ({ratio(self.params)}); sent/rank/step PP "
                f"{float(pp.sent_bytes):.4g} B vs TP {float(tp.sent_bytes):.4g} B ({ratio(self.communication)}); "
                f"MACs/rank/step PP/TP {ratio(self.arithmetic)}")


def compare_stacks(*args, **kwargs) -> StackComparison:
    """``stack_cost`` of both schemes with the same arguments (less ``scheme``)."""
    return StackComparison(stack_cost("phantom", *args, **kwargs), stack_cost("tensor", *args, **kwargs))


def stack_summary(d_model: int, heads: int, dim_feedforward: int, layers: int, p: int, ghosts: Sequence[int], *,
                  norm_first: bool = False, final_norm: bool = False) -> str:
    """One line for a log: a stack's parameters per rank and PP/TP traffic and arithmetic per token."""
    return compare_stacks(d_model, heads, dim_feedforward, layers, p, 1, 1, list(ghosts), norm_first=norm_first,
                          final_norm=final_norm).describe() + " (per token, fp32)"
