"""Guards that stop a distributed run cleanly instead of letting it write garbage or hang.

``NonFiniteGuard`` (a Lightning ``Callback``, added by ``PhantomStrategy`` unless
``detect_non_finite=False``) stops training when the loss or a gradient stops being
finite. It checks each rank's own loss (``on_before_backward``) and gradients
(``on_after_backward``, before the data-parallel average spreads one rank's NaN to every
replica), and decides in ``on_before_optimizer_step`` with one all-reduce of one integer
per rank. Every rank then raises the same ``NonFiniteError`` together, so none is left
waiting in a collective, and the optimizer step with the bad gradient never runs: the
weights, and any checkpoint written after, stay those of the last good step.

``is_peer_failure`` recognises the errors a collective raises when a peer died or hung
past the timeout; the strategy uses it to say so in words a user can act on.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_phantom._checks import positive_int
from lightning_phantom.ops.comm import local

_LOSS, _GRADIENT = 1, 2  # bits of a rank's verdict


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf; raised on every rank at the same step.

    Attributes: ``step`` (``trainer.global_step`` of the step that was not taken), ``ranks``
    (global ranks that saw a non-finite value) and ``tensors`` (rank → what was not finite:
    ``"loss"`` or a parameter name for its gradient).
    """

    def __init__(self, message: str, step: int, ranks: list[int], tensors: dict[int, list[str]]) -> None:
        super().__init__(message)
        self.step, self.ranks, self.tensors = step, ranks, tensors


class NonFiniteGuard(Callback):
    """Stop training on every rank when a loss or a gradient becomes NaN or Inf.

    Arguments:
        check_loss: check the loss handed to ``backward``.
        check_gradients: check every gradient after ``backward``. Skipped while a
            ``GradScaler`` is active (``precision="16-mixed"``): it expects inf gradients
            and skips those steps itself (on every rank, see ``strategy.precision``).
        max_names: parameters named per rank in the message (all are in ``error.tensors``).

    Cost: per backward, one max-abs reduction over the gradients (fused, as in
    ``clip_grad_norm_``); per optimizer step, one all-reduce of ``world_size`` integers.
    """

    def __init__(self, check_loss: bool = True, check_gradients: bool = True, max_names: int = 5) -> None:
        self.max_names = positive_int("max_names", max_names)
        self.check_loss, self.check_gradients = bool(check_loss), bool(check_gradients)
        self._batch_idx: Optional[int] = None
        self._reset()

    def _reset(self) -> None:
        # Since the last optimizer step: losses, and (names, max |grad|) per backward. Kept on the
        # device and judged once per step, so the hooks never wait for the accelerator.
        self._losses: list[Tensor] = []
        self._grad_checks: list[tuple[list[str], Tensor]] = []

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self.check_loss:
            self._losses.append(loss.detach())

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.check_gradients or _scaler_active(trainer):
            return
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if named:
            names, grads = zip(*named)
            self._grad_checks.append((list(names), _max_abs(list(grads))))

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        losses, grad_checks = self._losses, self._grad_checks
        self._reset()
        device = trainer.strategy.root_device
        verdict = torch.zeros((), dtype=torch.int32, device=device)
        if losses:
            verdict += _LOSS * (~torch.isfinite(torch.stack([x.float() for x in losses]))).any()
        if grad_checks:
            verdict += _GRADIENT * (~torch.isfinite(torch.cat([m for _, m in grad_checks]))).any()
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        verdicts = torch.zeros(world, dtype=torch.int32, device=device)
        verdicts[rank] = verdict
        if distributed and world > 1:
            dist.all_reduce(verdicts)  # every rank learns every verdict: all stop, or none
        if not verdicts.any():
            return
        mine = _describe_local(losses, grad_checks)
        every = [None] * world
        if distributed and world > 1:  # the failure path only: names for the message
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        raise self._error(trainer, verdicts.tolist(), every)

    # ---------------------------------------------------------------- message
    def _error(self, trainer: "pl.Trainer", verdicts: list[int], every: list[Optional[dict]]) -> NonFiniteError:
        step = trainer.global_step
        ranks = [r for r, v in enumerate(verdicts) if v]
        tensors: dict[int, list[str]] = {}
        lines = []
        for r in ranks:
            found = every[r] or {"loss": None, "gradients": []}
            what = []
            if found["loss"] is not None:
                what.append(f"loss = {found['loss']}")
            grads = found["gradients"]
            if grads:
                shown = ", ".join(f"{name} (max |grad| = {value})" for name, value in grads[:self.max_names])
                more = f" and {len(grads) - self.max_names} more" if len(grads) > self.max_names else ""
                what.append(f"gradient of {shown}{more}")
            tensors[r] = (["loss"] if found["loss"] is not None else []) + [name for name, _ in grads]
            lines.append(f"  rank {r}: " + "; ".join(what))
        kinds = " and ".join(k for k, bit in (("loss", _LOSS), ("gradient", _GRADIENT))
                             if any(v & bit for v in verdicts))
        batch = "" if self._batch_idx is None else f", batch {self._batch_idx}"
        where = f"global step {step} (epoch {trainer.current_epoch}{batch})"
        message = (
            f"Non-finite {kinds} at {where} on rank(s) {', '.join(map(str, ranks))} of {len(verdicts)}:\n"
            + "\n".join(lines)
            + "\nTraining stopped on every rank before this optimizer step: the weights are those after the last "
            "good step, and no checkpoint holds the bad one. Check this batch's inputs and targets, lower the "
            "learning rate or set gradient_clip_val, or pass PhantomStrategy(detect_non_finite=False) to train on "
            "anyway."
        )
        return NonFiniteError(message, step, ranks, tensors)


def _scaler_active(trainer: "pl.Trainer") -> bool:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def _max_abs(grads: list[Tensor]) -> Tensor:
    """max |g| of each gradient, as one float32 vector: inf or NaN exactly where g has one.

    Unlike a sum or a 2-norm, the max of finite values cannot overflow: no false alarms.
    """
    values = [g.coalesce().values() if g.is_sparse else local(g) for g in grads]  # FSDP: this rank's part
    try:
        maxima = torch._foreach_norm(values, float("inf"))  # fused, as in clip_grad_norm_
    except (RuntimeError, TypeError):  # an unusual dtype or layout: one reduction per tensor
        maxima = [v.abs().max() if v.numel() else v.new_zeros(()) for v in values]
    return torch.stack([m.float().reshape(()) for m in maxima])


def _describe_local(losses: list[Tensor], grad_checks: list[tuple[list[str], Tensor]]) -> dict:
    """This rank's non-finite loss value and gradient names (the failure path: syncs freely)."""
    bad_loss = None
    for x in losses:
        flat = x.float().flatten()
        bad = flat[~torch.isfinite(flat)]
        if bad.numel():
            bad_loss = bad[0].item()
            break
    gradients: dict[str, float] = {}
    for names, maxima in grad_checks:
        for name, value in zip(names, maxima.tolist()):
            if not math.isfinite(value):
                gradients.setdefault(name, value)
    return {"loss": bad_loss, "gradients": list(gradients.items())}


# ------------------------------------------------------------------ dead peers
_PEER_FAILURE_WORDS = (
    "connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
    "socket closed", "connection refused", "nccl communicator was aborted", "heartbeat",
)


def is_peer_failure(exception: BaseException) -> bool:
    """Whether ``exception`` looks like a collective that failed because another rank died or hung."""
    dist_errors = tuple(getattr(dist, name) for name in ("DistError",) if hasattr(dist, name))
    if dist_errors and isinstance(exception, dist_errors):
        return True
    if not isinstance(exception, RuntimeError):
        return False
    text = str(exception).lower()
    return any(word in text for word in _PEER_FAILURE_WORDS) and (
        "gloo" in text or "nccl" in text or "c10d" in text or "store" in text or "peer" in text)
