"""What the user asked for, resolved once: frozen per-FFN sharding plans.

A ``PhantomPlan`` is the request — ``ghosts`` (a count, a list with one per phantom layer,
``"auto"``, ``"full"``, or a mapping from module name to one of those), ``init`` and
``overlap`` — checked for type when it is made, so a bad setting fails in the strategy's
constructor, before any process starts. ``plan_module`` finds the FFNs of a model and turns
the request into one ``FFNPlan`` per FFN, whose ghosts are plain counts checked for length
and bound. ``resolve_ghosts`` is the only function that interprets a ghosts setting; the
strategy, the app's pre-spawn check, the cost log line and the conversion read plans.

An explicit plan, in the spirit of ``torch.distributed.tensor.parallel.parallelize_module``,
names the modules to shard instead of finding them: ``modules={"encoder.*.ffn": {"ghosts":
16}, "head": {"init": "random"}}``. Patterns are matched against ``named_modules()`` names
with ``fnmatch``; each entry's settings (``ghosts``, ``init``, ``overlap``) override the
request's. A pattern that matches nothing, a module matched twice, and a matched module that
is not an FFN are errors, raised by ``plan_module`` on every rank alike.

Transformer stacks (a registered dense stack kind, ``nn/dense_blocks.py``: torch's
``nn.TransformerEncoder``) are found next to the FFNs, wherever they sit, and get one
``StackPlan`` each; an explicit plan may name them as it names FFNs. A stack that cannot be
converted is left dense, and its reason kept (``ModulePlan.rejected_stacks``) for the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Optional, Union

from torch import nn

from lightning_phantom.nn.convert import ffn_linears
from lightning_phantom.nn.convert_transformer import check_stack_divisible, read_stack, stack_ghost_widths
from lightning_phantom.nn.dense_blocks import DENSE_STACKS
from lightning_phantom.nn.ghosts import GhostSpec, check_spec, resolve_ghosts
from lightning_phantom.nn.layers import PhantomFFN
from lightning_phantom.nn.transformer import PhantomTransformerEncoder

INITS = ("svd", "random")
GhostsRequest = Union[GhostSpec, Mapping[str, GhostSpec]]
MODULE_SETTINGS = ("ghosts", "init", "overlap")


@dataclass(frozen=True)
class ModuleSettings:
    """One entry of an explicit plan; ``None`` leaves the request's own setting."""

    ghosts: Optional[GhostSpec] = None
    init: Optional[str] = None
    overlap: Optional[bool] = None


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
class StackPlan:
    """How one transformer stack is sharded; made by ``PhantomPlan.for_stack``, read downstream."""

    name: str
    d_model: int
    heads: int
    dim_feedforward: int
    layers: int
    phantom: int
    ghosts: tuple[int, ...]  # four per block: QKV, attention output, linear1, linear2
    init: str
    overlap: bool
    norm_first: bool
    final_norm: bool


@dataclass(frozen=True)
class PhantomPlan:
    """The sharding request of ``PhantomStrategy(ghosts=..., init=..., overlap=...)``, checked for type."""

    ghosts: GhostsRequest = "auto"
    init: str = "svd"
    overlap: bool = True
    #: Explicit plan: module-name pattern → ModuleSettings; None finds the FFNs itself.
    modules: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if self.modules is not None:
            if isinstance(self.ghosts, Mapping):
                raise ValueError("Give per-module ghosts either in ghosts={name: ...} or in the plan's "
                                 "{pattern: {'ghosts': ...}}, not both.")
            object.__setattr__(self, "modules", _check_modules(self.modules))
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

    def for_stack(self, name: str, stack: nn.Module, p: int) -> StackPlan:
        """The plan of dense stack ``name`` on phantom groups of ``p``; a ValueError says why it cannot be one."""
        spec = self.ghosts.get(name, "auto") if isinstance(self.ghosts, Mapping) else self.ghosts
        parts, blocks = read_stack(stack, name)
        check_stack_divisible(blocks, p, name)
        ghosts = resolve_ghosts(spec, stack_ghost_widths(blocks), p, name)
        first = blocks[0]
        return StackPlan(name, first.d_model, first.nhead, first.dim_feedforward, len(blocks), p, ghosts, self.init,
                         self.overlap, first.norm_first, parts.norm is not None)

    def check_names(self, names: Sequence[str]) -> None:
        """Every module a ghosts mapping names must be an FFN that is converted."""
        if isinstance(self.ghosts, Mapping):
            unknown = sorted(set(self.ghosts) - set(names))
            if unknown:
                raise ValueError(f"ghosts names {unknown}, which are not FFNs or stacks this strategy converts; those are "
                                 f"{sorted(names)}")


@dataclass
class ModulePlan:
    """What ``plan_module`` found in a model."""

    built: list[tuple[str, PhantomFFN]] = field(default_factory=list)  # the user's own PhantomFFNs
    convert: list[tuple[FFNPlan, nn.Sequential]] = field(default_factory=list)  # dense FFNs, with their plans
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, why) of Sequentials left dense
    built_stacks: list[tuple[str, PhantomTransformerEncoder]] = field(default_factory=list)
    stacks: list[tuple[StackPlan, nn.Module]] = field(default_factory=list)  # dense stacks, with their plans
    rejected_stacks: list[tuple[str, str]] = field(default_factory=list)  # (name, why) of stacks left dense


def plan_module(module: nn.Module, plan: PhantomPlan, p: int) -> ModulePlan:
    """Find the FFNs of ``module`` and plan each for phantom groups of ``p``; every check happens here.

    An FFN is an ``nn.Sequential`` or a subclass keeping its forward (of nested such blocks,
    possibly) of ``nn.Linear``, norm and element-wise layers with at least 3 Linear layers whose
    hidden widths are divisible by ``p``; with ``plan.modules``, exactly the modules it names.
    Raises if there is none (and no ``PhantomFFN`` either), or if a ghosts mapping names a module
    that is not one.
    """
    found = ModulePlan()
    dense: list[tuple[str, nn.Sequential]] = []
    if plan.modules is not None:
        return _plan_named(module, plan, p)

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = prefix + child_name
            if isinstance(child, PhantomFFN):
                found.built.append((name, child))
                continue
            if isinstance(child, PhantomTransformerEncoder):
                found.built_stacks.append((name, child))
                continue
            if type(child) in DENSE_STACKS:
                try:  # what the stack is: left dense if it cannot be split
                    check_stack_divisible(read_stack(child, name)[1], p, name)
                except (TypeError, ValueError) as e:
                    found.rejected_stacks.append((name, str(e)))
                else:  # what was asked of it: an error if it does not fit
                    found.stacks.append((plan.for_stack(name, child, p), child))
                continue
            # Subclasses too (torchvision's MLP); one with its own forward is refused by _ineligible.
            if isinstance(child, nn.Sequential) and any(type(m) is nn.Linear for m in child.modules()):
                reason = _ineligible(child, name, p)
                if reason is None:
                    dense.append((name, child))
                    continue
                found.rejected.append((name, reason))
            visit(child, name + ".")

    visit(module, "")
    if not found.built and not dense and not found.stacks and not found.built_stacks:
        why = "".join(f"\n  - {name}: {reason}" for name, reason in found.rejected + found.rejected_stacks)
        raise ValueError(
            f"PhantomStrategy found nothing to shard in {type(module).__name__}. It converts FFNs: an "
            "nn.Sequential, or a subclass keeping its forward such as torchvision's MLP (blocks may be "
            "nested), of nn.Linear, LayerNorm/RMSNorm/BatchNorm1d and "
            "element-wise layers (activations, dropout) with at least 3 "
            f"Linear layers and hidden widths divisible by phantom({p}); and transformer stacks "
            f"({', '.join(t.__name__ for t in DENSE_STACKS)}) whose heads and widths divide. Candidates:"
            f"{why or ' none (no nn.Sequential holding an nn.Linear).'}\nBuild the FFN that way, name the "
            "modules to shard with PhantomStrategy(plan={'encoder.*.ffn': {}}), build "
            "lightning_phantom.PhantomFFN(..., group=self.trainer.strategy.phantom_group) in "
            "configure_model(), or use another strategy (e.g. 'ddp') for a model without one."
        )
    plan.check_names([name for name, _ in dense] + [stack.name for stack, _ in found.stacks])
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


# ------------------------------------------------------------------ explicit plan
def _check_modules(modules: Any) -> dict[str, ModuleSettings]:
    """The explicit plan as {pattern: ModuleSettings}, or a ValueError saying what is wrong with it."""
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError("plan must be a non-empty mapping from a module-name pattern (e.g. 'encoder.*.ffn') to "
                         f"its settings ({', '.join(MODULE_SETTINGS)}), got {modules!r}")
    checked = {}
    for pattern, settings in modules.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"plan keys are module-name patterns such as 'encoder.*.ffn', got {pattern!r}")
        settings = {} if settings is None else settings
        if isinstance(settings, ModuleSettings):
            settings = {k: getattr(settings, k) for k in MODULE_SETTINGS if getattr(settings, k) is not None}
        if not isinstance(settings, Mapping) or set(settings) - set(MODULE_SETTINGS):
            raise ValueError(f"plan[{pattern!r}] must be a mapping with keys among {list(MODULE_SETTINGS)}, got "
                             f"{settings!r}")
        ghosts = settings.get("ghosts")
        init = settings.get("init")
        if init not in (None, *INITS):
            raise ValueError(f"plan[{pattern!r}]['init'] must be 'svd' or 'random', got {init!r}")
        overlap = settings.get("overlap")
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"plan[{pattern!r}]['overlap'] must be True or False, got {overlap!r}")
        checked[pattern] = ModuleSettings(None if ghosts is None else check_spec(ghosts, pattern), init, overlap)
    return checked


def match_modules(module: nn.Module, modules: Mapping[str, ModuleSettings]
                  ) -> list[tuple[str, nn.Module, ModuleSettings]]:
    """(name, module, settings) for every module the explicit plan names, in module order; all checks first."""
    names = [name for name, _ in module.named_modules() if name]
    matched: dict[str, str] = {}
    for pattern in modules:
        hits = [name for name in names if fnmatchcase(name, pattern)]
        if not hits:
            near = [n for n in names if n.rpartition(".")[2] == pattern.rpartition(".")[2]][:5]
            raise ValueError(
                f"plan pattern {pattern!r} matches no module of {type(module).__name__}"
                + (f"; modules with that last name: {near}" if near else "")
                + ". Patterns are matched against module.named_modules() names with fnmatch ('*' for any "
                "part), e.g. 'encoder.*.ffn'."
            )
        for name in hits:
            if name in matched:
                raise ValueError(f"module {name!r} is matched by plan patterns {matched[name]!r} and {pattern!r}; "
                                 "give each module one entry.")
            matched[name] = pattern
    out = []
    for name, child in module.named_modules():
        if name not in matched:
            continue
        if any(name.startswith(other + ".") for other in matched):
            raise ValueError(f"plan shards both {name!r} and a module that contains it; name one of them.")
        out.append((name, child, modules[matched[name]]))
    return out


def _plan_named(module: nn.Module, plan: PhantomPlan, p: int) -> ModulePlan:
    found = ModulePlan()
    for name, child, entry in match_modules(module, plan.modules):
        request = PhantomPlan(plan.ghosts if entry.ghosts is None else entry.ghosts, entry.init or plan.init,
                              plan.overlap if entry.overlap is None else entry.overlap)
        if isinstance(child, PhantomFFN):
            found.built.append((name, child))
            continue
        if isinstance(child, PhantomTransformerEncoder):
            found.built_stacks.append((name, child))
            continue
        if type(child) in DENSE_STACKS:
            try:
                found.stacks.append((request.for_stack(name, child, p), child))
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan pattern names {name!r}, which cannot be sharded: {e}") from None
            continue
        reason = _ineligible(child, name, p)
        if reason is not None:
            raise ValueError(f"plan pattern names {name!r}, which cannot be sharded: {reason}")
        linears = ffn_linears(child, name)
        sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
        found.convert.append((request.for_ffn(name, sizes, p), child))
    return found
