"""The app's two small Trainer callbacks: progress lines, and a validation after the last step.

``ProgressLog`` prints one line every ``every`` training steps on global rank 0 (step, loss, time
per step, ETA) and one per validation; ``quiet=true`` leaves it out. It writes lines rather than
drawing a bar so that the output reads the same in a terminal, a CI log and the ``run.log`` that
``compare`` keeps (which relays these lines as they come).

``ValidateAtEnd`` makes every run end with a validation, however short: with
``val_check_interval: 50`` a 30-step run would otherwise never validate, and its val loss and
energy to target would stay empty.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _last_step(trainer) -> int:
    """The global step training ends at: ``max_steps``, or the steps of ``max_epochs`` epochs."""
    return int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)


class ProgressLog(Callback):
    """One line per ``every`` training steps (``None``: about ten a run, and one at least every
    ``HEARTBEAT_S`` seconds) and one per validation.

    Lines start with ``prefix`` (the app uses the strategy, ``"phantom: "``), which is how
    ``compare`` tells them from the rest of a run's output.
    """

    # A long run still says how it is doing every minute; and ``compare`` takes a run that prints
    # nothing for its compare.timeout_s for a hung one.
    HEARTBEAT_S = 60.0

    def __init__(self, every: Optional[int] = None, prefix: str = "", stream=None) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"progress_every must be a positive integer or 'auto', got {every!r}")
        self.every, self.prefix, self.stream = every, prefix, stream
        self._every, self._last, self._t0, self._printed_at = 1, 0, 0.0, 0.0

    def _print(self, line: str) -> None:
        self._printed_at = time.perf_counter()
        print(self.prefix + line, file=self.stream or sys.stdout, flush=True)

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._last = _last_step(trainer)
        self._every = self.every or max(1, self._last // 10)
        self._t0, self._first = time.perf_counter(), trainer.global_step
        self._printed_at = self._t0

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        now = time.perf_counter()
        due = (step % self._every == 0 or step == self._last
               or (self.every is None and now - self._printed_at >= self.HEARTBEAT_S))
        if not trainer.is_global_zero or not due:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        per_step = (now - self._t0) / max(1, step - self._first)
        eta = f", ETA {_duration(per_step * (self._last - step))}" if step < self._last else ""
        ms = 1e3 * per_step
        shown = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
        self._print(f"step {step}/{self._last}, loss {float(loss):.4g}, {shown} ms/step{eta}")

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no val_* metric logged"
        self._print(f"validation at step {trainer.global_step}: {shown}")


class ValidateAtEnd(Callback):
    """Validate after the last training step when ``val_check_interval`` would not.

    Setting ``trainer.should_stop`` after the last step is Lightning's own way (early stopping
    uses it) to ask the epoch loop for one more validation before it ends; a run whose last
    step is a validation step anyway validates once.
    """

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._last = _last_step(trainer)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self._last:
            trainer.should_stop = True
