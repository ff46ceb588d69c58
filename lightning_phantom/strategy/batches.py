"""Every rank of a phantom group trains on one batch: its DataLoader workers seeded alike, and checked.

A phantom group holds one copy of the model, each FFN layer's neurons split over its ranks,
and every rank multiplies its own copy of the batch: ranks that hold different batches train
a model that mixes inputs which do not belong together, and nothing fails. Two things keep
the batch one:

* ``seed_workers``: ``seed_everything(workers=True)`` makes Lightning give every DataLoader a
  ``worker_init_fn`` seeded by the *global* rank, so a Dataset that draws random augmentation
  in ``__getitem__`` gives each phantom rank a different batch. The strategy sets Lightning's
  own function first, seeded by the *data-parallel* rank (what the global rank is to DDP):
  the replicas draw differently, the ranks of a phantom group alike. With phantom(1) it is
  exactly Lightning's seeding.
* ``BatchCheck``: a 64-bit fingerprint of every training batch (integer arithmetic mod 2^64,
  which no order of a reduction can change), folded over the batches of an
  optimizer step, compared over the phantom group inside the all-reduce of replicated
  gradients the strategy sends every step anyway (``riders``), so it costs no collective.
  The fingerprint is cut into c small integers h_i of b bits; the group sums h_i and h_i²,
  and by Cauchy–Schwarz p·Σh² ≥ (Σh)² with equality exactly when every rank sent the same
  h. Each rank judges the summed buffer, identical everywhere, so every rank reaches the
  same verdict; b is chosen so that every sum is exact in the buffer's dtype.
"""

from __future__ import annotations

import math
import os
import zlib
from functools import partial
from typing import Any, Optional

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning.fabric.utilities.seed import pl_worker_init_function

_MASK64 = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15  # odd: multiplying by it mod 2^64 is a bijection (Fibonacci hashing)
_PERIOD = 1 << 16  # words per period of the position weights (512 KiB of int64 per device)
_MANTISSA = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


class BatchMismatchError(RuntimeError):
    """The ranks of a phantom group trained on different batches; raised on every rank at the same step.

    ``step``: ``trainer.global_step`` of the optimizer step that was not taken.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def seed_workers(dataloader: object, data_rank: int) -> None:
    """What ``seed_everything(workers=True)`` asks for, seeded by the data-parallel rank.

    Lightning adds ``pl_worker_init_function`` with the global rank right after
    ``Strategy.process_dataloader`` and only where no ``worker_init_fn`` is set, so setting it
    here wins; a user's own ``worker_init_fn`` is left alone (the check still guards it).
    """
    if not int(os.environ.get("PL_SEED_WORKERS", 0)) or getattr(dataloader, "worker_init_fn", 0) is not None:
        return
    dataloader.worker_init_fn = partial(pl_worker_init_function, rank=data_rank)


# ----------------------------------------------------------------- fingerprints
def _wrap(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_WEIGHTS: dict[torch.device, Tensor] = {}


def _weights(device: torch.device) -> Tensor:
    """Odd pseudo-random int64 weight per position in a period, the same on every rank."""
    if device not in _WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED)
        odd = torch.randint(-(1 << 62), 1 << 62, (_PERIOD,), generator=g, dtype=torch.int64) * 2 + 1
        _WEIGHTS[device] = odd.to(device)
    return _WEIGHTS[device]


def _words(t: Tensor) -> Tensor:
    """The tensor's bytes as a 1-D tensor of 8-byte words (4-byte ones, or bytes, if they do not divide)."""
    flat = t.detach().contiguous().view(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    for dtype in (torch.int64, torch.int32):
        try:
            return flat.view(dtype)
        except RuntimeError:  # a size or offset not a multiple of the word
            pass
    return flat.view(torch.uint8)


def tensor_fingerprint(t: Tensor) -> Tensor:
    """Σ word_i · w_(i mod period), in int64 arithmetic mod 2^64 (0-d, on the tensor's device; no host sync).

    Multiplying by an odd weight is a bijection mod 2^64, so a changed, moved or swapped word
    changes the sum; periods are folded in order (Horner), so swapped periods change it too.
    On a CPU each period's product stays in cache (no batch-sized temporary); elsewhere 64
    periods go per multiply, for few kernel launches.
    """
    words, weights = _words(t), _weights(t.device)
    n = words.numel()
    whole = n // _PERIOD * _PERIOD
    total = (words[whole:].to(torch.int64) * weights[:n - whole]).sum()
    periods = words[:whole].view(-1, _PERIOD)
    block = 1 if words.device.type == "cpu" else 64
    for start in range(0, periods.shape[0], block):
        total = total * _wrap(_MIX) + (periods[start:start + block].to(torch.int64) * weights).sum()
    return total


def fingerprint(batch: Any) -> Optional[Tensor]:
    """A 64-bit fingerprint of every tensor in ``batch`` (in order), with its shape and dtype; None if none."""
    tensors: list[Tensor] = []
    apply_to_collection(batch, Tensor, tensors.append)
    total: Optional[Tensor] = None
    for t in tensors:
        # The shape and dtype are known on the host; crc32 is the same in every process (hash() of a str is not).
        meta = zlib.crc32(repr((tuple(t.shape), str(t.dtype))).encode())
        value = tensor_fingerprint(t) + meta if t.numel() else torch.tensor(meta, device=t.device)
        total = value if total is None else total.to(value.device) * _wrap(_MIX) + value
    return total


# ----------------------------------------------------------------- the check
def hash_bits(dtype: torch.dtype, phantom: int) -> int:
    """Bits per small hash such that every sum the group forms is exact in ``dtype`` (0: too few).

    The buffer sums p·h² over p ranks (< p²·2^(2b)); it must stay below 2^mantissa.
    """
    room = _MANTISSA.get(dtype, 0) - 2 * math.ceil(math.log2(phantom))
    return min(16, room // 2)


def rider_dtype(dtype: torch.dtype, phantom: int) -> torch.dtype:
    """``dtype`` if it holds hashes of 4 bits or more exactly (float32, float64), else float32."""
    return dtype if hash_bits(dtype, phantom) >= 4 else torch.float32


class BatchCheck:
    """Fingerprints this rank's training batches since the last optimizer step and compares them over the group."""

    def __init__(self, phantom: int) -> None:
        self.phantom = phantom
        self._print: Optional[Tensor] = None  # folded fingerprint of the batches since the last step
        self._shifts: dict[tuple, Tensor] = {}  # (device, bits) -> where each hash starts in the fingerprint

    def add(self, batch: Any) -> None:
        value = fingerprint(batch)
        if value is None:
            return
        self._print = value if self._print is None else self._print.to(value.device) * _wrap(_MIX) + value

    def riders(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This step's hashes h, then their squares h², in ``dtype`` (``rider_dtype``), multiplied by p.

        The replicated average divides its buffer by p, and the quotient of an exact multiple
        of p is exact, so ``mismatch`` reads the plain sums.
        """
        value, self._print = self._print, None
        bits = hash_bits(dtype, self.phantom)
        if (device, bits) not in self._shifts:
            self._shifts[device, bits] = torch.arange(0, 64, bits, device=device)
        value = torch.zeros((), dtype=torch.int64, device=device) if value is None else value.to(device)
        h = (torch.bitwise_right_shift(value, self._shifts[device, bits]) & ((1 << bits) - 1)).to(dtype)
        return torch.cat([h, h * h]) * self.phantom

    def mismatch(self, sums: Tensor) -> Tensor:
        """From ``riders`` summed over the group (divided by p): True if some rank's batch differed (0-d)."""
        h, squares = sums.chunk(2)  # integers, and so are these products: exact (hash_bits)
        return (squares * self.phantom != h * h).any()


def mismatch_error(step: int, where: str, groups: int, data: int, phantom: int) -> BatchMismatchError:
    return BatchMismatchError(
        f"The ranks of {groups} of {data} phantom group(s) trained on different batches at {where}: every "
        f"rank of a phantom group ({phantom} ranks sharing one copy of the model, each FFN layer's neurons "
        "split over them) must see the same batch. Training stopped on every rank before this optimizer step. "
        "Usual causes: a sampler or DataLoader that shards by global rank (keep use_distributed_sampler=True, "
        "or shard with trainer.strategy.distributed_sampler_kwargs: the data-parallel rank and size); a "
        "worker_init_fn or Dataset seeded by the global rank (seed by the data-parallel rank, "
        "trainer.strategy.layout.coordinates(trainer.global_rank)[0]); or randomness in the Dataset that no "
        "seed fixes (call lightning.seed_everything(seed, workers=True) before the Trainer).",
        step,
    )
