"""A local step that may fail on one rank, agreed on by every rank before the next collective.

Saving and loading a checkpoint alternate collectives with steps each rank takes alone:
rank 0 discards, marks, writes ``meta.pt`` and publishes; every rank reads ``meta.pt``. A step
that raises on one rank leaves that rank out of the next collective, and the others wait in
it until the process-group timeout (30 minutes by default). ``agree`` runs the step, then
every rank learns whether it succeeded everywhere (one all-reduce of one integer over the
world); on a failure every rank raises the same error, built from what each failed rank
saw, so no rank waits and every rank says the same thing.
"""

from __future__ import annotations

import builtins
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class AgreedFailure(RuntimeError):
    """A step failed on some ranks; raised on every rank (when the failures were not of one built-in type)."""


def agree(what: str, step: Callable[[], T], device: torch.device, here: bool = True) -> Optional[T]:
    """``step()`` on the ranks where ``here`` is True, then every rank agrees it succeeded; collective.

    Returns the step's result (None where it did not run). On a failure anywhere, every rank
    raises one error: where every rank failed alike, each its own; else the failed ranks'
    exception type when they share a built-in one (a ``ValueError`` stays a ``ValueError``),
    or ``AgreedFailure``, with a message saying ``what`` failed, on which ranks and why
    (chained to the original on a failed rank).
    """
    result, error = None, None
    if here:
        try:
            result = step()
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            error = e
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result
    failed = torch.tensor([int(error is not None)], dtype=torch.int32, device=device)
    dist.all_reduce(failed)
    if not failed.item():  # the common path: one small collective
        return result
    mine = None if error is None else (type(error).__module__, type(error).__name__, str(error))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if error is not None and all(found == mine for found in every):
        raise error  # the same failure on every rank: each raises its own
    raise _error(what, every) from error


def _error(what: str, every: list) -> Exception:
    failures = [(rank, *found) for rank, found in enumerate(every) if found]
    text = "; ".join(f"rank {rank}: {name}: {message}" for rank, _, name, message in failures)
    message = (f"{what} failed on rank(s) {', '.join(str(f[0]) for f in failures)} of {len(every)}, so every "
               f"rank stopped here: {text}")
    kinds = {(module, name) for _, module, name, _ in failures}
    module, name = kinds.pop() if len(kinds) == 1 else ("", "")
    kind = getattr(builtins, name, None) if module == "builtins" else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a built-in exception that takes other arguments
            pass
    return AgreedFailure(message)
