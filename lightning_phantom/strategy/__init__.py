"""``PhantomStrategy`` and what it is built from: the data × phantom layout, checkpoints, guards."""

from lightning_phantom.strategy.guards import NonFiniteError, NonFiniteGuard
from lightning_phantom.strategy.layout import PhantomLayout
from lightning_phantom.strategy.phantom import PhantomStrategy
from lightning_phantom.strategy.reshard import reshard_checkpoint

__all__ = ["NonFiniteError", "NonFiniteGuard", "PhantomLayout", "PhantomStrategy", "reshard_checkpoint"]
