"""Re-sharding a checkpoint to smaller phantom groups, exactly (docs/operator.md §7).

``reshard_checkpoint`` turns a checkpoint of phantom groups of p ranks into one for p/m
ranks with ``merge_shards``: the model computes exactly the same function, so a job that
lost a node continues on the ranks it has left.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from lightning_phantom.nn.convert import merge_shards
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, sharded_parameters,
)
from lightning_phantom.strategy.checkpoints import META_FILE, parse_shard_key, read_meta, shard_key
from lightning_phantom.strategy.storage import SafeFileSystemReader, discard, publish, save_durably, staging_path

PathLike = Union[str, os.PathLike]


def reshard_checkpoint(src: PathLike, dst: PathLike, merge: int) -> dict[str, list[int]]:
    """Write ``dst``: the checkpoint ``src`` of phantom groups of p ranks, re-sharded for p/``merge``.

    Every ``PhantomFFN`` is merged exactly with ``merge_shards`` (rank r of the new group holds
    old ranks r·merge … r·merge+merge−1; its ghosts become merge·k), so right after loading
    the model computes the same outputs as when ``src`` was saved. Replicated tensors, the
    loop and scheduler state, the step and the epoch are kept: ``Trainer.fit(ckpt_path=dst)``
    with ``PhantomStrategy(phantom_parallel_size=p/merge, ghosts=<returned value>)`` continues
    the run. Optimizer state (momentum, Adam's moments) has no exact re-sharding — a merged
    block's history is not a function of its parts' — and is dropped: the optimizer restarts.

    Run it on one process (it uses no process group). Returns the ghosts per phantom layer
    of each FFN in ``dst``, by module name (to pass as ``ghosts=``; irrelevant when p/merge = 1).
    """

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, dst = Path(src), Path(dst)
    meta, info = read_meta(src)
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} exists; reshard_checkpoint writes a new checkpoint, choose another "
                              "path or remove it.")
    p = info["phantom_parallel"]
    if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1 or p % merge:
        raise ValueError(f"{str(src)!r} holds phantom groups of {p} ranks; merge must be a positive divisor of "
                         f"{p} (new group size p/merge), got merge={merge!r}.")

    stored = SafeFileSystemReader(src).read_metadata().state_dict_metadata
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in stored.items()
             if k.startswith("model::") and isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(src), no_dist=True)

    model = {k[len("model::"):]: v for k, v in state.items()}
    out, ghosts = _reshard_model(model, p, merge)
    new_p = p // merge
    info = {**info, "phantom_parallel": new_p, "optimizer_extra": [],
                       "model_extra": {k: v for k, v in info["model_extra"].items() if "|phantom" not in k},
                       "resharded": {"from_phantom_parallel": p, "merge": merge}}

    staging = staging_path(dst)
    discard(staging)
    staging.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({f"model::{k}": v for k, v in out.items()}, storage_writer=dcp.FileSystemWriter(staging),
                 no_dist=True)
    save_durably({**meta, "phantom": info}, staging / META_FILE)
    publish(staging, dst)
    return ghosts


def _reshard_model(model: dict[str, Tensor], p: int, merge: int) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """Model tensors by (shard-tagged) name → the same for groups of p/merge, and the new ghosts per FFN."""
    by_ffn: dict[str, dict[int, dict[str, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        tagged = parse_shard_key(key)
        if tagged is None:
            out[key] = value  # replicated: unchanged (the FFNs' output biases are picked up below)
            continue
        name, rank, size = tagged
        if size != p:
            raise ValueError(f"checkpoint key {key!r} is a shard of a group of {size}, but the checkpoint "
                             f"says its phantom groups have {p} ranks")
        prefix, layer, param = _split_name(name)
        by_ffn[prefix][rank][f"{layer}.{param}"] = value

    new_p, ghosts = p // merge, {}
    for prefix, per_rank in by_ffn.items():
        if sorted(per_rank) != list(range(p)):
            raise ValueError(f"{prefix}: the checkpoint holds the shards of ranks {sorted(per_rank)}, not of all "
                             f"{p}; it cannot be re-sharded.")
        shards = [_shard_from_state(prefix, rank, p, per_rank[rank], model) for rank in range(p)]
        merged = merge_shards(shards, merge)
        ghosts[prefix] = merged[0].ghosts
        for rank, shard in enumerate(merged):
            sharded = {id(t) for t in sharded_parameters(shard)}
            for name, param in shard.named_parameters():
                key = f"{prefix}.{name}"
                out[shard_key(key, rank, new_p) if id(param) in sharded else key] = param.detach().clone()
    return out, ghosts


def _split_name(name: str) -> tuple[str, int, str]:
    """``"encoder.ffn.2.compress"`` → (``"encoder.ffn"``, 2, ``"compress"``)."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        raise ValueError(f"checkpoint key {name!r} is sharded but not a layer of a PhantomFFN "
                         "(<ffn name>.<layer index>.<parameter>); reshard_checkpoint handles PhantomFFNs only.")
    return ".".join(parts[:-2]), int(parts[-2]), parts[-1]


def _shard_from_state(prefix: str, rank: int, p: int, tensors: dict[str, Tensor],
                      model: dict[str, Tensor]) -> PhantomFFN:
    """Rank ``rank``'s PhantomFFN, rebuilt from its tensors (activations, which hold none, as Identity)."""
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    first, last = layers[0], layers[-1]
    built: list[nn.Module] = []
    for idx in range(last + 1):
        if idx not in layers:
            built.append(nn.Identity())  # an element-wise layer: no parameters, nothing to merge
            continue
        weight, bias = tensors[f"{idx}.weight"], tensors.get(f"{idx}.bias")
        kw: dict[str, Any] = {"shard": (rank, p), "device": "meta", "dtype": weight.dtype}
        if f"{idx}.compress" in tensors:
            compress = tensors[f"{idx}.compress"]
            layer = PhantomLinear(weight.shape[1] * p, weight.shape[0] * p, compress.shape[0],
                                  bias=bias is not None, **kw)
            values = {"weight": weight, "bias": bias, "compress": compress,
                      "decompress": tensors[f"{idx}.decompress"]}
        elif idx == first:
            layer = ColumnParallelLinear(weight.shape[1], weight.shape[0] * p, bias=bias is not None, **kw)
            values = {"weight": weight, "bias": bias}
        elif idx == last:
            bias = model.get(f"{prefix}.{idx}.bias")  # replicated: stored once, untagged
            layer = RowParallelLinear(weight.shape[1] * p, weight.shape[0], bias=bias is not None, **kw)
            values = {"weight": weight, "bias": bias}
        else:
            raise ValueError(f"{prefix}.{idx} is a sharded layer that is neither the first, the last nor a phantom "
                             "layer (no compressor); reshard_checkpoint handles PhantomFFNs only.")
        layer = layer.to_empty(device="cpu")
        with torch.no_grad():
            for name, value in values.items():
                if value is not None:
                    getattr(layer, name).copy_(value)
        built.append(layer)
    if len([m for m in built if not isinstance(m, nn.Identity)]) < 3:
        raise ValueError(f"{prefix}: found {len(layers)} sharded layers; a PhantomFFN has at least 3.")
    return PhantomFFN.from_layers(built)

