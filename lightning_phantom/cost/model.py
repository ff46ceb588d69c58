"""The analytic cost of one training step, per rank: phantom (PP) against tensor parallelism (TP).

``phantom_cost`` and ``tp_cost`` describe an FFN ``sizes = [d_in, n_1, ..., n_{L-1}, d_out]``
(L Linear layers) on a group of p ranks, with ``rows`` input rows (batch × tokens) of
``element_size``-byte elements, layer by layer: parameters held, multiply-adds (MACs)
forward and backward, the collectives issued and the bytes this rank sends for them.

Sent bytes use the ring convention of ``lightning_phantom.cost.counting`` (all_gather:
(p-1)·input bytes; reduce_scatter: (p-1)/p·input bytes; all_reduce: 2(p-1)/p·bytes),
so ``CommCounter`` totals and these predictions are compared exactly, as Fractions.
The formulas are spelled out here rather than borrowed from ``counting`` so that the
comparison checks one against the other.

**Element sizes.** ``element_size`` is the bytes of the activations the layers compute in (2
under bfloat16 or float16, autocast or half-precision weights). Not every collective sends
them: the phantom layers add partial sums in float32 under half precision
(``ops.comm.accumulation_dtype``), so the last layer's forward all-reduce, the ghost-gradient
reduce-scatter, the first layer's input-gradient all-reduce and the norms' statistics send
``accumulation_size(element_size)`` bytes per value (``StepCost.accumulation_size``); only the
ghost all-gather sends ``element_size``. DTensor (TP) adds partial sums in the tensor's own
dtype: counted under bfloat16 (autocast and bfloat16 weights), every collective sends 2 bytes a
value, except the first layer's input-gradient all-reduce, which sums the gradient of the FFN's
input in the input's dtype (``input_element_size``: 4 for float32 data under autocast).
``StepCost.payloads(element_sizes=True)`` lists each call's bytes per element.

FLOPs are 2·MACs, which is what ``torch.utils.flop_counter.FlopCounterMode`` counts for
mm/addmm. Bias additions (rows·n_out per layer) are in neither: FlopCounterMode does
not count them and the table of docs/operator.md §8 leaves them out.

What DTensor actually issues for ``parallelize_ffn`` (lightning_phantom.app.tensor_parallel),
counted with ``CommCounter`` on gloo (p = 1, 2, 4; directly and inside Lightning's
``ModelParallelStrategy``; tests/test_tensor_parallel.py), is exactly Megatron's
column/row pairing, call for call and byte for byte:

* ColwiseParallel: input Replicate, no forward collective; backward one all_reduce of
  the input gradient (rows·n_in, the adjoint of ``DTensor.from_local(Replicate)``),
  which autograd never runs when the input needs no grad: for the first layer of an
  FFN fed by data, TP's step has one all-reduce fewer than "one per layer".
* RowwiseParallel: forward one all_reduce of rows·n_out (Partial -> Replicate); the
  replicated bias costs no collective (outputs match the dense layer to round-off);
  backward none (the Replicate -> Partial adjoint is local).
* DTensor's functional collectives return new tensors instead of reducing in place as
  Megatron does: more memory traffic, the same bytes on the wire.
* Odd number of layers: the last ColwiseParallel(output_layouts=Replicate()) issues one
  all_gather_into_tensor of this rank's rows·n_out/p outputs (gathered along dim 0 and
  re-laid out locally); its backward (Replicate -> Shard) is a local slice, no collective.
* Plain ``FlopCounterMode`` counts DTensor matmuls at their logical (global) shape,
  p times each rank's; ``counting.LocalFlopCounterMode`` counts each rank's own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional, Sequence, Union

import torch

from lightning_phantom._checks import positive_int
from lightning_phantom.nn.ghosts import resolve_ghosts
from lightning_phantom.ops.comm import accumulation_dtype

Collectives = tuple[tuple[str, int], ...]  # (collective kind, payload elements) per call
Call = tuple[str, int, int]  # (collective kind, payload elements, bytes per element)
_FLOATS = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}  # float16 adds as bfloat16 does


def accumulation_size(element_size: int) -> int:
    """Bytes per value of the partial sums the phantom layers' collectives add, for activations of
    ``element_size`` bytes: float32's 4 for bfloat16/float16 (``ops.comm.accumulation_dtype``)."""
    dtype = _FLOATS.get(element_size)
    return element_size if dtype is None else accumulation_dtype(dtype).itemsize


class _ForwardBackward:
    """Totals over forward and backward, for a layer or a whole step."""

    macs_fwd: int
    macs_bwd: int
    sent_bytes_fwd: Fraction
    sent_bytes_bwd: Fraction

    @property
    def macs(self) -> int:
        return self.macs_fwd + self.macs_bwd

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def sent_bytes(self) -> Fraction:
        return self.sent_bytes_fwd + self.sent_bytes_bwd


@dataclass(frozen=True)
class LayerCost(_ForwardBackward):
    """One Linear layer's cost on one rank for one step (forward + backward).

    ``kind``: PP "column" | "phantom" | "row"; TP "colwise" | "rowwise" | "colwise_gather".
    Payload elements follow ``counting``: all_gather counts this rank's input,
    reduce_scatter the full (p-shard) input, all_reduce the tensor.
    """

    kind: str
    n_in: int
    n_out: int
    ghosts: int  # 0 for layers without ghosts
    params: int
    macs_fwd: int
    macs_bwd: int
    sent_bytes_fwd: Fraction
    sent_bytes_bwd: Fraction
    collectives_fwd: Collectives
    collectives_bwd: Collectives
    element_sizes_fwd: tuple[int, ...]  # bytes per element of each call in collectives_fwd
    element_sizes_bwd: tuple[int, ...]


@dataclass(frozen=True)
class StepCost(_ForwardBackward):
    """Per-rank totals of one forward + backward, with the layers in ``per_layer``."""

    scheme: str  # "phantom" or "tensor"
    sizes: tuple[int, ...]
    group_size: int
    rows: int
    element_size: int  # of the activations
    input_requires_grad: bool
    per_layer: tuple[LayerCost, ...]
    params: int
    macs_fwd: int
    macs_bwd: int
    sent_bytes_fwd: Fraction
    sent_bytes_bwd: Fraction
    collectives: tuple[tuple[str, int], ...]  # (kind, number of calls), sorted by kind
    accumulation_size: int  # bytes per value of the partial sums added between ranks
    input_element_size: int  # of the FFN's input (its gradient is all-reduced when it requires one)

    @classmethod
    def from_layers(cls, scheme: str, sizes, p: int, rows: int, element_size: int, input_requires_grad: bool,
                    layers: Sequence[LayerCost], accumulation_size: int,
                    input_element_size: int) -> "StepCost":
        calls = Counter(op for layer in layers for op, _ in layer.collectives_fwd + layer.collectives_bwd)
        return cls(
            scheme=scheme, sizes=tuple(sizes), group_size=p, rows=rows, element_size=element_size,
            input_requires_grad=input_requires_grad, per_layer=tuple(layers),
            accumulation_size=accumulation_size, input_element_size=input_element_size,
            params=sum(layer.params for layer in layers),
            macs_fwd=sum(layer.macs_fwd for layer in layers),
            macs_bwd=sum(layer.macs_bwd for layer in layers),
            sent_bytes_fwd=sum((layer.sent_bytes_fwd for layer in layers), Fraction(0)),
            sent_bytes_bwd=sum((layer.sent_bytes_bwd for layer in layers), Fraction(0)),
            collectives=tuple(sorted(calls.items())),
        )

    def payloads(self, element_sizes: bool = False) -> list[tuple]:
        """Every collective of the step as (kind, payload elements, phase), sorted: comparable
        with ``sorted((r.op, r.numel, r.phase) for r in CommCounter().records)``; with
        ``element_sizes``, (kind, payload elements, bytes per element, phase) as
        ``(r.op, r.numel, r.element_size, r.phase)``."""
        out = []
        for layer in self.per_layer:
            for phase, calls, sizes in (("forward", layer.collectives_fwd, layer.element_sizes_fwd),
                                        ("backward", layer.collectives_bwd, layer.element_sizes_bwd)):
                out += [(op, n, e, phase) if element_sizes else (op, n, phase)
                        for (op, n), e in zip(calls, sizes)]
        return sorted(out)

    @property
    def calls(self) -> Counter:
        """Number of collectives by kind, comparable with ``CommCounter.calls``."""
        return Counter(dict(self.collectives))


def _check_sizes(sizes, p: int, divisible: Sequence[int], why: str) -> list[int]:
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least [d_in, d_out] (one Linear layer), got {sizes}")
    for i, n in enumerate(sizes):
        positive_int(f"sizes[{i}]", n, 1)
    for i in divisible:
        if sizes[i] % p:
            raise ValueError(
                f"sizes[{i}] = {sizes[i]} is not divisible by p = {p} ({sizes[i]} % {p} = {sizes[i] % p}); "
                f"{why}. Use a multiple of {p} or another group size."
            )
    return sizes


def ring_bytes(op: str, p: int, payload_bytes: int) -> Fraction:
    """Bytes one rank sends for one call, by the ring convention of the module docstring."""
    if op == "all_gather":
        return Fraction((p - 1) * payload_bytes)
    if op == "reduce_scatter":
        return Fraction((p - 1) * payload_bytes, p)
    return Fraction(2 * (p - 1) * payload_bytes, p)  # all_reduce


def _layer(kind: str, n_in: int, n_out: int, ghosts: int, params: int, macs_fwd: int, macs_bwd: int, p: int,
           fwd: Sequence[Call] = (), bwd: Sequence[Call] = ()) -> LayerCost:
    """A LayerCost from its calls forward and backward, each (kind, payload elements, bytes per element)."""
    def sent(calls: Sequence[Call]) -> Fraction:
        return sum((ring_bytes(op, p, n * e) for op, n, e in calls), Fraction(0))

    return LayerCost(kind, n_in, n_out, ghosts, params, macs_fwd, macs_bwd, sent(fwd), sent(bwd),
                     tuple((op, n) for op, n, _ in fwd), tuple((op, n) for op, n, _ in bwd),
                     tuple(e for *_, e in fwd), tuple(e for *_, e in bwd))


def _sizes(element_size: int, input_element_size: Optional[int]) -> tuple[int, int]:
    e = positive_int("element_size", element_size, 1)
    return e, e if input_element_size is None else positive_int("input_element_size", input_element_size, 1)


#: Row statistics each sharded norm all-reduces per row (forward, and again backward), and
#: its parameters per feature (affine weight and bias; RMSNorm has no bias).
NORM_STATISTICS = {"layernorm": 2, "rmsnorm": 1, "batchnorm": 0}
NORM_PARAMS = {"layernorm": 2, "rmsnorm": 1, "batchnorm": 2}


def norm_cost(kind: str, features: int, p: int, rows: int, element_size: int = 4) -> LayerCost:
    """Per-rank cost of a sharded norm over ``features`` (lightning_phantom.nn.norms), one step.

    LayerNorm/RMSNorm all-reduce 2/1 partial sums per row forward, and the same backward
    (``reduce_statistics``), in float32 or wider (``accumulation_size``); BatchNorm1d is per
    feature and sends nothing. Their arithmetic is element-wise, no multiply-add of a matrix
    product: 0 MACs, as FlopCounterMode counts.
    """
    if kind not in NORM_STATISTICS:
        raise ValueError(f"norm kind must be one of {sorted(NORM_STATISTICS)}, got {kind!r}")
    stats = rows * NORM_STATISTICS[kind]
    calls = [("all_reduce", stats, accumulation_size(element_size))] if p > 1 and stats else []
    return _layer(kind, features, features, 0, NORM_PARAMS[kind] * (features // p), 0, 0, p, calls, calls)


def phantom_cost(sizes: Sequence[int], p: int, ghosts: Union[int, Sequence[int]], rows: int,
                 element_size: int = 4, *, input_requires_grad: bool = False,
                 norms: Optional[Mapping[int, str]] = None,
                 input_element_size: Optional[int] = None) -> StepCost:
    """Per-rank cost of one step of ``PhantomFFN(sizes, ghosts)`` on a phantom group of ``p``.

    With p = 1 every layer is a plain Linear (``PhantomLinear`` has no compressor then)
    and nothing is communicated; with L = 2 Linear layers there is no phantom layer and
    the model is a Megatron column/row pair. ``norms`` maps a hidden width's index i
    (1 <= i < L, the output of Linear i-1) to the kind of norm after it ("layernorm",
    "rmsnorm", "batchnorm"; see ``norm_cost``). ``element_size``: bytes of the activations;
    the partial sums go in ``accumulation_size`` of it, the input gradient's in that of
    ``input_element_size`` (default ``element_size``): see "Element sizes" in the module docstring.
    """
    p = positive_int("p", p, 1)
    rows = positive_int("rows", rows, 1)
    e, e_in = _sizes(element_size, input_element_size)
    acc = accumulation_size(e)
    sizes = list(sizes)
    sizes = _check_sizes(sizes, p, range(1, len(sizes) - 1),
                         "every hidden width is split into n/p neurons per rank")
    if len(sizes) < 3:
        raise ValueError("a phantom FFN needs at least 2 Linear layers (column-parallel first, row-parallel "
                         f"last), got sizes={sizes}")
    per_layer_ghosts = resolve_ghosts(ghosts, sizes[1:-2], p, f"sizes={sizes}")
    comm = p > 1  # a group of one bypasses every collective (comm.py)
    layers = []

    # First layer (docs/operator.md §5, column-parallel): c outputs from the whole input;
    # the input gradient is an all-reduce of the ranks' partial gradients.
    d_in, c = sizes[0], sizes[1] // p
    fwd = rows * c * d_in
    grad_in = [("all_reduce", rows * d_in, accumulation_size(e_in))] if comm and input_requires_grad else []
    layers.append(_layer("column", d_in, sizes[1], 0, c * d_in + c, fwd,
                         fwd * (2 if input_requires_grad else 1), p, bwd=grad_in))

    # Hidden phantom layers (docs/operator.md §2–§4).
    for layer, k in enumerate(per_layer_ghosts, start=1):
        n_in, n_out = sizes[layer], sizes[layer + 1]
        a, c = n_in // p, n_out // p
        if not comm:
            layers.append(_layer("phantom", n_in, n_out, k, c * a + c, rows * c * a, 2 * rows * c * a, p))
            continue
        # Parameters (§2): L_i (c×a) + b_i (c) + C_i (k×a) + D_ij for j≠i ((p-1) × c×k).
        params = c * a + c + k * a + c * (p - 1) * k
        # Forward 1, 3, 4 (§3): ghosts X_i C_iᵀ (k·a), local block (c·a) and the
        # p-1 decompressions G_j D_ijᵀ (k·c) per row.
        fwd = rows * (c * a + k * a + (p - 1) * k * c)
        # Forward 2 (§3): all_gather of B×k ghosts; Backward 2 (§4): reduce_scatter of
        # the p×B×k buffer (partial sums: in acc). Each sends (p-1)·B·k values, 2·(p-1)·k
        # per row in all (§8).
        layers.append(_layer("phantom", n_in, n_out, k, params, fwd, 2 * fwd, p,  # §8
                             fwd=[("all_gather", rows * k, e)], bwd=[("reduce_scatter", p * rows * k, acc)]))

    # Last layer (§5, row-parallel): Y = all_reduce(Σ_i X_i W_out,iᵀ) + b_out with b_out
    # replicated (the partial sums in acc); backward is the identity, so no collective.
    a, d_out = sizes[-2] // p, sizes[-1]
    fwd = rows * d_out * a
    layers.append(_layer("row", sizes[-2], d_out, 0, d_out * a + d_out, fwd, 2 * fwd, p,
                         fwd=[("all_reduce", rows * d_out, acc)] if comm else []))
    for width in sorted(norms or {}, reverse=True):  # after Linear width-1, before Linear width
        if not 1 <= width < len(sizes) - 1:
            raise ValueError(f"norms keys are hidden-width indices 1..{len(sizes) - 2}, got {width!r}")
        layers.insert(width, norm_cost(norms[width], sizes[width], p, rows, e))
    return StepCost.from_layers("phantom", sizes, p, rows, e, input_requires_grad, layers, acc, e_in)


def tp_cost(sizes: Sequence[int], p: int, rows: int, element_size: int = 4, *,
            input_requires_grad: bool = False, input_element_size: Optional[int] = None) -> StepCost:
    """Per-rank cost of one step of ``parallelize_ffn`` (DTensor Colwise/Rowwise) on ``p`` ranks.

    Layers alternate ColwiseParallel / RowwiseParallel starting with Colwise; with an odd
    number of layers the last is Colwise with its output gathered to Replicate. See the
    module docstring for how this was checked against DTensor, and for ``input_element_size``.
    """
    p = positive_int("p", p, 1)
    rows = positive_int("rows", rows, 1)
    e, e_in = _sizes(element_size, input_element_size)
    sizes = list(sizes)
    n_layers = len(sizes) - 1
    # Colwise layers shard their outputs, Rowwise their inputs: every hidden width is
    # split, and d_out too when the last layer is a gathering Colwise.
    divisible = list(range(1, n_layers)) + ([n_layers] if n_layers % 2 else [])
    sizes = _check_sizes(sizes, p, divisible, "tensor parallelism shards it into n/p per rank")
    comm = p > 1  # DTensor on a mesh of one issues no collective (checked in tests)
    layers = []
    for i in range(n_layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        if i % 2 == 0:  # ColwiseParallel: rank holds n_out/p rows of W and of the bias.
            fwd = rows * (n_out // p) * n_in
            grad_in = i > 0 or input_requires_grad
            gather = i == n_layers - 1  # odd count: output_layouts=Replicate()
            layers.append(_layer(
                "colwise_gather" if gather else "colwise", n_in, n_out, 0, (n_out // p) * n_in + n_out // p,
                fwd, fwd * (2 if grad_in else 1), p,
                fwd=[("all_gather", rows * (n_out // p), e)] if gather and comm else [],
                bwd=[("all_reduce", rows * n_in, e if i else e_in)] if comm and grad_in else []))
        else:  # RowwiseParallel: rank holds n_in/p columns of W; bias replicated.
            fwd = rows * n_out * (n_in // p)
            layers.append(_layer("rowwise", n_in, n_out, 0, n_out * (n_in // p) + n_out, fwd, 2 * fwd, p,
                                 fwd=[("all_reduce", rows * n_out, e)] if comm else []))
    return StepCost.from_layers("tensor", sizes, p, rows, e, input_requires_grad, layers, e, e_in)


def _ratio(num, den) -> Optional[Fraction]:
    return Fraction(num) / Fraction(den) if den else None


@dataclass(frozen=True)
class LayerRatio:
    """PP/TP ratios of one layer; None where TP's figure is 0 (e.g. TP's first layer sends nothing)."""

    communication: Optional[Fraction]
    arithmetic: Optional[Fraction]
    params: Optional[Fraction]


@dataclass(frozen=True)
class Comparison:
    """Phantom against tensor parallelism for the same FFN, p, rows and element size.

    Ratios are PP/TP, exact, and None where TP's figure is 0 (e.g. p = 1 communication).
    ``per_layer[l]`` compares layer l; for a hidden layer with n_in = n_out = n it is
    the table of docs/operator.md §8: communication p·k/n, arithmetic 1/p + p·k/n.
    """

    phantom: StepCost
    tensor: StepCost

    @property
    def communication(self) -> Optional[Fraction]:
        return _ratio(self.phantom.sent_bytes, self.tensor.sent_bytes)

    @property
    def arithmetic(self) -> Optional[Fraction]:
        return _ratio(self.phantom.macs, self.tensor.macs)

    @property
    def params(self) -> Optional[Fraction]:
        return _ratio(self.phantom.params, self.tensor.params)

    @property
    def per_layer(self) -> tuple[LayerRatio, ...]:
        return tuple(
            LayerRatio(_ratio(pp.sent_bytes, tp.sent_bytes), _ratio(pp.macs, tp.macs),
                       _ratio(pp.params, tp.params))
            for pp, tp in zip(self.phantom.per_layer, self.tensor.per_layer)
        )

    def describe(self) -> str:
        """One line for logs."""
        pp, tp = self.phantom, self.tensor

        def ratio(r: Optional[Fraction]) -> str:
            return "n/a" if r is None else f"{float(r):.3g}x"

        ghosts = sorted({layer.ghosts for layer in pp.per_layer if layer.kind == "phantom"})
        return (
            f"p={pp.group_size} ghosts={','.join(map(str, ghosts)) or '-'} rows={pp.rows}: "
            f"params/rank PP {pp.params:,} vs TP {tp.params:,} ({ratio(self.params)}); "
            f"sent/rank/step PP {_human_bytes(pp.sent_bytes)} vs TP {_human_bytes(tp.sent_bytes)} "
            f"({ratio(self.communication)}); MACs/rank/step PP/TP {ratio(self.arithmetic)}"
        )


def _human_bytes(n: Fraction) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.4g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def compare(sizes: Sequence[int], p: int, ghosts: Union[int, Sequence[int]], rows: int, element_size: int = 4,
            *, input_requires_grad: bool = False, input_element_size: Optional[int] = None) -> Comparison:
    """PP/TP comparison of the same FFN; see ``Comparison``."""
    kw = {"input_requires_grad": input_requires_grad, "input_element_size": input_element_size}
    return Comparison(phantom_cost(sizes, p, ghosts, rows, element_size, **kw),
                      tp_cost(sizes, p, rows, element_size, **kw))


def summary(sizes: Sequence[int], p: int, ghosts: Union[int, Sequence[int]]) -> str:
    """One line for a log: parameters per rank, and PP/TP communication and arithmetic per input row."""
    try:
        return compare(sizes, p, ghosts, rows=1).describe() + " (per input row, fp32)"
    except ValueError as e:  # tensor parallelism cannot split it (e.g. d_out % p with an odd depth)
        pp = phantom_cost(sizes, p, ghosts, rows=1)
        return (f"params/rank {pp.params:,}, sent/rank/row {float(pp.sent_bytes):.4g} B "
                f"(no TP comparison: {e})")

