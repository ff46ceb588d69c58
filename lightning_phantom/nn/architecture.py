"""Records of phantom modules' structure, to rebuild an empty shard of one for any (rank, size).

A checkpoint holds each rank's tensors under state-dict keys; the keys alone cannot say which
layer is a norm, a dropout or a nested block, so re-sharding a checkpoint
(``lightning_phantom.reshard_checkpoint``) rebuilds the shards from a *record* saved beside
them. A record is plain data (dicts, lists, str, int, float, bool, None: what
``torch.load(weights_only=True)`` reads back, and JSON could hold), written once per
top-level phantom module, and independent of the rank and of the group size.

The protocol is a registry, one entry per kind of top-level phantom module:

* ``describe(module) -> dict``: the module's record (without ``"kind"``, which the registry adds);
* ``build(record, shard) -> module``: shard ``shard`` (a ``GroupInfo``: rank, size) of the module
  the record describes, **on the meta device**: the caller assigns its tensors
  (``load_state_dict(..., assign=True)``), whose dtype they keep.

The shard's state-dict keys must be those of the described module's. ``PhantomFFN`` is
registered here; another kind registers itself with ``register`` at the end of its own module
(``nn/transformer_architecture.py``: ``PhantomTransformerEncoder``), and ``lightning_phantom.nn``
imports that module, so that the registry is complete wherever the package is imported.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from lightning_phantom.nn.dropout import ShardedDropout
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, leaf_layers,
)
from lightning_phantom.nn.norms import PHANTOM_NORMS, PhantomNorm
from lightning_phantom.nn.shard import ShardSpec, _shard_info, _Sharded
from lightning_phantom.ops.comm import GroupInfo

Record = dict[str, Any]


@dataclass(frozen=True)
class Architecture:
    """How one kind of top-level phantom module is recorded and rebuilt (see the module docstring)."""

    kind: str
    module_type: type[nn.Module]
    describe: Callable[[nn.Module], Record]
    build: Callable[[Record, GroupInfo], nn.Module]


_REGISTRY: dict[str, Architecture] = {}


def register(kind: str, module_type: type[nn.Module], describe: Callable[[nn.Module], Record],
             build: Callable[[Record, GroupInfo], nn.Module]) -> None:
    """Make modules of ``module_type`` (and subclasses: FSDP's, say) recordable as ``kind``."""
    if kind in _REGISTRY and _REGISTRY[kind].module_type is not module_type:
        raise ValueError(f"phantom module kind {kind!r} is registered already, for "
                         f"{_REGISTRY[kind].module_type}")
    _REGISTRY[kind] = Architecture(kind, module_type, describe, build)


def kind_of(module: nn.Module):
    """The registered kind ``module`` is an instance of, or None."""
    return next((a.kind for a in _REGISTRY.values() if isinstance(module, a.module_type)), None)


def describe(module: nn.Module) -> Record:
    """The record of ``module``, a registered phantom module: ``{"kind": ..., **its description}``."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a registered phantom module kind "
                        f"({', '.join(sorted(_REGISTRY))})")
    record = {"kind": kind, **_REGISTRY[kind].describe(module)}
    _check_plain(record, kind)
    return record


def build(record: Record, shard: ShardSpec) -> nn.Module:
    """Shard ``shard`` ((rank, size) or a GroupInfo) of the module ``record`` describes, on meta."""
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind not in _REGISTRY:
        raise ValueError(f"a phantom module record must have a 'kind' among {sorted(_REGISTRY)}, got "
                         f"{kind!r}; was it written by a version of lightning-phantom that knows more kinds?")
    return _REGISTRY[kind].build(record, _shard_info(None, shard))


def describe_modules(root: nn.Module) -> dict[str, Record]:
    """Module name → record, for every registered phantom module in ``root`` not inside another one."""
    out: dict[str, Record] = {}
    for name, module in root.named_modules(remove_duplicate=False):  # a module under two names: both
        if kind_of(module) is not None and not any(name.startswith(f"{outer}.") for outer in out):
            out[name] = describe(module)
    return out


def record_ghosts(record: Any) -> list[int]:
    """The ghosts of every phantom layer ``record`` describes, in the module's order: its ``ghosts``, what
    ``PhantomStrategy(ghosts={name: ...})`` takes for it."""
    if isinstance(record, dict):
        own = [record["ghosts"]] if record.get("kind") == "phantom" else []
        return own + [k for value in record.values() for k in record_ghosts(value)]
    if isinstance(record, list):
        return [k for value in record for k in record_ghosts(value)]
    return []


def is_plain(value: Any) -> bool:
    """Whether ``value`` may stand in a record as it is (see ``_check_plain``)."""
    try:
        _check_plain(value, "")
    except TypeError:
        return False
    return True


def _check_plain(value: Any, where: str) -> None:
    """A record holds only what ``torch.load(weights_only=True)`` reads: no classes, dtypes or tensors."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: record keys must be str, got {k!r}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise TypeError(f"{where} is {type(value).__name__} ({value!r}); a record holds plain data only")


# --------------------------------------------------------------- PhantomFFN
_NORMS_BY_NAME = {cls.__name__: cls for cls in PHANTOM_NORMS.values()}


def layer_record(layer: nn.Module) -> Record:
    """One leaf of a PhantomFFN (or a linear or norm of a transformer stack); what holds no sharded
    tensor is a placeholder (its tensors, if any, are replicated and stored under their own keys:
    nothing to merge)."""
    if isinstance(layer, PhantomLinear):
        return {"kind": "phantom", "in_features": layer.in_features, "out_features": layer.out_features,
                "ghosts": layer.ghosts, "bias": layer.bias is not None, "overlap": layer.overlap}
    for kind, cls in (("column", ColumnParallelLinear), ("row", RowParallelLinear)):
        if isinstance(layer, cls):
            return {"kind": kind, "in_features": layer.in_features, "out_features": layer.out_features,
                    "bias": layer.bias is not None}
    if isinstance(layer, PhantomNorm):
        name = next(n for n, cls in _NORMS_BY_NAME.items() if isinstance(layer, cls))
        return {"kind": "norm", "norm": name, "features": layer.features, "config": layer.config()}
    if isinstance(layer, ShardedDropout):
        return {"kind": "dropout", "p": layer.p, "features": layer.features, "dim": layer.dim}
    if isinstance(layer, _Sharded):
        raise TypeError(f"{type(layer).__name__} is a sharded layer a PhantomFFN record cannot describe")
    return {"kind": "placeholder"}  # rebuilt as nn.Identity


def build_layer(entry: Record, info: GroupInfo) -> nn.Module:
    kind, meta = entry.get("kind"), {"device": "meta"}
    if kind == "phantom":
        return PhantomLinear(entry["in_features"], entry["out_features"], entry["ghosts"], bias=entry["bias"],
                             overlap=entry["overlap"], shard=info, **meta)
    if kind in ("column", "row"):
        cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
        return cls(entry["in_features"], entry["out_features"], bias=entry["bias"], shard=info, **meta)
    if kind == "norm" and entry.get("norm") in _NORMS_BY_NAME:
        return _NORMS_BY_NAME[entry["norm"]](entry["features"], **entry["config"], shard=info, **meta)
    if kind == "dropout":
        return ShardedDropout(entry["p"], entry["features"], dim=entry["dim"], shard=info)
    if kind == "placeholder":
        return nn.Identity()
    raise ValueError(f"unknown PhantomFFN layer record {entry!r}: expected a kind among column, phantom, "
                     f"row, norm ({', '.join(_NORMS_BY_NAME)}), dropout, placeholder")


def describe_ffn(ffn: nn.Module) -> Record:
    """Every leaf of ``ffn`` by its state-dict path (``"1.0"``, ``"block.fc"``: nested blocks flattened)."""
    return {"layers": [{"path": path, **layer_record(layer)} for path, layer in leaf_layers(ffn)]}


def build_ffn(record: Record, info: GroupInfo) -> PhantomFFN:
    """The PhantomFFN shard ``info`` of ``record``, its nested ``nn.Sequential`` blocks and names rebuilt."""
    tree: OrderedDict = OrderedDict()
    for entry in record["layers"]:
        *blocks, name = entry["path"].split(".")
        node = tree
        for block in blocks:
            node = node.setdefault(block, OrderedDict())
        node[name] = build_layer(entry, info)

    def sequential(node: OrderedDict, top: bool = False) -> nn.Sequential:
        children = OrderedDict((k, sequential(v) if isinstance(v, OrderedDict) else v)
                               for k, v in node.items())
        return PhantomFFN.from_layers(children) if top else nn.Sequential(children)

    return sequential(tree, top=True)


register("PhantomFFN", PhantomFFN, describe_ffn, build_ffn)
