"""``PhantomStrategy``: phantom parallelism for a Lightning ``Trainer`` (``strategy="phantom"``).

The ranks form a 2-D mesh ("data_parallel", "phantom_parallel") (``layout``). Each phantom
group holds one copy of the model, every FFN split over its ranks, and sees one batch; the
groups are data-parallel replicas. This module holds the Lightning hooks, in the shape of
Lightning's ``ModelParallelStrategy``; each job they start lives in a module of its own:

* ``lightning_phantom.nn.plan``: what to shard — the ``ghosts``/``init``/``overlap`` request
  becomes one frozen ``FFNPlan`` per FFN (``StackPlan`` per transformer stack) after
  ``configure_model``; each is then replaced in place by this rank's ``PhantomFFN``
  (``PhantomTransformerEncoder``), built straight into shards from meta.
* ``data_parallel``: replicas start equal; their gradients are averaged during backward
  (``"ddp"``, ``grad_buckets``), or FSDP2 shards every FFN over them too (``"fsdp"``).
* ``precision``: the strategy's own precision plugins, clipping by the norm of the whole model.
* ``checkpoints`` (the format) and ``storage`` (atomic publish): sharded DCP checkpoints.
* ``guards``: ``NonFiniteGuard`` (on unless ``detect_non_finite=False``) and dead-peer messages.
* ``batches``: one batch per phantom group (workers seeded by data-parallel rank; every step checked).
* ``step``: after the last backward, the averages and one verdict that every rank acts on alike.
* ``buffers``: data-parallel rank 0's buffers to the replicas (DDP's ``broadcast_buffers=True``).
* ``collectives``: Lightning's reduce/all_gather over the data-parallel group.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device, _set_num_threads_if_needed,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lightning_phantom.nn.compiling import CompileRequest, compile_ffns, compile_options
from lightning_phantom.nn.layers import sharded_parameters
from lightning_phantom.nn.plan import GhostsRequest, PhantomPlan
from lightning_phantom.strategy import checkpoints
from lightning_phantom.strategy.batches import BatchCheck, seed_workers
from lightning_phantom.strategy.buffers import BufferSync
from lightning_phantom.strategy.collectives import PhantomCollectives
from lightning_phantom.strategy.data_parallel import DataAxis, sync_replicas
from lightning_phantom.strategy.sharding import shard_module
from lightning_phantom.strategy.guards import NonFiniteGuard, peer_failure_message
from lightning_phantom.strategy.layout import PhantomLayout, Size, check_size, check_timeout, connect
from lightning_phantom.strategy.metrics import sync_metrics_over
from lightning_phantom.strategy.precision import global_grad_norm, phantom_precision
from lightning_phantom.strategy.step import finish_step

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_log = logging.getLogger(__name__)


class PhantomStrategy(PhantomCollectives):
    """Phantom parallelism (docs/operator.md) for every FFN of a ``LightningModule``, data-parallel around it.

    Arguments:
        ghosts: ghosts per rank of each phantom layer. ``"auto"`` (default): ``min(32, n_in/p)``
            per layer; 32 ghosts make a layer of width n send p·32/n of what tensor parallelism
            sends (1/16 at n = 4096, p = 8) and keep a rank-32 view of every other rank.
            ``"full"``: n_in/p, an exact conversion with no saving (for checking). An int, or a
            list with one per phantom layer, for every FFN; or a mapping from module name
            (``"net"``, ``"encoder.ffn"``) to any of those, other FFNs getting ``"auto"``.
        phantom_parallel_size: ranks per phantom group; ``"auto"``: the processes of one node (or
            world / data), as Lightning's ``ModelParallelStrategy`` keeps its groups inside a node.
            A size whose groups span nodes works but warns: their per-layer traffic crosses the network.
        data_parallel_size: number of phantom groups (replicas); ``"auto"``: the number of nodes (or
            world / phantom).
        init: how a dense FFN becomes shards: ``"svd"`` (the closest phantom model, default) or
            ``"random"`` (the architecture only). FFNs on the meta device always get ``"random"``.
        overlap: overlap the ghost all-gather with the local block's matmul.
        data_parallel: ``"ddp"`` (default): each replica holds whole shards; gradients are averaged
            over the replicas during backward, bucket by bucket. ``"fsdp"``: FSDP2 shards each FFN's parameters, gradients
            and optimizer state over the replicas too (1/data of the memory; two collectives more).
        timeout: how long a collective waits for its peers (``timedelta`` or seconds), in the default group
            when the strategy creates it and in the data and phantom groups: a dead peer ends the job (a
            hung one after up to twice this: Lightning's per-step SIGTERM broadcast swallows the first).
        setup_timeout: how long the rendezvous and the creation of process groups wait for every rank to
            arrive (30 min, torch's default): processes start late on a busy machine or a cluster.
        detect_non_finite: add a ``NonFiniteGuard`` when fitting (unless one is in the callbacks):
            every rank stops with a ``NonFiniteError`` naming the step, ranks and tensors as soon as a
            loss or gradient is NaN/Inf, before the optimizer step and any later checkpoint.
        process_group_backend: ``"nccl"``, ``"gloo"``, …; by default the device's.
        compile: ``torch.compile`` each PhantomFFN after sharding (in place, one graph forward and
            backward, ``fullgraph=True``): ``True``, or a dict of ``torch.compile`` arguments.
        plan: shard exactly the modules named, by pattern, each with its own settings, instead of
            finding FFNs: ``{"encoder.*.ffn": {"ghosts": 16, "init": "random"}}`` (keys ``ghosts``,
            ``init``, ``overlap``; the arguments above for what an entry leaves out). Checked here;
            a pattern that matches no module is an error at setup, on every rank alike.
    """

    strategy_name = "phantom"

    def __init__(
        self,
        ghosts: GhostsRequest = "auto",
        phantom_parallel_size: Size = "auto",
        data_parallel_size: Size = "auto",
        init: str = "svd",
        overlap: bool = True,
        data_parallel: str = "ddp",
        timeout: Optional[Union[timedelta, float]] = default_pg_timeout,
        setup_timeout: Optional[Union[timedelta, float]] = default_pg_timeout,
        detect_non_finite: bool = True,
        process_group_backend: Optional[str] = None,
        plan: Optional[Mapping[str, Any]] = None,
        compile: CompileRequest = False,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment=None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        self._phantom_parallel_size = check_size("phantom_parallel_size", phantom_parallel_size)
        self._data_parallel_size = check_size("data_parallel_size", data_parallel_size)
        #: The sharding request, checked here so that a bad one fails before any process starts.
        self.plan = PhantomPlan(ghosts, init, overlap, modules=plan)
        self._timeout = check_timeout(timeout)
        self._setup_timeout = check_timeout(setup_timeout, "setup_timeout")
        self.data_axis = DataAxis(data_parallel)
        self._detect_non_finite = bool(detect_non_finite)
        self._guard: Optional[NonFiniteGuard] = None
        self._batch_check: Optional[BatchCheck] = None  # while fitting with phantom groups of 2 or more
        self._buffers: Optional[BufferSync] = None  # rank 0's buffers to the replicas (DDP's broadcast_buffers)
        self._sharded: set[int] = set()  # id() of the parameters split over the phantom group
        self._compile = compile_options(compile)
        if process_group_backend is not None and not isinstance(process_group_backend, str):
            raise ValueError(f"process_group_backend must be a name such as 'nccl' or 'gloo', got "
                             f"{process_group_backend!r}")
        self._process_group_backend = process_group_backend
        self._layout: Optional[PhantomLayout] = None
        self._device_mesh: Optional[DeviceMesh] = None
        self.num_nodes = 1
        self.converted_modules: dict[str, str] = {}  # PhantomFFN name -> summary with cost (logged)
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
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    @override
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def is_distributed(self) -> bool:  # Lightning adds a DistributedSampler when True
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        data_mesh = self.device_mesh["data_parallel"]
        return {"num_replicas": data_mesh.size(), "rank": data_mesh.get_local_rank()}

    @property
    @override
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    # -------------------------------------------------------------- precision
    @property
    @override
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is None:
            self.precision_plugin = Precision()
        return self._precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # Lightning's choice, exchanged for the strategy's own plugin of the same settings,
        # whose clip_grad_by_norm uses the norm of the whole phantom model.
        self._precision_plugin = None if plugin is None else phantom_precision(plugin, self._global_grad_norm)

    def _global_grad_norm(self, grads: list[Tensor]) -> Tensor:
        sharded = {id(p.grad) for p in sharded_parameters(self.lightning_module) if p.grad is not None}
        return global_grad_norm(grads, sharded, self.phantom_group, self.layout.phantom,
                                self.data_parallel_group if self.data_axis.fsdp_units else None)

    # ---------------------------------------------------------------- launch
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # No process is started yet, but their number is known: check the layout now.
        self._layout = PhantomLayout.resolve(self._data_parallel_size, self._phantom_parallel_size,
                                             self.num_nodes * self.num_processes, self.num_nodes)
        if (crossing := self._layout.cross_node_warning()) is not None:
            rank_zero_warn(f"PhantomStrategy {self._layout} on {self.num_nodes} nodes: {crossing}")
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes,
                                                       self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        # Each rank its share of the cores, as Lightning's launcher gives rank 0 only: the ranks it
        # starts (and those of any launcher that sets no OMP_NUM_THREADS) would each take every core.
        _set_num_threads_if_needed(num_processes=self.num_processes)
        self._process_group_backend = (self._process_group_backend
                                       or _get_default_process_group_backend_for_device(self.root_device))
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type != "cpu" else None
        connect(self.cluster_environment, self._process_group_backend, self._timeout, self._setup_timeout,
                device_id)
        self._layout = PhantomLayout.resolve(self._data_parallel_size, self._phantom_parallel_size,
                                             self.world_size, self.num_nodes)
        self._device_mesh = self._layout.build_mesh(self.root_device.type, self._timeout, self._setup_timeout)
        # Users reach the mesh in LightningModule.configure_model() as self.device_mesh.
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @override
    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        # Before sharding, so that an SVD conversion sees the weights in the precision they train in.
        self.model = self.precision_plugin.convert_module(self.model)
        self._shard(self.lightning_module)
        compile_ffns(self.lightning_module, self._compile)
        self.model_to_device()
        sync_replicas(self.lightning_module, self.layout, self.data_parallel_group)
        sync_metrics_over(self.lightning_module, self.data_parallel_group)
        self.data_axis.shard(self.lightning_module, self.device_mesh["data_parallel"])
        self._buffers = BufferSync(self.lightning_module, self.data_parallel_group, self.layout.data)
        self._sharded = {id(p) for p in sharded_parameters(self.lightning_module)}  # FSDP's, if it sharded
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
            self.data_axis.attach(self.optimizers, self.layout, self.data_parallel_group,
                                  self.lightning_module.automatic_optimization)
            self._batch_check = BatchCheck(self.layout.phantom) if self.layout.phantom > 1 else None
            if self._detect_non_finite and not any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
                trainer.callbacks.append(NonFiniteGuard())
            self._guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
            if self._guard is not None and self.data_axis.buckets is not None:
                self.data_axis.buckets.observe = self._guard.observe_bucket  # sums in the buckets' pass
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: Optional[bool] = None):
        # Meta tensors are built into shards and materialised in setup().
        meta = torch.device("meta") if empty_init else nullcontext()
        with meta, self.precision_plugin.tensor_init_context():
            yield

    def _shard(self, module: nn.Module) -> None:
        shard_module(module, self.plan, self.layout, self.phantom_group, self.root_device, self.converted_modules)

    # -------------------------------------------------------------- training
    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer

        def closure_then_average() -> Any:
            # After the last backward of the step (automatic or manual optimization);
            # on_before_optimizer_step, unscaling, clipping and the step all see the data-parallel
            # mean, and every rank has agreed that the step may be taken.
            result = closure()
            finish_step(self, raw)
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        seed_workers(dataloader, self.layout.coordinates(self.global_rank)[0])  # one batch per phantom group
        return dataloader

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)
        trainer = self.lightning_module._trainer
        training = trainer is not None and trainer.training
        if self._batch_check is not None and training:
            self._batch_check.add(batch)  # compared over the phantom group at the optimizer step
        if self._buffers is not None:
            self._buffers.before_batch(training)
        return batch

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator:
        """While accumulating, the data axis communicates nothing (on the last micro-batch only)."""
        with self.data_axis.no_sync():
            yield None

    # ------------------------------------------------------------- teardown
    @override
    def on_exception(self, exception: BaseException) -> None:
        """Say in words when a collective failed because another rank died or stopped answering."""
        trainer = getattr(self._lightning_module, "_trainer", None)
        message = peer_failure_message(exception, self.global_rank, self.world_size, self._timeout,
                                       trainer.global_step if trainer is not None else None)
        if message is not None:
            _log.error(message)

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.data_axis.detach()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    # ------------------------------------------------------------ checkpoint
    def shard_keys(self) -> dict[str, str]:
        """State-dict name → checkpoint key, for every sharded parameter (``checkpoints.shard_key``)."""
        rank = self.layout.coordinates(self.global_rank)[1]
        return checkpoints.shard_keys(self.lightning_module, rank, self.layout.phantom)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._buffers is not None:
            self._buffers.before_save()  # the replicas' buffers are rank 0's, and so is the checkpoint's copy
        keys = self.shard_keys()
        return {keys.get(k, k): v for k, v in self.lightning_module.state_dict().items()}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return checkpoints.optimizer_state(self.lightning_module, optimizer, self.shard_keys())

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint() has loaded it

    load_optimizer_state_dict = load_model_state_dict  # type: ignore[assignment]  # loaded there too

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not "
                            "supported: the strategy writes with torch.distributed.checkpoint, not a "
                            "CheckpointIO.")
        checkpoints.save(self, checkpoint, Path(self.broadcast(filepath)))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return checkpoints.load(self, Path(self.broadcast(checkpoint_path)), weights_only)


StrategyRegistry.register(PhantomStrategy.strategy_name, PhantomStrategy, override=True,
                          description="Phantom parallelism: FFNs sharded over phantom groups that exchange "
                          "only ghost neurons, data-parallel across groups")
