"""The data × phantom layout of a job: how many ranks share a phantom group, how many replicas.

``PhantomLayout`` holds the two degrees, checks them against the world size with the
arithmetic in the message (as torchtitan's ``ParallelDims`` does: "data(2) * phantom(2) !=
world size (6)"), and builds the named 2-D ``DeviceMesh``::

    global rank = data_rank * phantom + phantom_rank

so a phantom group is ``phantom`` consecutive ranks. Launchers number ranks node by node,
so with ``phantom`` <= devices per node the group whose collectives run at every layer
stays inside a node, and only the once-per-step gradient average crosses nodes.

The sub-groups are created here with an explicit ``timeout`` (``init_device_mesh``
would give them torch's default, not the one the job asked for), so a dead peer ends a
phantom collective as it ends a world one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.distributed as dist

from lightning_phantom._checks import positive_int

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Size = Union[Literal["auto"], int]
MESH_DIM_NAMES = ("data_parallel", "phantom_parallel")


def check_size(name: str, value: object) -> Size:
    """``"auto"`` or a positive int, else a ValueError naming the argument."""
    return "auto" if value == "auto" else positive_int(name, value, also="'auto'")


def check_timeout(timeout: Any) -> Optional[timedelta]:
    """A process-group timeout from a ``timedelta`` or seconds; None keeps torch's default."""
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta):
        raise ValueError(f"timeout must be a datetime.timedelta or a number of seconds, got {timeout!r}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout.total_seconds()} s")
    return timeout


@dataclass(frozen=True)
class PhantomLayout:
    """``data`` replicas, each a phantom group of ``phantom`` ranks: ``data * phantom == world_size``."""

    data: int
    phantom: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("data", "phantom", "world_size"):
            check_size(name, getattr(self, name))
        if self.data * self.phantom != self.world_size:
            raise ValueError(
                f"data({self.data}) * phantom({self.phantom}) != world size ({self.world_size}): every rank "
                "belongs to exactly one phantom group and one data-parallel replica. Change "
                "data_parallel_size / phantom_parallel_size, or the number of devices and nodes."
            )

    @classmethod
    def resolve(cls, data: Size, phantom: Size, world_size: int) -> "PhantomLayout":
        """Fill in ``"auto"``: all ranks form one phantom group unless a size says otherwise."""
        data, phantom = check_size("data_parallel_size", data), check_size("phantom_parallel_size", phantom)
        if phantom == "auto" and data == "auto":
            phantom, data = world_size, 1
        elif data == "auto":
            data = cls._quotient(world_size, phantom, "phantom")
        elif phantom == "auto":
            phantom = cls._quotient(world_size, data, "data")
        return cls(data, phantom, world_size)

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

    def build_mesh(self, device_type: str, timeout: Optional[timedelta] = None) -> "DeviceMesh":
        """The 2-D mesh ("data_parallel", "phantom_parallel"); a collective over the default group."""
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError("PhantomLayout.build_mesh needs torch.distributed to be initialised first.")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"the layout is for world size {self.world_size} but the default process group "
                             f"has {dist.get_world_size()} ranks")
        data_group, _ = dist.new_subgroups_by_enumeration(self.data_groups(), timeout=timeout)
        phantom_group, _ = dist.new_subgroups_by_enumeration(self.phantom_groups(), timeout=timeout)
        mesh = torch.arange(self.world_size, dtype=torch.int).view(self.data, self.phantom)
        return DeviceMesh.from_group([data_group, phantom_group], device_type, mesh=mesh,
                                     mesh_dim_names=MESH_DIM_NAMES)

    def __str__(self) -> str:
        return f"data({self.data}) × phantom({self.phantom}) = {self.world_size} ranks"
