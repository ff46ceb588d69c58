"""The ghosts setting, interpreted in one place: ``resolve_ghosts``.

A phantom layer's ghosts are how many values each rank compresses its neurons into (docs/operator.md §2).
Users say it as a count, a list with one per phantom layer, ``"auto"`` or ``"full"``; every
layer of the package — ``PhantomLinear``, ``PhantomFFN``, ``to_phantom``, the cost model, the
strategy's plans and the app's pre-spawn check — turns that into counts with ``resolve_ghosts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

AUTO_GHOSTS = 32  # p·32/n of what tensor parallelism sends: 1/16 at n = 4096, p = 8
GhostSpec = Union[Literal["auto", "full"], int, Sequence[int]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and all(
        _is_int(k) for k in value)


def check_spec(spec: Any, name: str = "") -> GhostSpec:
    """The form of one FFN's ghosts setting (a list made a tuple), before any FFN is known."""
    if isinstance(spec, str) and spec in ("auto", "full"):
        return spec  # type: ignore[return-value]
    if _is_int(spec) and spec >= 1:
        return spec
    if _is_int_list(spec) and min(spec) >= 1:
        return tuple(spec)
    raise _form_error(spec, name)


def _form_error(spec: Any, name: str) -> ValueError:
    where = f" for {name}" if name else ""
    return ValueError(f"ghosts must be 'auto', 'full', a positive int, or a list of positive ints (one per phantom "
                      f"layer); got {spec!r}{where}")


def resolve_ghosts(spec: Any, widths: Sequence[int], p: int, name: str = "the FFN") -> tuple[int, ...]:
    """Ghosts per phantom layer of ``name``, whose phantom layers take ``widths`` inputs, on groups of ``p``.

    ``"auto"``: min(AUTO_GHOSTS, n_in/p); ``"full"``: n_in/p, an exact conversion with no saving;
    an int: that many in every layer; a list: one per phantom layer. Form, length and bounds
    (1 <= ghosts <= n_in/p: a rank cannot compress its n_in/p neurons into more) are checked here.
    """
    if isinstance(spec, str) and spec in ("auto", "full"):
        return tuple((min(AUTO_GHOSTS, n // p) if spec == "auto" else n // p) for n in widths)
    if _is_int(spec):
        per_layer = (spec,) * len(widths)
    elif _is_int_list(spec):
        per_layer = tuple(spec)
    else:
        raise _form_error(spec, name)
    if len(per_layer) != len(widths):
        raise ValueError(f"ghosts has {len(per_layer)} entries but {name} has {len(widths)} phantom layers; give "
                         "one int for all, or one per phantom layer")
    for layer, (k, n) in enumerate(zip(per_layer, widths), start=1):
        if not 1 <= k <= n // p:
            # A rank holds n_in/p neurons: it cannot compress them into more ghosts than that.
            raise ValueError(
                f"ghosts={k} is too {'large' if k > 1 else 'small'} for {name}, phantom layer {layer}: a rank "
                f"holds n_in/p = {n}/{p} = {n // p} neurons, so 1 <= ghosts <= n_in/p = {n}/{p} = {n // p}, "
                f"got {k}. Use ghosts <= {n // p}, or ghosts='auto' (min({AUTO_GHOSTS}, n_in/p))."
            )
    return per_layer
