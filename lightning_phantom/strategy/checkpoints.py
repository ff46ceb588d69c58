"""The ``PhantomStrategy`` checkpoint format: one module builds it, reads it and parses its keys.

A checkpoint is a directory written with ``torch.distributed.checkpoint`` (DCP). DCP takes a
plain tensor for a replicated one and keeps one copy per key, so a sharded tensor's key
carries its phantom rank and group size (``model::net.2.compress|phantom1/2``): shards never
collide, and the data-parallel replicas of a shard, identical under one key, are written
once. Optimizer state is keyed the same way (``optimizer_0::net.2.compress|phantom1/2::exp_avg``).
What is not a tensor goes to ``meta.pt`` (read with ``weights_only=True``) under
``"phantom"``, with the format version, the layout, the non-tensor entries, every rank's
torch RNG states (``rng``, restored on load) and a record of each phantom module's structure
(``nn.architecture``, for ``reshard_checkpoint``; on load, its ghosts are compared with the
model's, ``check_ghosts``). Writing goes through ``storage`` (staging directory, atomic publish).
"""

from __future__ import annotations

import contextlib
import re
import socket
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_phantom.nn.architecture import describe_modules, record_ghosts
from lightning_phantom.nn.layers import sharded_buffers, sharded_parameters
from lightning_phantom.strategy.agreement import agree
from lightning_phantom.strategy.storage import (
    SafeFileSystemReader, discard, previous_path, publish, save_durably, staging_path,
)

_SHARED_MARKER = ".written-by-rank-0"
META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
FORMAT_VERSION = 2  # 2: dropout holds no state (no `rng` buffers)
_SHARD_TAG = re.compile(r"^(?P<name>.+)\|phantom(?P<rank>\d+)/(?P<size>\d+)$")


class CheckpointingStrategy(Protocol):
    """What saving and loading use of ``PhantomStrategy``."""

    layout: Any  # PhantomLayout
    phantom_group: Any
    lightning_module: Any
    optimizers: list[Optimizer]
    is_global_zero: bool
    root_device: torch.device

    def shard_keys(self) -> dict[str, str]: ...


# ---------------------------------------------------------------- keys
def shard_key(name: str, rank: int, size: int) -> str:
    """The key of rank ``rank``'s shard of parameter ``name`` in a phantom group of ``size``."""
    return f"{name}|phantom{rank}/{size}"


def parse_shard_key(key: str) -> Optional[tuple[str, int, int]]:
    """``(name, rank, size)`` of a shard's key; None for a replicated tensor's."""
    tagged = _SHARD_TAG.match(key)
    return None if tagged is None else (tagged["name"], int(tagged["rank"]), int(tagged["size"]))


def shard_keys(module: nn.Module, rank: int, size: int) -> dict[str, str]:
    """State-dict name → shard key, for every sharded parameter and buffer (BatchNorm statistics)
    of ``module``."""
    sharded = {id(t) for t in [*sharded_parameters(module), *sharded_buffers(module)]}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: shard_key(name, rank, size) for name, t in named if id(t) in sharded}


def optimizer_param_names(module: nn.Module, optimizer: Optimizer, keys: dict[str, str]) -> dict[int, tuple[str, str]]:
    """Position in the optimizer → (parameter name, its checkpoint key)."""
    by_id = {id(p): (n, keys.get(n, n)) for n, p in module.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(id(p) not in by_id for p in params):
        raise ValueError("The optimizer holds parameters that are not in the LightningModule; "
                         "PhantomStrategy checkpoints name optimizer state by parameter name.")
    return {i: by_id[id(p)] for i, p in enumerate(params)}


def optimizer_state(module: nn.Module, optimizer: Optimizer, keys: dict[str, str]) -> dict[str, Any]:
    """The optimizer's state by checkpoint key; its groups list plain names, alike on every rank."""
    names = optimizer_param_names(module, optimizer, keys)
    state = optimizer.state_dict()
    return {"state": {names[i][1]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i][0] for i in g["params"]]} for g in state["param_groups"]]}


def _split_tensors(state_dict: dict[str, Any], optimizer_states: list[dict[str, Any]]):
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


# ---------------------------------------------------------------- saving
def save(strategy: CheckpointingStrategy, checkpoint: dict[str, Any], path: Path) -> None:
    """Write Lightning's ``checkpoint`` (state dicts already keyed by ``shard_keys``) to ``path``; collective.

    Each step a rank takes alone is agreed on by every rank before the next collective
    (``agreement.agree``): a failure on one rank (a full disk on rank 0, say) stops every rank
    with the same error at once, and the checkpoint already at ``path`` stays whole.
    """
    layout, device, zero = strategy.layout, strategy.root_device, strategy.is_global_zero
    # What reshard_checkpoint rebuilds each rank's shards from; on every rank, before any
    # collective, so that a module it cannot describe stops every rank alike.
    architecture = describe_modules(strategy.lightning_module)
    # Written beside its name and swapped in once every rank is done: a crash before that
    # leaves the checkpoint already at `path` (say last.ckpt) whole.
    staging = staging_path(path)
    agree(f"Removing what an interrupted save left at {str(staging)!r}", lambda: discard(staging), device, zero)
    confirm_shared_folder(staging, zero, device)
    tensors, model_extra, optimizer_extra = _split_tensors(checkpoint.pop("state_dict"),
                                                           checkpoint.pop("optimizer_states", []))
    if layout.phantom > 1:
        # Non-tensor entries of sharded parameters differ by phantom rank; rank 0 writes them all.
        extras: list = [None] * layout.phantom
        dist.all_gather_object(extras, (model_extra, optimizer_extra), group=strategy.phantom_group)
        for other_model, other_optimizers in extras:
            model_extra.update(other_model)
            for mine, other in zip(optimizer_extra, other_optimizers):
                mine["state"].update(other["state"])
    rng: list = [None] * dist.get_world_size()
    dist.all_gather_object(rng, rng_states())
    dcp.save(tensors, checkpoint_id=staging)  # DCP itself stops every rank when one fails to write
    if zero:
        checkpoint["phantom"] = {"format": FORMAT_VERSION, "data_parallel": layout.data,
                                 "phantom_parallel": layout.phantom, "model_extra": model_extra,
                                 "optimizer_extra": optimizer_extra, "rng": rng, "architecture": architecture}
    agree(f"Writing {str(staging / META_FILE)!r}", lambda: save_durably(checkpoint, staging / META_FILE), device, zero)
    agree(f"Publishing the checkpoint at {str(path)!r}", lambda: publish(staging, path), device, zero)


class UnsharedFolderError(RuntimeError):
    """Some ranks do not see the checkpoint folder rank 0 writes into (no shared filesystem)."""


def confirm_shared_folder(folder: Path, is_global_zero: bool, device: torch.device) -> None:
    """Every rank must see the folder rank 0 writes into, or the save stops on every rank; collective.

    Every rank writes its own shards into ``folder``: on node-local disks the other nodes'
    shards would land in folders of the same name that rank 0 never publishes, and the
    checkpoint could not be loaded. Rank 0 writes a marker with a fresh token and every rank
    reads it back: a cheap test of the one requirement, before anything is written.
    """
    marker = folder / _SHARED_MARKER

    def create() -> Optional[str]:
        folder.mkdir(parents=True, exist_ok=True)
        if is_global_zero:
            marker.write_text(fresh := uuid.uuid4().hex)
            return fresh
        return None

    token = [agree(f"Creating the checkpoint folder {str(folder)!r}", create, device)]
    dist.broadcast_object_list(token, src=0)  # after rank 0's write: the token says it is there
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (seen, socket.gethostname(), str(folder)))
    if is_global_zero:
        with contextlib.suppress(OSError):  # every rank has read it; left behind, it is one small file
            marker.unlink()
    _, host0, folder0 = every[0]
    blind = [f"rank {r} on {host}" + (f" (writing to {where!r})" if where != folder0 else "")
             for r, (ok, host, where) in enumerate(every) if not ok]
    if blind:
        raise UnsharedFolderError(
            f"The checkpoint folder {str(Path(folder0).parent)!r} is not the same folder on every rank: "
            f"{', '.join(blind)} of {len(every)} cannot see the file rank 0 ({host0}) just wrote into "
            f"{folder0!r}. Every rank writes its own shards into the checkpoint folder, so it must be on a "
            "filesystem shared by all nodes (NFS, Lustre, a mounted bucket) at the same path. Point "
            "ModelCheckpoint(dirpath=...) or Trainer(default_root_dir=...) at one; nothing was saved."
        )


# ---------------------------------------------------------------- loading
def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def read_meta(path: Path, weights_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta.pt`` of the checkpoint at ``path``: (Lightning's entries, the strategy's ``"phantom"`` entry)."""
    if not is_checkpoint(path):
        raise ValueError(f"{str(path)!r} is not a PhantomStrategy checkpoint: expected a directory with "
                         f"{META_FILE} and torch.distributed.checkpoint shards.")
    metadata = torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
    info = metadata.pop("phantom", None)
    if info is None:
        raise ValueError(f"{str(path)!r} was not written by PhantomStrategy (no 'phantom' entry in its "
                         f"{META_FILE}).")
    version = info.get("format")
    if version != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is in PhantomStrategy checkpoint format {version!r}; this version of "
                         f"lightning-phantom reads format {FORMAT_VERSION}. Load it with the version that wrote it "
                         "and export the model with lightning_phantom.to_dense.")
    return metadata, info


def load(strategy: CheckpointingStrategy, path: Path, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the strategy's module and optimizers, in place; collective.

    Returns Lightning's part of ``meta.pt`` (loops, schedulers, callbacks). What each rank
    reads and checks alone is agreed on before DCP's collective load, and what it loads after
    it before training goes on: a rank that cannot read the checkpoint stops every rank.
    """
    device = strategy.root_device
    plan = agree(f"Reading the checkpoint at {str(path)!r}",
                 lambda: _plan_load(strategy, path, True if weights_only is None else weights_only), device)
    path, metadata, info, targets, finish = plan
    dcp.load(targets, storage_reader=SafeFileSystemReader(path))  # DCP itself stops every rank when one fails
    agree(f"Loading the checkpoint at {str(path)!r}", finish, device)
    return metadata


def _plan_load(strategy: CheckpointingStrategy, path: Path, weights_only: bool):
    """This rank's part of ``load`` before DCP reads: (path, Lightning's meta, the strategy's, DCP's
    targets, what to do after DCP has read them)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    if not is_checkpoint(path) and is_checkpoint(previous_path(path)):
        # A save was cut between moving the old checkpoint aside and the new one in.
        rank_zero_info(f"{str(path)!r} is missing after an interrupted save; loading the previous version "
                       f"kept at {str(previous_path(path))!r}.")
        path = previous_path(path)
    elif path.stem.endswith(".previous"):  # ckpt_path="last" found what such a save left
        rank_zero_info(f"Resuming from {str(path)!r}, the version an interrupted save set aside.")
    metadata, info = read_meta(path, weights_only)
    layout = strategy.layout
    if info["phantom_parallel"] != layout.phantom:
        raise ValueError(
            f"{str(path)!r} holds the shards of phantom groups of {info['phantom_parallel']} ranks, but "
            f"this run has phantom({layout.phantom}). Resume with phantom_parallel_size="
            f"{info['phantom_parallel']}, or re-shard the checkpoint with lightning_phantom.reshard_checkpoint."
        )
    module = strategy.lightning_module
    check_ghosts(path, info.get("architecture"), module, layout.phantom)
    stored = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    keys = strategy.shard_keys()
    # The module's own tensors are the targets: DCP loads into them in place.
    own = {keys.get(k, k): t for k, t in module.state_dict().items() if isinstance(t, Tensor)}
    saved = {k[len("model::"):] for k in stored if k.startswith("model::")}
    missing = sorted(set(own) - saved)
    other_shards = {k for k in saved - set(own) if (parsed := parse_shard_key(k)) and parsed[2] == layout.phantom}
    unexpected = sorted(saved - set(own) - other_shards)
    if module.strict_loading and (missing or unexpected):
        raise RuntimeError(f"Error loading {str(path)!r} into {type(module).__name__}: missing keys "
                           f"{missing}, unexpected keys {unexpected}. Set `strict_loading = False` on "
                           "the module to load the rest.")
    targets = {f"model::{k}": t for k, t in own.items() if k in saved}
    plans = []
    for i, optimizer in enumerate(strategy.optimizers[:len(info["optimizer_extra"])]):
        names = optimizer_param_names(module, optimizer, keys)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        wanted = {key: params[i] for i, (_, key) in names.items()}
        slots: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for key, md in stored.items():
            kind, *rest = key.split("::")
            if kind == f"optimizer_{i}" and rest[0] in wanted:
                slots[rest[0]][rest[1]] = targets[key] = _slot(wanted[rest[0]], md)
        plans.append((optimizer, names, slots, info["optimizer_extra"][i]))

    def finish() -> None:
        if info["model_extra"]:
            plain = {v: k for k, v in keys.items()}
            full = {plain.get(k, k): v for k, v in {**own, **info["model_extra"]}.items()}
            module.load_state_dict(full, strict=module.strict_loading)
        for optimizer, names, slots, extra in plans:
            _load_optimizer(optimizer, names, slots, extra, path)
        restore_rng(info.get("rng"), dist.get_rank(), dist.get_world_size())

    return path, metadata, info, targets, finish


def check_ghosts(path: Path, saved: Optional[dict[str, dict]], module: nn.Module, p: int) -> None:
    """A ValueError if a phantom module the checkpoint records has other ghosts in ``module``: what to pass.

    Its compressors would have other shapes, and DCP would stop with "Size mismatch between saved [2, 4]
    and current [4, 4]", which does not say what to do (a checkpoint ``reshard_checkpoint`` wrote has
    merge·k ghosts). On groups of one there are no compressors: any ghosts load.
    """
    if not saved or p == 1:
        return
    here = {name: record_ghosts(record) for name, record in describe_modules(module).items()}
    wanted = {name: record_ghosts(record) for name, record in saved.items() if name in here}
    # Another number of phantom layers is another model: the key check names what differs.
    differ = [name for name, k in wanted.items() if k != here[name] and len(k) == len(here[name])]
    if differ:
        raise ValueError(
            f"{str(path)!r} was saved with other ghosts than this run builds: "
            + "; ".join(f"{n} has {wanted[n]} in the checkpoint and {here[n]} here" for n in differ)
            + " (one per phantom layer), so its compressors cannot be loaded. Resume with "
            f"PhantomStrategy(ghosts={wanted!r}) (what reshard_checkpoint returned for a re-sharded "
            "checkpoint), or with an explicit plan=, give these modules those 'ghosts'.")


def rng_states() -> dict[str, Tensor]:
    """This rank's torch RNG states: the CPU generator's, and the current CUDA device's where CUDA runs.

    Saved per rank in ``meta.pt`` (``"rng"``) and restored on load, so that what a resumed run
    draws from torch's global generator (dropout masks, kept in step across a phantom group)
    is what the uninterrupted run drew.
    """
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(saved: Optional[list], rank: int, world_size: int) -> None:
    """Rank ``rank``'s own saved states when the world size is the one saved, else rank 0's (the
    ranks of a phantom group draw alike); nothing for a checkpoint without them."""
    if not saved:
        return
    states = saved[rank] if len(saved) == world_size else saved[0]
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _slot(param: Tensor, md) -> Tensor:
    """Where DCP loads one optimizer-state tensor: laid out as its parameter when it has the
    parameter's shape (a DTensor under FSDP: DCP reads just this rank's part, whichever mode wrote it)."""
    if tuple(md.size) == tuple(param.shape):
        return torch.empty_like(param.detach(), dtype=md.properties.dtype)
    return torch.empty(md.size, dtype=md.properties.dtype)


def _load_optimizer(optimizer: Optimizer, names: dict[int, tuple[str, str]], slots: Mapping[str, dict],
                    extra: dict[str, Any], path: Path) -> None:
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
