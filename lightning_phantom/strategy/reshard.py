"""Re-sharding a checkpoint to smaller phantom groups, exactly (docs/operator.md §7, §10.7).

``reshard_checkpoint`` turns a checkpoint of phantom groups of p ranks into one for p/m
ranks with ``merge_shards``: the model computes exactly the same function, so a job that
lost a node continues on the ranks it has left.

The state-dict keys cannot say which layer of a phantom module is a norm, a dropout or a
nested block, so each old rank's shard is rebuilt from the module's record in ``meta.pt``
(``lightning_phantom.nn.architecture``, written by every save), its tensors are assigned from
the checkpoint, and the merged shards are written with their own record.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from lightning_phantom.nn import architecture
from lightning_phantom.nn.convert import merge_shards
from lightning_phantom.strategy.checkpoints import META_FILE, parse_shard_key, read_meta, shard_keys
from lightning_phantom.strategy.storage import (
    SafeFileSystemReader, discard, publish, save_durably, staging_path,
)

PathLike = Union[str, os.PathLike]


def reshard_checkpoint(src: PathLike, dst: PathLike, merge: int) -> dict[str, Any]:
    """Write ``dst``: the checkpoint ``src`` of phantom groups of p ranks, re-sharded for p/``merge``.

    Every phantom module (a ``PhantomFFN``, with norms, dropout and nested blocks, or a
    ``PhantomTransformerEncoder``) is merged exactly with ``merge_shards`` (rank r of the new
    group holds old ranks r·merge … r·merge+merge−1; its ghosts become merge·k), so right after
    loading the model computes the
    same outputs as when ``src`` was saved. Replicated tensors, the loop and scheduler state, the
    step and the epoch are kept: ``Trainer.fit(ckpt_path=dst)`` with
    ``PhantomStrategy(phantom_parallel_size=p/merge, ghosts=<returned value>)`` continues the
    run. Optimizer state (momentum, Adam's moments) has no exact re-sharding — a merged block's
    history is not a function of its parts' — and is dropped: the optimizer restarts.

    Run it on one process (it uses no process group). Returns the ghosts of each phantom module
    in ``dst``, by module name, one per phantom layer (a stack's four per block): pass the mapping
    as ``ghosts=`` (irrelevant when p/merge = 1). Loading refuses other ghosts, saying these.
    """

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, dst = Path(src), Path(dst)
    meta, info = read_meta(src)
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} exists; reshard_checkpoint writes a new checkpoint, choose "
                              "another path or remove it.")
    p = info["phantom_parallel"]
    if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1 or p % merge:
        raise ValueError(f"{str(src)!r} holds phantom groups of {p} ranks; merge must be a positive divisor "
                         f"of {p} (new group size p/merge), got merge={merge!r}.")
    records = info.get("architecture")
    if records is None:
        raise ValueError(f"{str(src)!r} has no record of its phantom modules' structure (written by an "
                         "earlier version of lightning-phantom), so its shards cannot be rebuilt to merge "
                         f"them. Resume it on phantom groups of {p} and save it again, or export it with "
                         "lightning_phantom.to_dense.")

    stored = SafeFileSystemReader(src).read_metadata().state_dict_metadata
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in stored.items()
             if k.startswith("model::") and isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(src), no_dist=True)

    model = {k[len("model::"):]: v for k, v in state.items()}
    out, new_records, ghosts = reshard_tensors(model, records, p, merge)
    info = {**info, "phantom_parallel": p // merge, "optimizer_extra": [], "architecture": new_records,
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


def reshard_tensors(model: dict[str, Tensor], records: dict[str, dict], p: int, merge: int
                    ) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, Any]]:
    """Model tensors by checkpoint key (shards tagged ``|phantom<rank>/<p>``) → the same for groups of
    p/``merge``; also the new records and the ghosts of each module (see ``reshard_checkpoint``)."""
    for key in model:
        tagged = parse_shard_key(key)
        if tagged is not None and tagged[2] != p:
            raise ValueError(f"checkpoint key {key!r} is a shard of a group of {tagged[2]}, but the "
                             f"checkpoint says its phantom groups have {p} ranks")
    shards = {name: [_load_shard(name, record, rank, p, model) for rank in range(p)]
              for name, record in records.items()}
    consumed = {f"{name}.{key}" for name, per_rank in shards.items()
                for rank, shard in enumerate(per_rank) for key in shard_keys(shard, rank, p).values()}
    unknown = sorted(k for k in model if parse_shard_key(k) is not None and k not in consumed)
    if unknown:
        raise ValueError(f"checkpoint keys {_some(unknown)} are shards of a module that is not a recorded "
                         f"phantom module (recorded: {sorted(records)}); it cannot be re-sharded.")
    # Replicated tensors stay as they are (a merged module's own are rewritten with the same values).
    out = {k: v for k, v in model.items() if k not in consumed}
    new_records, ghosts = {}, {}
    for name, per_rank in shards.items():
        merged = merge_shards(per_rank, merge)
        for rank, shard in enumerate(merged):
            keys = shard_keys(shard, rank, p // merge)
            for key, value in shard.state_dict().items():
                out[f"{name}.{keys.get(key, key)}"] = value.detach().clone()
        new_records[name] = architecture.describe(merged[0])
        ghosts[name] = getattr(merged[0], "ghosts", None)
    return out, new_records, ghosts


def _load_shard(name: str, record: dict, rank: int, p: int, model: dict[str, Tensor]) -> nn.Module:
    """Old rank ``rank``'s shard of module ``name``, rebuilt from its record and the checkpoint's tensors."""
    shard = architecture.build(record, (rank, p))
    tagged = shard_keys(shard, rank, p)
    keys = {k: f"{name}.{tagged.get(k, k)}" for k in shard.state_dict()}
    missing = sorted(key for key in keys.values() if key not in model)
    if missing:
        raise ValueError(f"{name}: the checkpoint lacks {_some(missing)}, which its recorded structure "
                         f"({record['kind']}) has; it cannot be re-sharded.")
    shard.load_state_dict({k: model[key] for k, key in keys.items()}, assign=True)
    return shard


def _some(keys: list[str]) -> str:
    return f"{keys[:4]}{' …' if len(keys) > 4 else ''}"
