"""``PhantomStrategy`` and what it is built from: the data × phantom layout, checkpoints, guards."""

from lightning_phantom.strategy.agreement import AgreedFailure
from lightning_phantom.strategy.batches import BatchMismatchError
from lightning_phantom.strategy.guards import NonFiniteError, NonFiniteGuard
from lightning_phantom.strategy.layout import PhantomLayout
from lightning_phantom.strategy.phantom import PhantomStrategy
from lightning_phantom.strategy.reshard import reshard_checkpoint
from lightning_phantom.strategy.step import MissingGradientError

__all__ = ["AgreedFailure", "BatchMismatchError", "MissingGradientError", "NonFiniteError", "NonFiniteGuard",
           "PhantomLayout", "PhantomStrategy", "reshard_checkpoint"]
