"""Guards that stop a distributed run cleanly instead of letting it write garbage or hang.

``NonFiniteGuard`` (a Lightning ``Callback``, added by ``PhantomStrategy`` unless
``detect_non_finite=False``) stops training when the loss or a gradient stops being
finite. It checks each rank's own loss (``on_before_backward``) and gradients (a hook on
each parameter as ``backward`` accumulates its gradient, before the data-parallel average
spreads one rank's NaN to every replica), and decides in ``on_before_optimizer_step`` with
one all-reduce of one integer per rank. Every rank then raises the same ``NonFiniteError`` together, so none is left
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
from typing_extensions import override

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
        check_gradients: check every parameter's gradient as ``backward`` accumulates it.
            Skipped while a ``GradScaler`` is active (``precision="16-mixed"``): it expects inf
            gradients and skips those steps itself (on every rank, see ``strategy.precision``).
        max_names: parameters named per rank in the message (all are in ``error.tensors``).

    Cost: per gradient, one ``sum`` taken by a post-accumulate-grad hook the moment ``backward``
    has written it, while it is still in cache (a separate pass over the gradients afterwards
    costs a memory sweep: ~3% of a CPU step at n = 4096, and ``torch._foreach_norm(inf)``, not
    vectorised on CPU, ~25%); per optimizer step, one all-reduce of ``world_size`` integers.
    A sum is non-finite whenever one of its terms is, so a finite sum clears its gradient; a
    non-finite sum (a NaN/Inf, or finite values whose sum overflowed) is confirmed element by
    element before it counts, so there are no false alarms.
    """

    def __init__(self, check_loss: bool = True, check_gradients: bool = True, max_names: int = 5) -> None:
        self.max_names = positive_int("max_names", max_names)
        self.check_loss, self.check_gradients = bool(check_loss), bool(check_gradients)
        self._batch_idx: Optional[int] = None
        self._handles: list = []
        self._names: dict[Tensor, str] = {}
        self._reset()

    def _reset(self) -> None:
        # Since the last optimizer step: losses, and the sum of each gradient as last accumulated
        # (a NaN/Inf survives accumulation, so the last sum covers every micro-batch). Kept on the
        # device and judged once per step, so the hooks never wait for the accelerator.
        self._losses: list[Tensor] = []
        self._sums: dict[Tensor, Tensor] = {}

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._reset()
        if not self.check_gradients or _scaler_active(trainer):
            return
        # After the strategy's setup: these are the parameters (shards) that train.
        for name, param in pl_module.named_parameters():
            if param.requires_grad:
                self._names[param] = name
                self._handles.append(param.register_post_accumulate_grad_hook(self._gradient_ready))

    def _gradient_ready(self, param: Tensor) -> None:
        self._sums[param] = _sum(param.grad)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hooks()  # on_train_end does not run after an error (ours included)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._names = [], {}

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self.check_loss:
            self._losses.append(loss.detach())

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        losses, sums = self._losses, self._sums
        self._reset()
        if self._names:
            # A gradient that autograd did not accumulate (FSDP assigns the reduce-scattered shard
            # after backward, so no hook fires for it) is summed here, in a pass of its own.
            sums.update({p: _sum(p.grad) for p in self._names if p.grad is not None and p not in sums})
        bad_loss = bool(losses) and not bool(torch.isfinite(torch.stack([x.float() for x in losses])).all())
        bad_grads = self._confirmed(sums)
        verdict = _LOSS * bad_loss + _GRADIENT * bool(bad_grads)
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        verdicts = torch.zeros(world, dtype=torch.int32, device=trainer.strategy.root_device)
        verdicts[rank] = verdict
        if distributed and world > 1:
            dist.all_reduce(verdicts)  # every rank learns every verdict: all stop, or none
        if not verdicts.any():
            return
        mine = _describe_local(losses, bad_grads)
        every = [None] * world
        if distributed and world > 1:  # the failure path only: names for the message
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        raise self._error(trainer, verdicts.tolist(), every)

    def _confirmed(self, sums: dict[Tensor, Tensor]) -> dict[str, float]:
        """Name → max |grad| of every gradient that really holds a NaN/Inf (one host sync per step)."""
        if not sums:
            return {}
        params = list(sums)
        suspect = ~torch.isfinite(torch.stack(list(sums.values())))
        if not suspect.any():  # the common path
            return {}
        found = {}
        for param, flagged in zip(params, suspect.tolist()):
            if flagged and param.grad is not None:
                value = _max_abs([param.grad])[0].item()
                if not math.isfinite(value):  # else the sum of finite values overflowed: no alarm
                    found[self._names.get(param, "?")] = value
        return found

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


def _sum(grad: Tensor) -> Tensor:
    """Sum of a gradient, as float32: NaN or ±Inf if any element is (or if finite ones overflow)."""
    values = grad.coalesce().values() if grad.is_sparse else local(grad)  # FSDP: this rank's part
    return values.sum(dtype=torch.float32) if values.element_size() < 4 else values.sum().float()


def _max_abs(grads: list[Tensor]) -> Tensor:
    """max |g| of each gradient, as one float32 vector: inf or NaN exactly where g has one (the
    failure path: exact, and unlike a sum the max of finite values cannot overflow)."""
    values = [g.coalesce().values() if g.is_sparse else local(g) for g in grads]
    maxima = [v.abs().max() if v.numel() else v.new_zeros(()) for v in values]
    return torch.stack([m.float().reshape(()) for m in maxima])


def _describe_local(losses: list[Tensor], gradients: dict[str, float]) -> dict:
    """This rank's non-finite loss value and gradient names (the failure path: syncs freely)."""
    bad_loss = None
    for x in losses:
        flat = x.float().flatten()
        bad = flat[~torch.isfinite(flat)]
        if bad.numel():
            bad_loss = bad[0].item()
            break
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
