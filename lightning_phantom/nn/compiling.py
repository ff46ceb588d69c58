"""``torch.compile`` for sharded FFNs and transformer blocks: one request, resolved once, applied per module.

A phantom FFN's collectives are functional (``lightning_phantom.ops.comm``), so each
``PhantomFFN`` compiles as one graph, forward and backward, and so does each block of a phantom
transformer stack (``PhantomTransformerEncoderLayer``; the stack's entry and exit stay eager). It is compiled in place
(``nn.Module.compile``), as torchtitan compiles each block after parallelising it: the
module stays the same object with the same state-dict keys, so checkpoints, optimisers
and ``sharded_parameters`` see no difference. ``fullgraph=True`` is the default, so a
change that brings back a graph break fails loudly instead of slowing down quietly.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_phantom.nn.layers import PhantomFFN
from lightning_phantom.nn.transformer import PhantomTransformerEncoderLayer

#: What ``compile_ffns`` compiles in place, each as one graph.
COMPILED = (PhantomFFN, PhantomTransformerEncoderLayer)

CompileRequest = Union[bool, Mapping[str, Any], None]


def compile_options(request: CompileRequest) -> Optional[dict[str, Any]]:
    """``False``/``None`` → None (eager); ``True`` → the defaults; a mapping → ``torch.compile`` kwargs."""
    if request is None or request is False:
        return None
    if request is True:
        return {"fullgraph": True}
    if not isinstance(request, Mapping):
        raise TypeError(f"compile must be True, False or a dict of torch.compile arguments, got {request!r} "
                        f"({type(request).__name__})")
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise ValueError(f"compile got {unknown}, which torch.compile does not take; allowed: {sorted(allowed)}")
    return {"fullgraph": True, **request}


def compile_ffns(module: nn.Module, options: Optional[dict[str, Any]]) -> list[str]:
    """Compile every ``PhantomFFN`` and phantom transformer block inside ``module`` in place; return their names."""
    if options is None:
        return []
    names = [name for name, m in module.named_modules() if isinstance(m, COMPILED)]
    for name in names:
        module.get_submodule(name).compile(**options)
    return names
