"""What the user asked for, resolved once: frozen per-FFN sharding plans.

A ``PhantomPlan`` is the request — ``ghosts`` (a count, a list with one per phantom layer,
``"auto"``, ``"full"``, or a mapping from module name to one of those), ``init`` and
``overlap`` — checked for type when it is made, so a bad setting fails in the strategy's
constructor, before any process starts. ``plan_module`` finds the FFNs of a model and turns
the request into one ``FFNPlan`` per FFN, whose ghosts are plain counts checked for length
and bound. ``resolve_ghosts`` is the only function that interprets a ghosts setting; the
strategy, the app's pre-spawn check, the cost log line and the conversion read plans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from lightning_phantom.nn.convert import ffn_linears
from lightning_phantom.nn.ghosts import GhostSpec, check_spec, resolve_ghosts
from lightning_phantom.nn.layers import PhantomFFN

INITS = ("svd", "random")
GhostsRequest = Union[GhostSpec, Mapping[str, GhostSpec]]


@dataclass(frozen=True)
class FFNPlan:
    """How one FFN is sharded; made by ``PhantomPlan.for_ffn``, read by everyone downstream."""

    name: str  # module name in the model, e.g. "net" or "encoder.ffn"
    sizes: tuple[int, ...]  # [d_in, n_1, ..., n_{L-1}, d_out]
    phantom: int  # ranks in the phantom group
    ghosts: tuple[int, ...]  # per phantom layer
    init: str  # "svd" or "random"
    overlap: bool


@dataclass(frozen=True)
class PhantomPlan:
    """The sharding request of ``PhantomStrategy(ghosts=..., init=..., overlap=...)``, checked for type."""

    ghosts: GhostsRequest = "auto"
    init: str = "svd"
    overlap: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ghosts, Mapping):
            names = [k for k in self.ghosts if not isinstance(k, str)]
            if names:
                raise ValueError(f"a ghosts mapping is keyed by module name (e.g. 'net', 'encoder.ffn'); got keys "
                                 f"{names!r}")
            ghosts: Any = {k: check_spec(v, k) for k, v in self.ghosts.items()}
        else:
            ghosts = check_spec(self.ghosts)
        object.__setattr__(self, "ghosts", ghosts)
        if self.init not in INITS:
            raise ValueError(f"init must be 'svd' or 'random', got {self.init!r}")
        object.__setattr__(self, "overlap", bool(self.overlap))

    @property
    def per_module(self) -> bool:
        return isinstance(self.ghosts, Mapping)

    def for_ffn(self, name: str, sizes: Sequence[int], p: int) -> FFNPlan:
        """The plan of FFN ``name`` (``sizes`` = [d_in, n_1, ..., d_out]) on phantom groups of ``p``."""
        spec = self.ghosts.get(name, "auto") if isinstance(self.ghosts, Mapping) else self.ghosts
        sizes = tuple(sizes)
        ghosts = resolve_ghosts(spec, sizes[1:-2], p, name)  # phantom layers' inputs: n_1 … n_{L-2}
        return FFNPlan(name, sizes, p, ghosts, self.init, self.overlap)

    def check_names(self, names: Sequence[str]) -> None:
        """Every module a ghosts mapping names must be an FFN that is converted."""
        if isinstance(self.ghosts, Mapping):
            unknown = sorted(set(self.ghosts) - set(names))
            if unknown:
                raise ValueError(f"ghosts names {unknown}, which are not FFNs this strategy converts; those are "
                                 f"{sorted(names)}")


@dataclass
class ModulePlan:
    """What ``plan_module`` found in a model."""

    built: list[tuple[str, PhantomFFN]] = field(default_factory=list)  # the user's own PhantomFFNs
    convert: list[tuple[FFNPlan, nn.Sequential]] = field(default_factory=list)  # dense FFNs, with their plans
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, why) of Sequentials left dense


def plan_module(module: nn.Module, plan: PhantomPlan, p: int) -> ModulePlan:
    """Find the FFNs of ``module`` and plan each for phantom groups of ``p``; every check happens here.

    An FFN is an ``nn.Sequential`` of ``nn.Linear`` and element-wise layers with at least 3
    Linear layers whose hidden widths are divisible by ``p``. Raises if there is none (and no
    ``PhantomFFN`` either), or if a ghosts mapping names a module that is not one.
    """
    found = ModulePlan()
    dense: list[tuple[str, nn.Sequential]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = prefix + child_name
            if isinstance(child, PhantomFFN):
                found.built.append((name, child))
                continue
            if type(child) is nn.Sequential and any(type(m) is nn.Linear for m in child):
                reason = _ineligible(child, name, p)
                if reason is None:
                    dense.append((name, child))
                    continue
                found.rejected.append((name, reason))
            visit(child, name + ".")

    visit(module, "")
    if not found.built and not dense:
        why = "".join(f"\n  - {name}: {reason}" for name, reason in found.rejected)
        raise ValueError(
            f"PhantomStrategy found nothing to shard in {type(module).__name__}. It converts FFNs: an "
            "nn.Sequential of nn.Linear and element-wise layers (activations, dropout) with at least 3 "
            f"Linear layers and hidden widths divisible by phantom({p}). Candidates:"
            f"{why or ' none (no nn.Sequential holding an nn.Linear).'}\nBuild the FFN that way, build "
            "lightning_phantom.PhantomFFN(..., group=self.trainer.strategy.phantom_group) in "
            "configure_model(), or use another strategy (e.g. 'ddp') for a model without one."
        )
    plan.check_names([name for name, _ in dense])
    for name, seq in dense:
        linears = ffn_linears(seq, name)
        sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
        found.convert.append((plan.for_ffn(name, sizes, p), seq))
    return found


def _ineligible(seq: nn.Sequential, name: str, p: int) -> Optional[str]:
    try:
        linears = ffn_linears(seq, name)
    except (TypeError, ValueError) as e:
        return str(e)
    for i, lin in enumerate(linears[:-1]):
        if lin.out_features % p:
            return (f"hidden width {lin.out_features} (output of Linear {i}) is not divisible by "
                    f"phantom({p}) ({lin.out_features} % {p} = {lin.out_features % p})")
    return None
