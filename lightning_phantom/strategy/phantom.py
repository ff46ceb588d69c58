"""``PhantomStrategy``: phantom parallelism for a Lightning ``Trainer`` (``strategy="phantom"``).

The ranks form a 2-D mesh ("data_parallel", "phantom_parallel") (``lightning_phantom.strategy.layout``).
Each phantom group holds one copy of the model, every FFN split over its ranks, and sees one
batch; the groups are data-parallel replicas of each other.

* Sharding: after ``LightningModule.configure_model`` every eligible FFN — an ``nn.Sequential``
  of ``nn.Linear`` and element-wise layers with >= 3 Linear layers and hidden widths divisible
  by the phantom size — is replaced in place by this rank's ``PhantomFFN``. A dense FFN on the
  meta device is built straight into shards (``init="random"``) and materialised on the
  device, so its dense matrices never exist. ``PhantomFFN``s the user built are kept.
* Gradients: averaged over the data-parallel group only, once per optimizer step, after the
  last backward of an accumulation window and before clipping and the step.
* Clipping by norm: the norm of the whole phantom model, sharded parameters' squares summed
  over the phantom group and replicated ones counted once.
* Checkpoints: a directory written with ``torch.distributed.checkpoint`` (DCP). DCP takes a
  plain tensor for a replicated one and keeps one copy per key, so a sharded tensor's key
  carries its phantom rank (``model::net.2.compress|phantom1/2``): shards never collide, and
  the data-parallel replicas of a shard, identical under one key, are written once. What is
  not a tensor goes to ``meta.pt``, read with ``weights_only=True``; DCP's own ``.metadata``
  is read with an unpickler that admits only DCP's classes. A checkpoint is written into a
  hidden sibling directory and swapped in whole once complete (``checkpoints.publish``), so a
  crash while saving leaves the previous one loadable.
* Failures: ``NonFiniteGuard`` (on unless ``detect_non_finite=False``) stops every rank at a NaN/Inf
  loss or gradient before the step; a dead or hung peer ends the job after ``timeout`` with a
  message saying so (``on_exception``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized, _get_default_process_group_backend_for_device, _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.init import _materialize_meta_tensors
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lightning_phantom.strategy.checkpoints import (
    SafeFileSystemReader, discard, load_optimizer, other_shard, previous_path, publish, save_durably, split_tensors,
    staging_path,
)
from lightning_phantom.nn.convert import ffn_linears, to_phantom
from lightning_phantom.cost.model import compare, phantom_cost
from lightning_phantom.strategy.guards import NonFiniteGuard, is_peer_failure
from lightning_phantom.nn.layers import PhantomFFN, set_group, sharded_buffers, sharded_parameters
from lightning_phantom.strategy.metrics import sync_metrics_over
from lightning_phantom.strategy.module_plan import ModuleSettings, check_plan, match_plan
from lightning_phantom.strategy.layout import PhantomLayout, Size, check_size

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_log = logging.getLogger(__name__)
Ghosts = Union[Literal["auto", "full"], int, Sequence[int], Mapping[str, Any]]
AUTO_GHOSTS = 32
_BUCKET_NUMEL = 1 << 25  # elements per flat buffer when coalescing collectives (128 MiB in fp32)


class PhantomStrategy(ParallelStrategy):
    """Phantom parallelism (PHANTOM.md) for every FFN of a ``LightningModule``, data-parallel around it.

    Arguments:
        ghosts: ghosts per rank of each phantom layer. ``"auto"`` (default): ``min(32, n_in/p)``
            per layer; 32 ghosts make a layer of width n send p·32/n of what tensor parallelism
            sends (1/16 at n = 4096, p = 8) and keep a rank-32 view of every other rank.
            ``"full"``: n_in/p, an exact conversion with no saving (for checking). An int, or a
            list with one per phantom layer, for every FFN; or a mapping from module name
            (``"net"``, ``"encoder.ffn"``) to any of those, other FFNs getting ``"auto"``.
        phantom_parallel_size: ranks per phantom group; ``"auto"``: all ranks (or world / data).
        data_parallel_size: number of phantom groups (replicas); ``"auto"``: world / phantom.
        init: how a dense FFN becomes shards: ``"svd"`` (the closest phantom model, default) or
            ``"random"`` (the architecture only). FFNs on the meta device always get ``"random"``.
        overlap: overlap the ghost all-gather with the local block's matmul.
        timeout: process-group timeout (a ``timedelta`` or seconds): of the default group when the
            strategy creates it, and always of the data-parallel and phantom groups, so a dead
            peer ends the job instead of hanging it. A peer that hangs (rather than dies) is noticed
            after up to twice this: Lightning's per-step SIGTERM broadcast swallows the first timeout.
        detect_non_finite: add a ``NonFiniteGuard`` when fitting (unless one is in the callbacks):
            every rank stops with a ``NonFiniteError`` naming the step, ranks and tensors as soon as a
            loss or gradient is NaN/Inf, before the optimizer step and any later checkpoint.
        process_group_backend: ``"nccl"``, ``"gloo"``, …; by default the device's.
        plan: shard exactly the modules named, by pattern, with their own settings instead of
            finding FFNs: ``{"encoder.*.ffn": {"ghosts": 16, "init": "random"}}`` (keys ``ghosts``,
            ``init``, ``overlap``; the arguments above for what an entry leaves out). A pattern
            that matches no module is an error at setup (lightning_phantom.strategy.module_plan).
    """

    strategy_name = "phantom"

    def __init__(
        self,
        ghosts: Ghosts = "auto",
        phantom_parallel_size: Size = "auto",
        data_parallel_size: Size = "auto",
        init: str = "svd",
        overlap: bool = True,
        timeout: Optional[Union[timedelta, float]] = default_pg_timeout,
        detect_non_finite: bool = True,
        process_group_backend: Optional[str] = None,
        plan: Optional[Mapping[str, Mapping[str, Any]]] = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment=None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        self._phantom_parallel_size = check_size("phantom_parallel_size", phantom_parallel_size)
        self._data_parallel_size = check_size("data_parallel_size", data_parallel_size)
        self._ghosts = _check_ghosts(ghosts)
        self._plan = check_plan(plan, _check_ghosts)
        if self._plan is not None and isinstance(self._ghosts, Mapping):
            raise ValueError("Give per-module ghosts either in ghosts={name: ...} or in plan={pattern: {'ghosts': "
                             "...}}, not both.")
        if init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        self._init, self._overlap = init, bool(overlap)
        self._timeout = _check_timeout(timeout)
        self._detect_non_finite = bool(detect_non_finite)
        if process_group_backend is not None and not isinstance(process_group_backend, str):
            raise ValueError(f"process_group_backend must be a name such as 'nccl' or 'gloo', got "
                             f"{process_group_backend!r}")
        self._process_group_backend = process_group_backend
        self._layout: Optional[PhantomLayout] = None
        self._device_mesh: Optional[DeviceMesh] = None
        self.num_nodes = 1
        #: Name of every PhantomFFN in the module → a one-line summary with its cost (also logged).
        self.converted_modules: dict[str, str] = {}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, precision_plugin=precision_plugin)

    # ----------------------------------------------------------------- layout
    @property
    def layout(self) -> PhantomLayout:
        if self._layout is None:
            raise RuntimeError("The phantom layout is known once a Trainer has been created with this "
                               "strategy.")
        return self._layout

    @property
    def device_mesh(self) -> "DeviceMesh":
        if self._device_mesh is None:
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed; "
                               "use it from LightningModule.configure_model() or later.")
        return self._device_mesh

    @property
    def phantom_group(self) -> dist.ProcessGroup:
        """The ranks sharing one copy of the model: pass it to ``PhantomFFN(..., group=...)``."""
        return self.device_mesh["phantom_parallel"].get_group()

    @property
    def data_parallel_group(self) -> dist.ProcessGroup:
        """The replicas of this rank's shard: gradients and logged values are averaged over it."""
        return self.device_mesh["data_parallel"].get_group()

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:  # Lightning adds a DistributedSampler when True
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        data_mesh = self.device_mesh["data_parallel"]
        return {"num_replicas": data_mesh.size(), "rank": data_mesh.get_local_rank()}

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    # -------------------------------------------------------------- precision
    @property
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is None:
            self.precision_plugin = Precision()
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        if plugin is not None:
            _check_precision(plugin)
            if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
                plugin.scaler = _synced_scaler(plugin.scaler, plugin.device)
            # gradient_clip_algorithm="norm" ends in Precision.clip_grad_by_norm (after unscaling);
            # this instance attribute makes it clip by the norm of the whole phantom model.
            plugin.clip_grad_by_norm = self._clip_grad_by_norm
        self._precision_plugin = plugin

    # ---------------------------------------------------------------- launch
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # No process is started yet, but their number is known: check the layout now.
        self._layout = PhantomLayout.resolve(self._data_parallel_size, self._phantom_parallel_size,
                                             self.num_nodes * self.num_processes)
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes,
                                                       self.num_nodes)

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = (self._process_group_backend
                                       or _get_default_process_group_backend_for_device(self.root_device))
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout,
                              device_id=device_id)
        self._layout = PhantomLayout.resolve(self._data_parallel_size, self._phantom_parallel_size,
                                             self.world_size)
        self._device_mesh = self._layout.build_mesh(self.root_device.type, self._timeout)
        # Users reach the mesh in LightningModule.configure_model() as self.device_mesh.
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        # Before sharding, so that an SVD conversion sees the weights in the precision they train in.
        self.model = self.precision_plugin.convert_module(self.model)
        self._shard(self.lightning_module)
        self.model_to_device()
        self._sync_replicas(self.lightning_module)
        sync_metrics_over(self.lightning_module, self.data_parallel_group)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
            if self._detect_non_finite and not any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
                trainer.callbacks.append(NonFiniteGuard())
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None):
        # Meta tensors are built into shards and materialised in setup().
        meta = torch.device("meta") if empty_init else nullcontext()
        with meta, self.precision_plugin.tensor_init_context():
            yield

    def _shard(self, module: nn.Module) -> None:
        """Replace every eligible FFN by this rank's PhantomFFN; all checks first, so all ranks fail alike."""
        p = self.layout.phantom
        settings: dict[str, ModuleSettings] = {}
        if self._plan is not None:  # exactly the modules the user named
            matched = match_plan(module, self._plan)
            settings = {name: entry for name, _, entry in matched}
            built = [(name, m) for name, m, _ in matched if isinstance(m, PhantomFFN)]
            convert = [(name, m) for name, m, _ in matched if not isinstance(m, PhantomFFN)]
            for name, seq in convert:
                reason = _ineligible(seq, name, p)
                if reason:
                    raise ValueError(f"plan names {name!r}, which cannot be sharded: {reason}")
            rejected = []
        else:
            built, convert, rejected = _find_ffns(module, p)
        for name, ffn in built:
            if ffn.shard.size != p:
                raise ValueError(
                    f"{name} is a PhantomFFN split over {ffn.shard.size} ranks, but this run's phantom "
                    f"groups have {p} ({self.layout}). Build it with "
                    "group=self.trainer.strategy.phantom_group in configure_model(), or re-shard it with "
                    "lightning_phantom.merge_shards."
                )
        if not built and not convert:
            why = "".join(f"\n  - {name}: {reason}" for name, reason in rejected)
            raise ValueError(
                f"PhantomStrategy found nothing to shard in {type(module).__name__}. It converts FFNs: an "
                "nn.Sequential (blocks may be nested nn.Sequentials) of nn.Linear, LayerNorm/RMSNorm/BatchNorm1d "
                "and element-wise layers (activations, dropout) with at least 3 "
                f"Linear layers and hidden widths divisible by phantom({p}). Candidates:"
                f"{why or ' none (no nn.Sequential holding an nn.Linear).'}\nBuild the FFN that way, build "
                "lightning_phantom.PhantomFFN(..., group=self.trainer.strategy.phantom_group) in "
                "configure_model(), or use another strategy (e.g. 'ddp') for a model without one."
            )
        per_module = isinstance(self._ghosts, Mapping)
        unknown = sorted(set(self._ghosts) - {name for name, _ in convert}) if per_module else []
        if unknown:
            raise ValueError(f"ghosts names {unknown}, which are not FFNs this strategy converts; those are "
                             f"{[name for name, _ in convert]}")
        plans = []
        for name, seq in convert:
            spec = self._ghosts.get(name, "auto") if per_module else self._ghosts
            if name in settings and settings[name].ghosts is not None:
                spec = settings[name].ghosts
            plans.append((name, seq, _ghosts_for(name, seq, spec, p)))

        for name, ffn in built:  # the user's own, or converted by an earlier fit/validate/...
            set_group(ffn, self.phantom_group)
            if name not in self.converted_modules:
                self.converted_modules[name] = (f"user-built PhantomFFN {ffn.sizes}; "
                                                + _describe(ffn.sizes, p, ffn.ghosts))
        done: dict[int, PhantomFFN] = {}  # one Sequential reached by two names stays one module
        for name, seq, ghosts in plans:
            linears = ffn_linears(seq)
            sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
            if id(seq) in done:
                ffn, how = done[id(seq)], "shared"
            else:
                entry = settings.get(name, ModuleSettings())
                init = entry.init or self._init
                overlap = self._overlap if entry.overlap is None else entry.overlap
                if any(t.is_meta for t in seq.parameters()):
                    how = "random, from meta"
                    ffn = to_phantom(seq, ghosts, self.phantom_group, "random", overlap)
                else:
                    seq.to(self.root_device)
                    # The SVD shards of one model must come from one set of dense weights: rank 0's.
                    _broadcast(list(seq.parameters()), None, 0)
                    how = init
                    ffn = to_phantom(seq, ghosts, self.phantom_group, init, overlap)
            done[id(seq)] = ffn
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, ffn)
            self.converted_modules[name] = f"{sizes} -> PhantomFFN ({how}); " + _describe(sizes, p, ghosts)
            rank_zero_info(f"PhantomStrategy {self.layout}: {name}: {self.converted_modules[name]}")
        _materialize_meta_tensors(module, self.root_device)

    def _sync_replicas(self, module: nn.Module) -> None:
        """Replicated tensors equal on every rank, each shard equal on its replicas (as DDP does at wrap)."""
        sharded = {id(t) for t in [*sharded_parameters(module), *sharded_buffers(module)]}
        tensors = [*module.parameters(), *module.buffers()]
        _broadcast([t for t in tensors if id(t) not in sharded], None, 0)
        if self.layout.data > 1:
            data = self.data_parallel_group
            _broadcast([t for t in tensors if id(t) in sharded], data, dist.get_global_rank(data, 0))

    # -------------------------------------------------------------- training
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer

        def closure_then_average() -> Any:
            # After the last backward of the accumulation window; on_before_optimizer_step,
            # unscaling, clipping and the step all see the data-parallel mean.
            result = closure()
            self._average_gradients(raw)
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    def _average_gradients(self, optimizer: Optimizer) -> None:
        if self.layout.data == 1:
            return
        group, replicas = self.data_parallel_group, self.layout.data
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        # A parameter with a gradient on some replicas only counts as 0 on the others.
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                               device=self.root_device)
        dist.all_reduce(present, group=group)
        with torch.no_grad():
            grads = []
            for p, anywhere in zip(params, present.tolist()):
                if anywhere:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)

            def average(flat: Tensor) -> None:
                dist.all_reduce(flat, group=group)
                flat.div_(replicas)

            _coalesced(grads, average)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> Tensor:
        """``clip_grad_norm_`` by the norm of the whole phantom model (stands in for Precision's).

        ||g||² = Σ over the phantom group of each rank's sharded squares + replicated squares once.
        The gradients are already the data-parallel mean, equal on every replica: no data-axis sum.
        """
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        sharded = {id(p.grad) for p in sharded_parameters(self.lightning_module) if p.grad is not None}
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        squares = torch.zeros(2, dtype=dtype, device=self.root_device)  # [sharded, replicated]
        for g in grads:
            squares[0 if id(g) in sharded else 1] += torch.linalg.vector_norm(g, 2, dtype=dtype).square()
        sharded_squares = squares[:1].clone()
        if self.layout.phantom > 1:
            dist.all_reduce(sharded_squares, group=self.phantom_group)
        total = (sharded_squares[0] + squares[1]).sqrt()
        coef = torch.clamp(clip_val / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        with torch.no_grad():
            for g in grads:
                g.mul_(coef.to(g.device, g.dtype))
        return total

    # ----------------------------------------------------------- collectives
    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    def reduce(self, tensor, group: Optional[Any] = None,
               reduce_op: Optional[Union[ReduceOp, str]] = "mean"):
        """Over the data-parallel group by default: the ranks of a phantom group hold the same values."""
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, self._default_group(group), reduce_op=reduce_op)
        return tensor

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """Over the data-parallel group by default: one copy per replica, not one per rank."""
        return super().all_gather(tensor, group=self._default_group(group), sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        votes = _sync_ddp_if_available(torch.tensor(int(decision), device=self.root_device), None,
                                       reduce_op=ReduceOp.SUM)  # over the world: every rank votes
        return bool(votes == self.world_size) if all else bool(votes)

    def _default_group(self, group):
        return group if group is not None or self._device_mesh is None else self.data_parallel_group

    def on_exception(self, exception: BaseException) -> None:
        """Say in words when a collective failed because another rank died or stopped answering."""
        if not is_peer_failure(exception):
            return
        trainer = getattr(self._lightning_module, "_trainer", None)
        step = f" at global step {trainer.global_step}" if trainer is not None else ""
        timeout = f"{self._timeout.total_seconds():g} s" if self._timeout is not None else "torch's default"
        first_line = (str(exception).strip().splitlines() or [""])[0]
        _log.error(
            f"PhantomStrategy: rank {self.global_rank} of {self.world_size} stopped{step}: a collective with "
            f"the other ranks failed ({type(exception).__name__}: {first_line}). Another rank died or stopped "
            f"answering (collective timeout {timeout}). Training since the last checkpoint is lost: restart "
            "with ckpt_path='last' on the same number of ranks, or on fewer after "
            "lightning_phantom.reshard_checkpoint()."
        )

    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    # ------------------------------------------------------------ checkpoint
    def lightning_module_state_dict(self) -> dict[str, Any]:
        keys = self._shard_keys()
        return {keys.get(k, k): v for k, v in self.lightning_module.state_dict().items()}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state by shard-unique key; its groups list plain names, alike on every rank."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        names = self._optimizer_param_names(optimizer)
        state = optimizer.state_dict()
        return {"state": {names[i][1]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i][0] for i in g["params"]]}
                                 for g in state["param_groups"]]}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint() has loaded it

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint() has loaded it

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not "
                            "supported: the strategy writes with torch.distributed.checkpoint, not a "
                            "CheckpointIO.")
        path = Path(self.broadcast(filepath))
        # Written beside its name and swapped in once every rank is done: a crash before that
        # leaves the checkpoint already at `path` (say last.ckpt) whole.
        staging = staging_path(path)
        if self.is_global_zero:
            discard(staging)  # what an interrupted save left
        self.barrier()
        staging.mkdir(parents=True, exist_ok=True)
        tensors, model_extra, optimizer_extra = split_tensors(checkpoint.pop("state_dict"),
                                                               checkpoint.pop("optimizer_states", []))
        if self.layout.phantom > 1:
            # Non-tensor entries of sharded parameters differ by phantom rank; rank 0 writes them all.
            extras: list = [None] * self.layout.phantom
            dist.all_gather_object(extras, (model_extra, optimizer_extra), group=self.phantom_group)
            for other_model, other_optimizers in extras:
                model_extra.update(other_model)
                for mine, other in zip(optimizer_extra, other_optimizers):
                    mine["state"].update(other["state"])
        dcp.save(tensors, checkpoint_id=staging)
        if self.is_global_zero:
            checkpoint["phantom"] = {"format": 1, "data_parallel": self.layout.data,
                                     "phantom_parallel": self.layout.phantom, "model_extra": model_extra,
                                     "optimizer_extra": optimizer_extra}
            save_durably(checkpoint, staging / _METADATA_FILENAME)
        self.barrier()
        if self.is_global_zero:
            publish(staging, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path) and _is_sharded_checkpoint(previous_path(path)):
            # A save was cut between moving the old checkpoint aside and the new one in.
            rank_zero_info(f"{str(path)!r} is missing after an interrupted save; loading the previous version "
                           f"kept at {str(previous_path(path))!r}.")
            path = previous_path(path)
        if not _is_sharded_checkpoint(path):
            raise ValueError(f"{str(path)!r} is not a PhantomStrategy checkpoint: expected a directory with "
                             f"{_METADATA_FILENAME} and torch.distributed.checkpoint shards.")
        metadata = torch.load(path / _METADATA_FILENAME, map_location="cpu",
                              weights_only=True if weights_only is None else weights_only)
        info = metadata.pop("phantom", None)
        if info is None:
            raise ValueError(f"{str(path)!r} was not written by PhantomStrategy (no 'phantom' entry in its "
                             f"{_METADATA_FILENAME}).")
        if info["phantom_parallel"] != self.layout.phantom:
            raise ValueError(
                f"{str(path)!r} holds the shards of phantom groups of {info['phantom_parallel']} ranks, but "
                f"this run has phantom({self.layout.phantom}). Resume with phantom_parallel_size="
                f"{info['phantom_parallel']}, or re-shard the model with lightning_phantom.merge_shards."
            )
        module = self.lightning_module
        stored = SafeFileSystemReader(path).read_metadata().state_dict_metadata
        keys = self._shard_keys()
        # The module's own tensors are the targets: DCP loads into them in place.
        own = {keys.get(k, k): t for k, t in module.state_dict().items() if isinstance(t, Tensor)}
        saved = {k[len("model::"):] for k in stored if k.startswith("model::")}
        missing = sorted(set(own) - saved)
        unexpected = sorted(k for k in saved - set(own) if not other_shard(k, self.layout.phantom))
        if module.strict_loading and (missing or unexpected):
            raise RuntimeError(f"Error loading {str(path)!r} into {type(module).__name__}: missing keys "
                               f"{missing}, unexpected keys {unexpected}. Set `strict_loading = False` on "
                               "the module to load the rest.")
        targets = {f"model::{k}": t for k, t in own.items() if k in saved}
        plans = []
        for i, optimizer in enumerate(self.optimizers[:len(info["optimizer_extra"])]):
            names = self._optimizer_param_names(optimizer)
            wanted = {key for _, key in names.values()}
            slots: dict[str, dict[str, Tensor]] = defaultdict(dict)
            for key, md in stored.items():
                kind, *rest = key.split("::")
                if kind == f"optimizer_{i}" and rest[0] in wanted:
                    slots[rest[0]][rest[1]] = targets[key] = torch.empty(md.size, dtype=md.properties.dtype)
            plans.append((optimizer, names, slots, info["optimizer_extra"][i]))
        dcp.load(targets, storage_reader=SafeFileSystemReader(path))
        if info["model_extra"]:
            plain = {v: k for k, v in keys.items()}
            full = {plain.get(k, k): v for k, v in {**own, **info["model_extra"]}.items()}
            module.load_state_dict(full, strict=module.strict_loading)
        for optimizer, names, slots, extra in plans:
            load_optimizer(optimizer, names, slots, extra, path)
        return metadata

    def _shard_keys(self) -> dict[str, str]:
        """State-dict key → shard-unique key, for every sharded parameter (phantom rank and size)."""
        module = self.lightning_module
        tag = f"|phantom{self.layout.coordinates(self.global_rank)[1]}/{self.layout.phantom}"
        sharded = {id(t) for t in [*sharded_parameters(module), *sharded_buffers(module)]}
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return {name: name + tag for name, t in named if id(t) in sharded}

    def _optimizer_param_names(self, optimizer: Optimizer) -> dict[int, tuple[str, str]]:
        """Position in the optimizer → (parameter name, shard-unique key)."""
        keys = self._shard_keys()
        by_id = {id(p): (n, keys.get(n, n)) for n, p in self.lightning_module.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(id(p) not in by_id for p in params):
            raise ValueError("The optimizer holds parameters that are not in the LightningModule; "
                             "PhantomStrategy checkpoints name optimizer state by parameter name.")
        return {i: by_id[id(p)] for i, p in enumerate(params)}


StrategyRegistry.register(PhantomStrategy.strategy_name, PhantomStrategy, override=True,
                          description="Phantom parallelism: FFNs sharded over phantom groups that exchange "
                          "only ghost neurons, data-parallel across groups")


# ------------------------------------------------------------- arguments
def _check_ghosts(ghosts: Any) -> Ghosts:
    def ok(value: Any) -> bool:
        if isinstance(value, str):
            return value in ("auto", "full")
        if isinstance(value, int):
            return not isinstance(value, bool) and value >= 1
        return isinstance(value, Sequence) and len(value) > 0 and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value)

    if isinstance(ghosts, Mapping):
        if all(isinstance(k, str) and ok(v) for k, v in ghosts.items()):
            return dict(ghosts)
    elif ok(ghosts):
        return ghosts
    raise ValueError("ghosts must be 'auto', 'full', a positive int, a list of positive ints (one per "
                     f"phantom layer) or a mapping from FFN module name to one of those; got {ghosts!r}")


def _check_timeout(timeout: Any) -> Optional[timedelta]:
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta):
        raise ValueError(f"timeout must be a datetime.timedelta or a number of seconds, got {timeout!r}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout.total_seconds()} s")
    return timeout


def _check_precision(plugin: Precision) -> None:
    name = getattr(plugin, "precision", type(plugin).__name__)
    mixed = isinstance(plugin, MixedPrecision) and (
        name == "bf16-mixed" or (name == "16-mixed" and plugin.device == "cuda"))
    if not (type(plugin) is Precision or isinstance(plugin, DoublePrecision) or mixed):
        where = f" on {plugin.device}" if isinstance(plugin, MixedPrecision) else ""
        raise ValueError(
            f"PhantomStrategy does not support precision {name!r}{where} ({type(plugin).__name__}). "
            "Supported: '32-true', '64-true', 'bf16-mixed', and '16-mixed' on CUDA."
        )


def _synced_scaler(scaler, device: str):
    """The same GradScaler settings, with found_inf all-reduced over the world before each step.

    A step skipped for inf/NaN on one rank must be skipped on all, or the shards of one model
    and its replicas drift apart; FSDP's ShardedGradScaler does exactly that sync.
    """
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    if isinstance(scaler, ShardedGradScaler) or not scaler.is_enabled():  # a disabled one never skips
        return scaler
    return ShardedGradScaler(device=device, init_scale=scaler.get_scale(),
                             growth_factor=scaler.get_growth_factor(),
                             backoff_factor=scaler.get_backoff_factor(),
                             growth_interval=scaler.get_growth_interval())


# -------------------------------------------------------------- sharding
def _find_ffns(module: nn.Module, p: int):
    """(user-built PhantomFFNs, dense FFNs to convert, rejected candidates and why), by module name."""
    built, convert, rejected = [], [], []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = prefix + child_name
            if isinstance(child, PhantomFFN):
                built.append((name, child))
                continue
            if type(child) is nn.Sequential and any(type(m) is nn.Linear for m in child.modules()):
                reason = _ineligible(child, name, p)
                if reason is None:
                    convert.append((name, child))
                    continue
                rejected.append((name, reason))
            visit(child, name + ".")

    visit(module, "")
    return built, convert, rejected


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


def resolve_ghosts(spec: Any, widths: Sequence[int], p: int, name: str) -> list[int]:
    """Ghosts per phantom layer of FFN ``name``, whose phantom layers take ``widths`` inputs:
    ``"auto"`` (min(AUTO_GHOSTS, n_in/p)), ``"full"`` (n_in/p, exact conversion), an int or a list."""
    if spec == "auto":
        return [min(AUTO_GHOSTS, n // p) for n in widths]
    if spec == "full":
        return [n // p for n in widths]
    per_layer = [spec] * len(widths) if isinstance(spec, int) else list(spec)
    if len(per_layer) != len(widths):
        raise ValueError(f"ghosts for {name} has {len(per_layer)} entries but it has {len(widths)} phantom "
                         "layers")
    return per_layer


def _ghosts_for(name: str, seq: nn.Sequential, spec: Any, p: int) -> list[int]:
    widths = [lin.in_features for lin in ffn_linears(seq)[1:-1]]  # n_in of each phantom layer
    per_layer = resolve_ghosts(spec, widths, p, name)
    for layer, (k, n) in enumerate(zip(per_layer, widths), start=1):
        if k > n // p:
            raise ValueError(
                f"ghosts={k} is too large for {name}, phantom layer {layer}: a rank holds n_in/p = {n}/{p} = "
                f"{n // p} neurons and can have at most that many ghosts. Use ghosts <= {n // p}, or "
                f"ghosts='auto' (min({AUTO_GHOSTS}, n_in/p))."
            )
    return per_layer


def _describe(sizes: list[int], p: int, ghosts: list[int]) -> str:
    """Parameters per rank, and PP/TP communication and arithmetic per input row (cost.py)."""
    try:
        return compare(sizes, p, ghosts, rows=1).describe() + " (per input row, fp32)"
    except ValueError as e:  # tensor parallelism cannot split it (e.g. d_out % p with an odd depth)
        pp = phantom_cost(sizes, p, ghosts, rows=1)
        return (f"params/rank {pp.params:,}, sent/rank/row {float(pp.sent_bytes):.4g} B "
                f"(no TP comparison: {e})")


# ----------------------------------------------------------- collectives
def _coalesced(tensors: list[Tensor], op: Callable[[Tensor], None]) -> None:
    """Apply an in-place collective to ``tensors`` through a few flat buffers (per dtype and device)."""
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_kind[(t.dtype, t.device)].append(t)

    def flush(bucket: list[Tensor]) -> None:
        flat = torch._utils._flatten_dense_tensors(bucket)
        op(flat)
        for t, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            t.copy_(value)

    for same in by_kind.values():
        bucket, numel = [], 0
        for t in same:
            if bucket and numel + t.numel() > _BUCKET_NUMEL:
                flush(bucket)
                bucket, numel = [], 0
            bucket.append(t)
            numel += t.numel()
        if bucket:
            flush(bucket)


def _broadcast(tensors: list[Tensor], group: Optional[dist.ProcessGroup], src: int) -> None:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    with torch.no_grad():
        _coalesced([t for t in tensors if not t.is_meta],
                   lambda flat: dist.broadcast(flat, src=src, group=group))
