"""Guards that stop a distributed run cleanly instead of letting it write garbage or hang.

``NonFiniteGuard`` (a Lightning ``Callback``, added by ``PhantomStrategy`` unless
``detect_non_finite=False``) stops training when the loss or a gradient stops being
finite. After the last backward of a step, before any gradient is averaged, each rank
sums its losses and each of its gradients (``local_verdict``): a sum is non-finite whenever
one of its terms is. The strategy adds that one number per rank to the all-reduce of
replicated gradients it sends every step anyway, so every rank learns whether any rank saw
a NaN/Inf without a collective of its own. Every rank then raises the same
``NonFiniteError`` together, so none is left waiting in a collective, and the optimizer step
with the bad gradient never runs: the weights, and any checkpoint written after, stay those
of the last good step.

``is_peer_failure`` recognises the errors a collective raises when a peer died or hung
past the timeout; the strategy says so in words a user can act on (``peer_failure_message``).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_phantom._checks import positive_int
from lightning_phantom.ops.comm import local


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
        check_gradients: check the gradients of the parameters the optimizer steps.
            Skipped while a ``GradScaler`` is active (``precision="16-mixed"``): it expects inf
            gradients and skips those steps itself (on every rank, see ``strategy.precision``).
        max_names: parameters named per rank in the message (all are in ``error.tensors``).

    Cost per optimizer step: one ``sum`` per gradient (with ``data_parallel="ddp"``, one per
    bucket, taken in the buckets' own pass), one host sync, and under ``PhantomStrategy`` no
    collective of its own on the phantom axis: its verdict rides on the strategy's all-reduce
    of replicated gradients (with data-parallel replicas, plus the all-reduce of the step's
    three flags over the data axis, ``strategy.step``; under another strategy, one over the world). The sums are one
    streaming read of the gradients: ~1.3% of a CPU step at n = 4096 and 1.7-1.9% at n = 1024
    (``benchmarks/overheads.py``); ``torch._foreach_norm(inf)``, not vectorised on CPU, cost
    4-8x more. A sum is non-finite whenever one of its terms is, so a finite sum clears its
    gradient; a non-finite one (a NaN/Inf, or finite values whose sum overflowed) is confirmed
    element by element before it counts, so there are no false alarms.
    """

    def __init__(self, check_loss: bool = True, check_gradients: bool = True, max_names: int = 5) -> None:
        self.max_names = positive_int("max_names", max_names)
        self.check_loss, self.check_gradients = bool(check_loss), bool(check_gradients)
        self._batch_idx: Optional[int] = None
        self._names: dict[int, str] = {}  # id(parameter) -> its name in the module
        self._gradients = False  # check_gradients, and no GradScaler in charge of infs
        self._losses: list[Tensor] = []  # since the last optimizer step
        # This step's (sums, losses, parameter groups) as local_verdict took them, for the message.
        self._checked: Optional[tuple[Tensor, list[Tensor], list[list[Tensor]]]] = None
        self._agreed: Optional[Tensor] = None  # this step's verdict summed over every rank
        self._seen: list[tuple[list[Tensor], Tensor]] = []  # (params, sum) of buckets seen this step

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the strategy's setup: these are the parameters (shards) that train.
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._gradients = self.check_gradients and not _scaler_active(trainer)
        self._losses, self._checked, self._agreed, self._seen = [], None, None, []

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self.check_loss:
            self._losses.append(loss.detach())

    def local_verdict(self, optimizer) -> Tensor:
        """This rank's verdict on the coming step of ``optimizer``: 1.0 if a loss since the last
        step or one of its gradients is not finite, else 0.0 (a 0-d float32 tensor; no host sync).

        Take it after the last backward of the step and before any gradient is averaged, so
        that one rank's NaN is named on that rank only; sum it over every rank and hand the sum
        to ``agree``. ``PhantomStrategy`` does both; otherwise ``on_before_optimizer_step`` does.
        """
        seen, self._seen = self._seen, []
        covered = {id(p) for params, _ in seen for p in params}
        params = [[p] for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None and id(p) not in covered] if self._gradients else []
        losses, self._losses = self._losses, []
        values = [_sum(x) for x in losses] + [total for _, total in seen] + [_sum(p.grad) for p, in params]
        if values:
            sums = torch.stack(values)
        else:  # nothing to check: an empty vector where the parameters live
            devices = (p.device for group in optimizer.param_groups for p in group["params"])
            sums = torch.zeros(0, device=next(devices, None))
        self._checked = (sums, losses, [params for params, _ in seen] + params)
        return torch.isfinite(sums.sum()).logical_not().float()

    def observe_bucket(self, params: list[Tensor], values: Tensor) -> None:
        """Sum a data-parallel bucket of ``params``' gradients (divided by the replicas) before its
        all-reduce starts (``GradientBuckets.observe``); ``local_verdict`` then skips them."""
        if self._gradients:
            self._seen.append((params, _sum(values)))

    def agree(self, verdict: Tensor) -> None:
        """Take ``local_verdict`` summed over every rank (nonzero: some rank saw a NaN/Inf)."""
        self._agreed = verdict

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        verdict, self._agreed = self._agreed, None
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if verdict is None:  # not under PhantomStrategy: check and agree here
            verdict = self.local_verdict(optimizer)
            if distributed:
                dist.all_reduce(verdict)
        checked, self._checked = self._checked, None
        if not verdict.item():  # the common path
            return
        mine = self._describe_local(*checked) if checked is not None else {}
        every = [None] * dist.get_world_size() if distributed else [mine]
        if distributed:  # the failure path only: what each rank found, for the message
            dist.all_gather_object(every, mine)
        if any(every):
            raise self._error(trainer, every)
        # else: finite values whose sum overflowed; nothing to stop for

    def _describe_local(self, sums: Tensor, losses: list[Tensor], params: list[list[Tensor]]) -> dict:
        """This rank's non-finite loss and gradients, confirmed element by element ({} if none).

        ``sums`` holds one value per loss, then one per group of ``params`` (a bucket, or one).
        """
        found: dict = {}
        flagged = (~torch.isfinite(sums)).tolist()
        for x, bad in zip(losses, flagged):
            if bad:
                flat = x.float().flatten()
                values = flat[~torch.isfinite(flat)]
                if values.numel():
                    found["loss"] = values[0].item()
                    break
        gradients = []
        for group, bad in zip(params, flagged[len(losses):]):
            for param in group if bad else []:
                value = _max_abs(param.grad).item() if param.grad is not None else 0.0
                if not math.isfinite(value):  # else the sum of finite values overflowed: no alarm
                    gradients.append((self._names.get(id(param), "?"), value))
        if gradients:
            found["gradients"] = gradients
        return found

    # ---------------------------------------------------------------- message
    def _error(self, trainer: "pl.Trainer", every: list[dict]) -> NonFiniteError:
        step = trainer.global_step
        ranks = [r for r, found in enumerate(every) if found]
        tensors: dict[int, list[str]] = {}
        lines = []
        for r in ranks:
            found = every[r]
            what = [f"loss = {found['loss']}"] if "loss" in found else []
            grads = found.get("gradients", [])
            if grads:
                shown = ", ".join(f"{name} (max |grad| = {value})" for name, value in grads[:self.max_names])
                more = f" and {len(grads) - self.max_names} more" if len(grads) > self.max_names else ""
                what.append(f"gradient of {shown}{more}")
            tensors[r] = (["loss"] if "loss" in found else []) + [name for name, _ in grads]
            lines.append(f"  rank {r}: " + "; ".join(what))
        kinds = " and ".join(kind for kind, key in (("loss", "loss"), ("gradient", "gradients"))
                             if any(key in found for found in every if found))
        batch = "" if self._batch_idx is None else f", batch {self._batch_idx}"
        where = f"global step {step} (epoch {trainer.current_epoch}{batch})"
        message = (
            f"Non-finite {kinds} at {where} on rank(s) {', '.join(map(str, ranks))} of {len(every)}:\n"
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
    """Sum of a tensor, in float32 at least: NaN or ±Inf if any element is (or if finite ones overflow)."""
    if type(grad) is Tensor and grad.layout == torch.strided and grad.dtype in _WIDE:  # the common case
        return grad.sum()
    values = grad.coalesce().values() if grad.is_sparse else local(grad)  # FSDP: this rank's part
    return values.sum(dtype=torch.float32) if values.element_size() < 4 else values.sum()


_WIDE = (torch.float32, torch.float64)


def _max_abs(grad: Tensor) -> Tensor:
    """max |g| as float32: inf or NaN exactly where g has one (the failure path: exact, and unlike
    a sum the max of finite values cannot overflow)."""
    values = grad.coalesce().values() if grad.is_sparse else local(grad)
    return values.abs().max().float() if values.numel() else values.new_zeros((), dtype=torch.float32)


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


def peer_failure_message(exception: BaseException, rank: int, world_size: int, timeout: Optional[timedelta],
                         step: Optional[int]) -> Optional[str]:
    """What to log when ``exception`` is a collective that failed for a peer (``is_peer_failure``); else None."""
    if not is_peer_failure(exception):
        return None
    at = f" at global step {step}" if step is not None else ""
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "torch's default"
    first_line = (str(exception).strip().splitlines() or [""])[0]
    return (
        f"PhantomStrategy: rank {rank} of {world_size} stopped{at}: a collective with the other ranks failed "
        f"({type(exception).__name__}: {first_line}). Another rank died or stopped answering (collective "
        f"timeout {limit}). Training since the last checkpoint is lost: restart with ckpt_path='last' on the "
        "same number of ranks, or on fewer after lightning_phantom.reshard_checkpoint()."
    )
