"""Checkpoint directories on disk: replaced whole, found after a cut save, re-sharded to fewer ranks.

A ``PhantomStrategy`` checkpoint is a directory: DCP's ``.metadata`` and shard files, and
``meta.pt`` (loops, schedulers, the layout). Written in place, a crash half-way would leave
the new shards beside the old ``meta.pt`` — a checkpoint that loads and is wrong. So the
strategy writes into ``staging_path(path)`` (hidden, and not named ``*.ckpt``, so Lightning's
search for ``last.ckpt`` never picks it up) and ``publish``-es it once every rank is done:
one ``renameat2(RENAME_EXCHANGE)`` swaps old and new where Linux supports it; elsewhere the
old one is renamed to ``previous_path(path)`` first, and ``load_checkpoint`` falls back to it
if the crash came between the two renames.

``reshard_checkpoint`` turns a checkpoint of phantom groups of p ranks into one for p/m
ranks with ``merge_shards`` (docs/operator.md §7): the model computes exactly
the same function, so a job that lost a node continues on the ranks it has left.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import pickle
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.optim import Optimizer

from lightning_phantom.nn.convert import merge_shards
from lightning_phantom.nn.layers import (
    ColumnParallelLinear, PhantomFFN, PhantomLinear, RowParallelLinear, sharded_parameters,
)

PathLike = Union[str, os.PathLike]
_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME, as the strategy writes it
_SHARD_TAG = re.compile(r"^(?P<name>.+)\|phantom(?P<rank>\d+)/(?P<size>\d+)$")


# ------------------------------------------------------- strategy format
def split_tensors(state_dict: dict[str, Any], optimizer_states: list[dict[str, Any]]):
    """Flat DCP keys → tensors; what is not a tensor, for meta.pt (by the same names)."""
    tensors: dict[str, Tensor] = {}
    model_extra: dict[str, Any] = {}
    for key, value in state_dict.items():
        if isinstance(value, Tensor):
            tensors[f"model::{key}"] = value
        else:
            model_extra[key] = value
    optimizer_extra = []
    for i, state in enumerate(optimizer_states):
        extra: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
        for name, per_param in state["state"].items():
            for key, value in per_param.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer_{i}::{name}::{key}"] = value
                else:
                    extra["state"].setdefault(name, {})[key] = value
        optimizer_extra.append(extra)
    return tensors, model_extra, optimizer_extra


def other_shard(key: str, p: int) -> bool:
    return "|phantom" in key and key.endswith(f"/{p}")


def load_optimizer(optimizer: Optimizer, names: dict[int, tuple[str, str]], slots, extra: dict[str, Any],
                    path: Path) -> None:
    fresh = optimizer.state_dict()["param_groups"]
    saved = extra["param_groups"]
    if [g["params"] for g in saved] != [[names[i][0] for i in g["params"]] for g in fresh]:
        raise ValueError(f"The optimizer's parameter groups differ from those saved in {str(path)!r}; "
                         "configure_optimizers() must build the same groups to resume.")
    state = {}
    for i, (_, key) in names.items():
        entry = {**slots.get(key, {}), **extra["state"].get(key, {})}
        if entry:
            state[i] = entry
    groups = [{**s, "params": f["params"]} for s, f in zip(saved, fresh)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only DCP's own classes, dtypes, sizes and paths."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch.serialization", "_get_layout"), ("torch", "Size"), ("pathlib", "PosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     "PhantomStrategy checkpoint never contains; refusing to load it.")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader with the metadata file read by ``_MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        get_path = getattr(self, "_get_metadata_path", None)
        path = get_path(kwargs.get("rank")) if get_path else Path(self.path) / ".metadata"
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------ atomic replace
def staging_path(path: PathLike) -> Path:
    """Where the checkpoint for ``path`` is written before it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint at ``path`` waits while a new one replaces it without RENAME_EXCHANGE."""
    path = Path(path)
    return path.with_name(f".{path.name}.previous")


def discard(path: PathLike) -> None:
    """Remove a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def save_durably(obj: Any, path: PathLike) -> None:
    """``torch.save`` and fsync, so the file is on disk before the directory holding it is published."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def publish(staging: PathLike, path: PathLike) -> None:
    """Move the complete checkpoint ``staging`` to ``path``, replacing what is there.

    At every moment ``path`` or ``previous_path(path)`` holds a whole checkpoint.
    """
    staging, path = Path(staging), Path(path)
    if path.is_symlink() or path.is_file():  # a link from save_last="link", or a single-file checkpoint
        path.unlink()
    previous = previous_path(path)
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        discard(staging)  # now the old checkpoint
    else:
        discard(previous)
        os.rename(path, previous)
        os.rename(staging, path)
    discard(previous)  # also what a save cut between those two renames left
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False  # this kernel or filesystem cannot: fall back to two renames
    raise OSError(code, f"cannot replace {str(b)!r} with {str(a)!r}: {os.strerror(code)}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is what matters
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------- re-sharding
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
    if not (src / _META).is_file():
        raise ValueError(f"{str(src)!r} is not a PhantomStrategy checkpoint directory (no {_META}).")
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} exists; reshard_checkpoint writes a new checkpoint, choose another "
                              "path or remove it.")
    meta = torch.load(src / _META, map_location="cpu", weights_only=True)
    info = meta.get("phantom")
    if info is None:
        raise ValueError(f"{str(src)!r} was not written by PhantomStrategy (no 'phantom' entry in {_META}).")
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
    meta["phantom"] = {**info, "phantom_parallel": new_p, "optimizer_extra": [],
                       "model_extra": {k: v for k, v in info["model_extra"].items() if "|phantom" not in k},
                       "resharded": {"from_phantom_parallel": p, "merge": merge}}

    staging = staging_path(dst)
    discard(staging)
    staging.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({f"model::{k}": v for k, v in out.items()}, storage_writer=dcp.FileSystemWriter(staging),
                 no_dist=True)
    save_durably(meta, staging / _META)
    publish(staging, dst)
    return ghosts


def _reshard_model(model: dict[str, Tensor], p: int, merge: int) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """Model tensors by (shard-tagged) name → the same for groups of p/merge, and the new ghosts per FFN."""
    by_ffn: dict[str, dict[int, dict[str, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out: dict[str, Tensor] = {}
    for key, value in model.items():
        tagged = _SHARD_TAG.match(key)
        if tagged is None:
            out[key] = value  # replicated: unchanged (the FFNs' output biases are picked up below)
            continue
        if int(tagged["size"]) != p:
            raise ValueError(f"checkpoint key {key!r} is a shard of a group of {tagged['size']}, but the checkpoint "
                             f"says its phantom groups have {p} ranks")
        prefix, layer, param = _split_name(tagged["name"])
        by_ffn[prefix][int(tagged["rank"])][f"{layer}.{param}"] = value

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
                tag = f"|phantom{rank}/{new_p}" if id(param) in sharded else ""
                out[f"{prefix}.{name}{tag}"] = param.detach().clone()
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

