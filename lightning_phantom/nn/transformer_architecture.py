"""The record of a ``PhantomTransformerEncoder``, to rebuild an empty shard of it for any (rank, size).

Registered with ``nn/architecture.py``'s registry (see that module for the protocol), so that a
checkpoint of a model holding a phantom stack records it and ``reshard_checkpoint`` can rebuild
each old rank's shard, merge them (``merge_shards``, docs/operator.md §7 and §10.7) and record the
merged stack. The record is plain data, independent of the rank and the group size::

    {"layers": [block, ...], "norm": <norm layer> or None,
     "dense_type": "torch.nn.modules.transformer.TransformerEncoder", "dense_config": {...}}

and each block, under torch's submodule names::

    {"self_attn": {"in_proj": <phantom layer>, "out_proj": <phantom layer>, "num_heads": 4,
                   "dropout": 0.1, "batch_first": True, "causal": False},
     "linear1": <phantom layer>, "linear2": <phantom layer>, "norm1": <norm layer>, "norm2": <norm layer>,
     "norm_first": True, "activation": {"function": "gelu"}, "dropout": 0.1, "dropout1": 0.1,
     "dropout2": 0.1, "dense_type": "torch.nn.modules.transformer.TransformerEncoderLayer"}

A phantom layer's and a norm's entries are those of a ``PhantomFFN``'s (``architecture.layer_record``:
widths, ghosts, bias, overlap; the norm's class, width and eps). The dense classes ``to_dense``
builds back are named by ``dense_blocks.kind_name`` and must be registered where the record is
rebuilt. The activation is recorded when it is one of the element-wise functions or torch
modules a block accepts (with the module's constructor arguments); any other one (a subclass of
those) is recorded by name, and rebuilding such a record is an error that says so, as it is for
a registered stack kind whose settings are not plain data: saving never fails on either.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from lightning_phantom.nn.architecture import Record, build_layer, is_plain, layer_record, register
from lightning_phantom.nn.attention import PhantomSelfAttention
from lightning_phantom.nn.dense_blocks import DENSE_BLOCKS, DENSE_STACKS, kind_name, registered
from lightning_phantom.nn.layers import ELEMENTWISE
from lightning_phantom.nn.transformer import (
    ELEMENTWISE_FUNCTIONS, PhantomTransformerEncoder, PhantomTransformerEncoderLayer,
)
from lightning_phantom.ops.comm import GroupInfo

_FUNCTIONS = {f.__name__: f for f in ELEMENTWISE_FUNCTIONS}
_MODULES = {cls.__name__: cls for cls in ELEMENTWISE}


def activation_record(activation: Any) -> Record:
    """``{"function": name}``, ``{"module": class name, "config": constructor arguments}``, or
    ``{"unrecorded": what it is}`` for an activation that cannot be rebuilt from plain data."""
    if isinstance(activation, nn.Module):
        cls = type(activation)
        if _MODULES.get(cls.__name__) is cls:
            arguments = [name for name, p in inspect.signature(cls).parameters.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and hasattr(activation, name)]
            config = {name: getattr(activation, name) for name in arguments}
            if is_plain(config):
                return {"module": cls.__name__, "config": config}
        return {"unrecorded": f"{cls.__module__}.{cls.__qualname__}"}
    name = getattr(activation, "__name__", None)
    if _FUNCTIONS.get(name) is activation:
        return {"function": name}
    return {"unrecorded": repr(activation)}


def build_activation(entry: Record, where: str) -> Callable:
    """The activation ``entry`` records (a module on the meta device), or a ValueError naming ``where``."""
    if entry.get("function") in _FUNCTIONS:
        return _FUNCTIONS[entry["function"]]
    if entry.get("module") in _MODULES:
        return _MODULES[entry["module"]](**entry["config"]).to(device="meta")
    raise ValueError(
        f"{where} is {entry.get('unrecorded', entry)!r}, which a checkpoint record cannot rebuild: records "
        f"hold torch's element-wise modules ({', '.join(_MODULES)}) and functions ({', '.join(_FUNCTIONS)}) "
        "only. To re-shard this stack, merge it in memory with lightning_phantom.merge_shards, or use one of "
        "those.")


def describe_block(layer: PhantomTransformerEncoderLayer) -> Record:
    attn = layer.self_attn
    return {
        "self_attn": {"in_proj": layer_record(attn.in_proj), "out_proj": layer_record(attn.out_proj),
                      "num_heads": attn.num_heads, "dropout": attn.dropout.p, "batch_first": attn.batch_first,
                      "causal": attn.causal},
        "linear1": layer_record(layer.linear1), "linear2": layer_record(layer.linear2),
        "norm1": layer_record(layer.norm1), "norm2": layer_record(layer.norm2),
        "norm_first": layer.norm_first,
        "activation": activation_record(layer.activation), "dropout": layer.dropout.p,
        "dropout1": layer.dropout1.p, "dropout2": layer.dropout2.p, "dense_type": kind_name(layer.dense_type),
    }


def build_block(entry: Record, info: GroupInfo, where: str) -> PhantomTransformerEncoderLayer:
    attn = entry["self_attn"]
    attention = PhantomSelfAttention.from_parts(
        build_layer(attn["in_proj"], info), build_layer(attn["out_proj"], info), attn["num_heads"], attn["dropout"],
        attn["batch_first"], attn["causal"])
    layer = PhantomTransformerEncoderLayer.from_parts(
        attention, build_layer(entry["linear1"], info), build_layer(entry["linear2"], info),
        build_layer(entry["norm1"], info), build_layer(entry["norm2"], info),
        build_activation(entry["activation"], f"{where}'s activation"), norm_first=entry["norm_first"],
        dropout=entry["dropout"], dropout1=entry["dropout1"], dropout2=entry["dropout2"])
    layer.dense_type = registered(entry["dense_type"], DENSE_BLOCKS)
    return layer


def describe_stack(stack: PhantomTransformerEncoder) -> Record:
    """Every block of ``stack``, its final norm, and the dense classes and settings ``to_dense`` builds.

    Settings of a registered stack kind that are not plain data are recorded as None (and rebuilding
    the record is an error): a checkpoint is saved whatever they are.
    """
    config = dict(stack.dense_config)
    return {"layers": [describe_block(layer) for layer in stack.layers],
            "norm": None if stack.norm is None else layer_record(stack.norm),
            "dense_type": kind_name(stack.dense_type), "dense_config": config if is_plain(config) else None}


def build_stack(record: Record, info: GroupInfo) -> PhantomTransformerEncoder:
    """The ``PhantomTransformerEncoder`` shard ``info`` of ``record``, on the meta device."""
    layers = [build_block(entry, info, f"layers.{i}") for i, entry in enumerate(record["layers"])]
    norm = None if record["norm"] is None else build_layer(record["norm"], info)
    dense_type = registered(record["dense_type"], DENSE_STACKS)
    if record["dense_config"] is None:
        raise ValueError(f"the settings of this {record['dense_type']} (its StackParts.config) are not plain data, "
                         "so a checkpoint record cannot rebuild it. Make that kind's reader return plain data (str, "
                         "int, float, bool, None, lists and dicts of them), or merge the stack in memory with "
                         "lightning_phantom.merge_shards.")
    return PhantomTransformerEncoder.from_layers(layers, norm, dense_type=dense_type,
                                                 dense_config=dict(record["dense_config"]))


register("PhantomTransformerEncoder", PhantomTransformerEncoder, describe_stack, build_stack)
