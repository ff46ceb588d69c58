"""The core: phantom parallelism's collectives and its fused layer operator (torch only, no Lightning)."""

from lightning_phantom.ops.comm import GroupInfo, copy_to_phantom, reduce_from_phantom
from lightning_phantom.ops.operator import PhantomLinearFunction

__all__ = ["GroupInfo", "PhantomLinearFunction", "copy_to_phantom", "reduce_from_phantom"]
