"""The data × phantom layout of a job: how many ranks share a phantom group, how many replicas.

``PhantomLayout`` holds the two degrees, checks them against the world size with the
arithmetic in the message (as torchtitan's ``ParallelDims`` does: "data(2) * phantom(2) !=
world size (6)"), and builds the named 2-D ``DeviceMesh``::

    global rank = data_rank * phantom + phantom_rank

so a phantom group is ``phantom`` consecutive ranks. Launchers number ranks node by node,
so with ``phantom`` a divisor of the processes per node the group whose collectives run at
every layer stays inside a node, and only the once-per-step gradient average crosses nodes.
That is the default, as in Lightning's ``ModelParallelStrategy``: phantom = processes per
node, data = nodes. A layout whose phantom groups span nodes is allowed (a user may ask
for it) and says so in ``cross_node_warning``.

The sub-groups are created here with explicit timeouts (``init_device_mesh`` would give them
torch's default, not the ones the job asked for). Setting up and running are bounded apart:
creating a group waits for every rank to arrive, which on a busy machine or a cluster can take
far longer than a collective should (``setup_timeout``); the groups then get the collective
``timeout``, so a dead peer ends a phantom collective as it ends a world one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection

from lightning_phantom._checks import positive_int

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Size = Union[Literal["auto"], int]
MESH_DIM_NAMES = ("data_parallel", "phantom_parallel")


def check_size(name: str, value: object) -> Size:
    """``"auto"`` or a positive int, else a ValueError naming the argument."""
    return "auto" if value == "auto" else positive_int(name, value, also="'auto'")


def check_timeout(timeout: Any, name: str = "timeout") -> Optional[timedelta]:
    """A process-group timeout from a ``timedelta`` or seconds; None keeps torch's default."""
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta):
        raise ValueError(f"{name} must be a datetime.timedelta or a number of seconds, got {timeout!r}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"{name} must be positive, got {timeout.total_seconds()} s")
    return timeout


def set_collective_timeout(group: Optional[dist.ProcessGroup], timeout: Optional[timedelta]) -> None:
    """From now on, a collective of ``group`` (None: the default group) waits ``timeout`` for its peers."""
    if timeout is not None:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def connect(cluster_environment: Any, backend: str, timeout: Optional[timedelta],
            setup_timeout: Optional[timedelta], device_id: Optional[torch.device] = None) -> None:
    """Lightning's ``_init_dist_connection``, its rendezvous waiting up to ``setup_timeout`` for every rank
    to start; the default group it creates then waits ``timeout`` in a collective. A default group
    that exists already (the user's, a test's) is left as it is."""
    creating = not dist.is_initialized()
    _init_dist_connection(cluster_environment, backend, timeout=setup_timeout, device_id=device_id)
    if creating:
        set_collective_timeout(None, timeout)


def _per_node(world_size: int, nodes: int) -> int:
    if world_size % nodes:
        raise ValueError(f"world size ({world_size}) is not divisible by nodes({nodes}) "
                         f"({world_size} % {nodes} = {world_size % nodes}): every node runs the same number "
                         "of processes.")
    return world_size // nodes


@dataclass(frozen=True)
class PhantomLayout:
    """``data`` replicas, each a phantom group of ``phantom`` ranks: ``data * phantom == world_size``.

    ``nodes`` is only known to say whether a phantom group spans nodes (``cross_node_warning``).
    """

    data: int
    phantom: int
    world_size: int
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("data", "phantom", "world_size", "nodes"):
            check_size(name, getattr(self, name))
        if self.data * self.phantom != self.world_size:
            raise ValueError(
                f"data({self.data}) * phantom({self.phantom}) != world size ({self.world_size}): every rank "
                "belongs to exactly one phantom group and one data-parallel replica. Change "
                "data_parallel_size / phantom_parallel_size, or the number of devices and nodes."
            )
        _per_node(self.world_size, self.nodes)

    @classmethod
    def resolve(cls, data: Size, phantom: Size, world_size: int, nodes: int = 1) -> "PhantomLayout":
        """Fill in ``"auto"`` as Lightning's ``ModelParallelStrategy`` does: by default a phantom group
        is the processes of one node and the nodes are the data-parallel replicas; with one size
        given, the other is world size / that size."""
        data, phantom = check_size("data_parallel_size", data), check_size("phantom_parallel_size", phantom)
        nodes = check_size("nodes", nodes)
        if phantom == "auto" and data == "auto":
            phantom, data = _per_node(world_size, nodes), nodes
        elif data == "auto":
            data = cls._quotient(world_size, phantom, "phantom")
        elif phantom == "auto":
            phantom = cls._quotient(world_size, data, "data")
        return cls(data, phantom, world_size, nodes)

    @property
    def processes_per_node(self) -> int:
        return _per_node(self.world_size, self.nodes)

    def cross_node_warning(self) -> Optional[str]:
        """Why this layout's phantom groups cross nodes, with the arithmetic; ``None`` when none does.

        Group g holds ranks [g·phantom, (g+1)·phantom) and node n ranks [n·per_node, (n+1)·per_node),
        so every group stays inside a node exactly when ``phantom`` divides the processes per node.
        """
        per_node = self.processes_per_node
        if per_node % self.phantom == 0:
            return None
        if self.phantom > per_node:
            why = (f"phantom({self.phantom}) > processes per node ({self.world_size} ranks / {self.nodes} nodes "
                   f"= {per_node}): each phantom group spans at least {-(-self.phantom // per_node)} nodes")
        else:
            why = (f"processes per node ({self.world_size} ranks / {self.nodes} nodes = {per_node}) % "
                   f"phantom({self.phantom}) = {per_node % self.phantom}: some phantom groups span two nodes")
        return (f"{why}, so every phantom layer's all-gather and reduce-scatter crosses the network between "
                f"nodes. Use a phantom_parallel_size that divides {per_node}, or leave both sizes on 'auto' "
                f"(phantom({per_node}) × data({self.nodes})).")

    @staticmethod
    def _quotient(world_size: int, size: int, name: str) -> int:
        if world_size % size:
            raise ValueError(
                f"world size ({world_size}) is not divisible by {name}({size}) "
                f"({world_size} % {size} = {world_size % size}): use a number of devices × nodes that is a "
                f"multiple of {size}, or another {name}_parallel_size."
            )
        return world_size // size

    def coordinates(self, global_rank: int) -> tuple[int, int]:
        """(data-parallel rank, phantom rank) of a global rank."""
        return divmod(global_rank, self.phantom)

    def phantom_groups(self) -> list[list[int]]:
        """Global ranks of every phantom group (consecutive ranks)."""
        return [[d * self.phantom + i for i in range(self.phantom)] for d in range(self.data)]

    def data_groups(self) -> list[list[int]]:
        """Global ranks of every data-parallel group (the replicas of one phantom rank)."""
        return [[d * self.phantom + i for d in range(self.data)] for i in range(self.phantom)]

    def build_mesh(self, device_type: str, timeout: Optional[timedelta] = None,
                   setup_timeout: Optional[timedelta] = None) -> "DeviceMesh":
        """The 2-D mesh ("data_parallel", "phantom_parallel"); a collective over the default group.

        Creating the groups waits up to ``setup_timeout`` (default: ``timeout``) for every rank;
        their collectives then wait up to ``timeout``.
        """
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError("PhantomLayout.build_mesh needs torch.distributed to be initialised first.")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"the layout is for world size {self.world_size} but the default process group "
                             f"has {dist.get_world_size()} ranks")
        setup = setup_timeout or timeout
        data_group, _ = dist.new_subgroups_by_enumeration(self.data_groups(), timeout=setup)
        phantom_group, _ = dist.new_subgroups_by_enumeration(self.phantom_groups(), timeout=setup)
        for group in (data_group, phantom_group):
            set_collective_timeout(group, timeout)
        mesh = torch.arange(self.world_size, dtype=torch.int).view(self.data, self.phantom)
        return DeviceMesh.from_group([data_group, phantom_group], device_type, mesh=mesh,
                                     mesh_dim_names=MESH_DIM_NAMES)

    def __str__(self) -> str:
        return f"data({self.data}) × phantom({self.phantom}) = {self.world_size} ranks"
