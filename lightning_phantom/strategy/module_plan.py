"""An explicit plan: which modules to shard, by name pattern, each with its own settings.

In the spirit of ``torch.distributed.tensor.parallel.parallelize_module(module, mesh, plan)``::

    PhantomStrategy(plan={
        "encoder.*.ffn": {"ghosts": 16},
        "head": {"ghosts": "full", "init": "random"},
    })

A pattern is matched against the names of ``module.named_modules()`` with ``fnmatch`` (``*``
matches within and across dots, as in torch's plan keys). With a plan, exactly the matched
modules are sharded and nothing else is searched for. The settings are checked when the
strategy is built; the patterns when the strategy sees the model (setup, on every rank
alike, before any weight is touched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Optional, Union

from torch import nn

from lightning_phantom.nn.convert import ffn_linears
from lightning_phantom.nn.layers import PhantomFFN

SETTINGS = ("ghosts", "init", "overlap")


@dataclass(frozen=True)
class ModuleSettings:
    """What one plan entry asks for; ``None`` means the strategy's own argument."""

    ghosts: Any = None
    init: Optional[str] = None
    overlap: Optional[bool] = None


def check_plan(plan: Optional[Mapping[str, Any]], check_ghosts) -> Optional[dict[str, ModuleSettings]]:
    """The plan as {pattern: ModuleSettings}, or a ValueError saying what is wrong with it."""
    if plan is None:
        return None
    if not isinstance(plan, Mapping) or not plan:
        raise ValueError("plan must be a non-empty mapping from a module-name pattern (e.g. 'encoder.*.ffn') to "
                         f"its settings ({', '.join(SETTINGS)}), got {plan!r}")
    checked = {}
    for pattern, settings in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"plan keys are module-name patterns such as 'encoder.*.ffn', got {pattern!r}")
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping) or set(settings) - set(SETTINGS):
            raise ValueError(f"plan[{pattern!r}] must be a mapping with keys among {list(SETTINGS)}, got "
                             f"{settings!r}")
        ghosts = settings.get("ghosts")
        if ghosts is not None and isinstance(check_ghosts(ghosts), Mapping):
            raise ValueError(f"plan[{pattern!r}]['ghosts'] is for one FFN: 'auto', 'full', an int or a list "
                             f"per phantom layer, got a mapping {ghosts!r}")
        init = settings.get("init")
        if init not in (None, "svd", "random"):
            raise ValueError(f"plan[{pattern!r}]['init'] must be 'svd' or 'random', got {init!r}")
        overlap = settings.get("overlap")
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"plan[{pattern!r}]['overlap'] must be True or False, got {overlap!r}")
        checked[pattern] = ModuleSettings(ghosts, init, overlap)
    return checked


def match_plan(module: nn.Module, plan: Mapping[str, ModuleSettings]
               ) -> list[tuple[str, Union[nn.Sequential, PhantomFFN], ModuleSettings]]:
    """(name, module, settings) for every module the plan names, in module order.

    Every check comes first, so every rank fails alike and before any weight moves: a pattern
    that matches no module, a module matched by two patterns, and a matched module that is not
    an FFN (with what makes it one) are errors.
    """
    names = [name for name, _ in module.named_modules() if name]
    matched: dict[str, str] = {}
    for pattern in plan:
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
        if not isinstance(child, PhantomFFN):
            try:
                ffn_linears(child, name)
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan pattern {matched[name]!r} names {name!r}, which cannot be sharded: {e}") \
                    from None
        out.append((name, child, plan[matched[name]]))
    return out
