"""The data axis's cost: what ``PhantomStrategy(data_parallel=...)`` sends between replicas, and holds.

The model axis (a phantom or TP group) is ``cost.model``; this is the axis around it, in the same
ring convention, checked against counted bytes in tests/test_data_parallel.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from lightning_phantom._checks import positive_int
from lightning_phantom.cost.model import Collectives, ring_bytes


@dataclass(frozen=True)
class DataAxisCost:
    """One rank's data-axis traffic per optimizer step and its parameter + gradient + Adam bytes.

    ``params``: elements of this rank's phantom shard (what one replica of it holds whole).
    """

    mode: str
    sent_bytes: Fraction
    calls: Collectives
    state_bytes: Fraction


def data_axis_cost(params: int, data: int, mode: str = "ddp", element_size: int = 4,
                   optimizer_states: int = 2) -> DataAxisCost:
    """The data axis of ``PhantomStrategy(data_parallel=mode)`` over ``data`` replicas.

    ``"ddp"``: one all-reduce of every gradient, 2(d-1)/d·N·e sent; each rank holds N
    parameters, N gradients and ``optimizer_states``·N (Adam: 2). ``"fsdp"`` (FSDP2, re-sharding
    after forward): an all-gather of the parameters before forward and again before backward,
    (d-1)/d·N·e each, and a reduce-scatter of the gradients, (d-1)/d·N·e: 3(d-1)/d·N·e, 1.5× DDP's
    bytes; each rank holds 1/d of everything (plus one FFN's full parameters and gradients while
    it runs).
    """
    data, e = positive_int("data", data), positive_int("element_size", element_size)
    params = positive_int("params", params)
    whole = Fraction((2 + optimizer_states) * params * e)
    if mode == "ddp":
        calls = (("all_reduce", params),) if data > 1 else ()
        return DataAxisCost(mode, ring_bytes("all_reduce", data, params * e), calls, whole)
    if mode == "fsdp":
        calls = (("all_gather", params // data), ("all_gather", params // data),
                 ("reduce_scatter", params)) if data > 1 else ()
        return DataAxisCost(mode, Fraction(3 * (data - 1) * params * e, data), calls, whole / data)
    raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")
