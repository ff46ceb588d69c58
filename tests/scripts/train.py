"""A small phantom-parallel training job, run as a real program by tests/test_failures.py.

Launched as ``python train.py --devices 2`` (Lightning starts the other rank) or under
``torchrun``; ``--accelerator gpu`` runs it under NCCL (benchmarks/gpu_cluster_checks.py). Every rank prints ``rank R pid P step S loss L`` after each step, and with
``--out`` writes its final weights to ``OUT.rankR.pt``. Options inject the failures the
tests need: ``--kill-at`` (a power cut: SIGKILL to every process of the run),
``--crash-in-save`` (the same, in the middle of writing a checkpoint), ``--slow`` (time
for a test to kill a rank itself), ``--late`` (every rank but 0 starts late, as on a busy machine).

``job()`` is importable, so a test can run the very same job on conftest's rank pool.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_phantom as lp

D_IN, WIDTH, D_OUT = 6, 8, 4


def dataset(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(rows, D_IN, generator=g)
    teacher = torch.randn(D_IN, D_OUT, generator=g) / D_IN ** 0.5
    return x, torch.tanh(x @ teacher)


class Batches:
    """Shuffled batches for this rank's data-parallel replica, resumable mid-epoch.

    Lightning resumes a loader mid-epoch only through ``state_dict``/``load_state_dict``
    (otherwise it warns that results are unreliable). The position saved is the number of
    batches training has consumed, taken from the trainer: the loader itself runs one batch
    ahead (Lightning prefetches to know which batch is the last).
    """

    def __init__(self, rows: int, batch_size: int, phantom: Union[int, str]) -> None:
        self.x, self.y = dataset(rows)
        self.batch_size, self.phantom = batch_size, phantom
        self.trainer: Optional[L.Trainer] = None
        self._epoch, self._skip = 0, 0

    def _replica(self) -> tuple[int, int]:
        world, rank = dist.get_world_size(), dist.get_rank()
        phantom = self.trainer.strategy.layout.phantom if self.phantom == "auto" else self.phantom
        return rank // phantom, world // phantom

    def __len__(self) -> int:
        _, replicas = self._replica()
        return len(self.x) // (self.batch_size * replicas)

    def __iter__(self):
        replica, replicas = self._replica()
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1000 + epoch))
        mine = order[replica::replicas]
        skip, self._skip = self._skip, 0
        for b in range(skip, len(self)):
            rows = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[rows], self.y[rows]

    def state_dict(self) -> dict[str, int]:
        assert self.trainer is not None
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "consumed": consumed % len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._skip = state["epoch"], state["consumed"]


class Regression(L.LightningModule):
    def __init__(self, optimizer: str = "adam", lr: float = 0.02, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                                 nn.Linear(WIDTH, D_OUT))
        self.optimizer, self.lr = optimizer, lr
        self.drop = nn.Dropout(dropout) if dropout else None  # on the input: masks from torch's global RNG

    def forward(self, x):
        return self.net(self.drop(x) if self.drop is not None else x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.optimizer == "fused-adam")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def inf_gradient_on_rank_1(trainer: L.Trainer, model: Regression, step: int) -> None:
    """From now on, rank 1's gradient of ``net.2.compress`` (its own shard) is Inf at global step
    ``step``: a fault that one rank sees and the others do not."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if trainer.global_step == step and trainer.global_rank == 1:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    model.net[2].compress.register_hook(hook)


def say(line: str) -> None:
    """One write per line, so lines of ranks sharing a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _power_cut() -> None:
    """SIGKILL every process of this run at once, as a crashed node would stop them."""
    sys.stdout.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


class Steps(Callback):
    """Prints each step, records the losses (and outputs on fixed inputs), kills or slows the run on request."""

    def __init__(self, kill_at: Optional[int], slow: float, probe: Optional[torch.Tensor],
                 grads: bool = False) -> None:
        self.kill_at, self.slow, self.probe, self.grads = kill_at, slow, probe, grads
        self.losses: list[float] = []
        self.outputs: dict[int, torch.Tensor] = {}  # global step → model(probe), taken after that step
        self.stepped: list[dict[str, torch.Tensor]] = []  # (grads) each step's averaged gradients, whole

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads:  # after the data-parallel average, before clipping and the step
            self.stepped.append({n: _whole(p.grad).clone() for n, p in pl_module.named_parameters()})

    def _look(self, trainer, pl_module) -> None:
        if self.probe is not None:
            with torch.no_grad():
                self.outputs[trainer.global_step] = pl_module(self.probe.to(pl_module.device)).clone()

    def on_train_start(self, trainer, pl_module):
        self._look(trainer, pl_module)  # right after a resume: what the checkpoint computes
        group = dist.get_process_group_ranks(trainer.strategy.phantom_group)
        say(f"rank {trainer.global_rank} node {trainer.node_rank} phantom group {group} "
            f"layout {trainer.strategy.layout}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].item()
        self.losses.append(loss)
        self._look(trainer, pl_module)
        say(f"rank {trainer.global_rank} pid {os.getpid()} step {trainer.global_step} loss {loss:.6f}")
        if self.kill_at is not None and trainer.global_step == self.kill_at and trainer.global_rank == 0:
            _power_cut()
        if self.slow:
            time.sleep(self.slow)

    def on_exception(self, trainer, pl_module, exception):
        say(f"rank {trainer.global_rank} stopped by {type(exception).__name__} at {time.time():.2f}")


def _crash_in_save(trainer_box: list, step: int) -> None:
    """Kill the run right after the tensors of step ``step``'s ``last.ckpt`` are written.

    At that moment every rank's shards are on disk but the checkpoint's ``meta.pt`` is not:
    a ``last.ckpt`` overwritten in place would now hold this step's tensors with the previous
    save's step, loops and optimizer schedule. The strategy looks ``dcp.save`` up at call
    time, so patching it here works.
    """
    import torch.distributed.checkpoint as dcp

    original = dcp.save

    def save(*args: Any, **kwargs: Any):
        result = original(*args, **kwargs)
        target = str(kwargs.get("checkpoint_id") or getattr(kwargs.get("storage_writer"), "path", ""))
        if trainer_box and trainer_box[0].global_step == step and "last" in os.path.basename(target):
            say(f"rank {dist.get_rank()} crashing in the save of step {step}")
            dist.barrier()  # every rank has written its shards
            if dist.get_rank() == 0:
                _power_cut()
            time.sleep(60)
        return result

    dcp.save = save


def job(devices: int = 2, num_nodes: int = 1, phantom: Union[int, str] = 2, steps: int = 12, rows: int = 64,
        batch_size: int = 8, optimizer: str = "adam", lr: float = 0.02, ckpt_dir: Optional[str] = None,
        every: int = 3, resume: Optional[str] = None, timeout: float = 60.0, kill_at: Optional[int] = None,
        crash_in_save: Optional[int] = None, slow: float = 0.0, ghosts: Any = "auto",
        probe: bool = False, accelerator: str = "cpu", precision: str = "32-true", data_parallel: str = "ddp",
        clip: Optional[float] = None, accumulate: int = 1, dropout: float = 0.0,
        grads: bool = False, export: bool = False) -> dict[str, Any]:
    """Train; return this rank's final weights (whole), losses, (``probe``) outputs on fixed inputs by
    step, (``grads``) each step's averaged gradients, whole, (``export``) the largest difference between
    the trained model's outputs and those of its ``lp.to_dense`` export, and ``storage``: bytes of
    parameters and optimizer state this rank holds."""
    L.seed_everything(0, verbose=False)
    trainer_box: list = []
    if crash_in_save is not None:
        _crash_in_save(trainer_box, crash_in_save)
    steps_cb = Steps(kill_at, slow, dataset(rows)[0][:16] if probe else None, grads)
    callbacks: list[Callback] = [steps_cb]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every,
                                         save_top_k=-1, save_last=True))
    strategy = lp.PhantomStrategy(phantom_parallel_size=phantom, timeout=timedelta(seconds=timeout),
                                  ghosts=ghosts, data_parallel=data_parallel)
    trainer = L.Trainer(accelerator=accelerator, precision=precision, devices=devices, num_nodes=num_nodes,
                        strategy=strategy, max_steps=steps, callbacks=callbacks, gradient_clip_val=clip,
                        accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(ckpt_dir))
    trainer_box.append(trainer)
    model = Regression(optimizer, lr, dropout)
    loader = Batches(rows, batch_size, phantom)
    loader.trainer = trainer
    trainer.fit(model, loader, ckpt_path=resume)
    exported = None
    if export:  # a collective: every rank gets the dense model, whatever the data axis sharded
        x = dataset(rows)[0][:16]
        with torch.no_grad():
            exported = (lp.to_dense(model)(x) - model(x)).abs().max().item()
    return {"rank": trainer.global_rank, "losses": steps_cb.losses, "step": trainer.global_step,
            "export_error": exported,
            "state": {k: _whole(v).detach().cpu().clone() for k, v in model.state_dict().items()},
            "outputs": {step: out.cpu() for step, out in steps_cb.outputs.items()}, "grads": steps_cb.stepped,
            "storage": _storage(model, trainer.optimizers), "overlapped": strategy.data_axis.overlapped_steps}


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # a collective over the replicas


def _storage(model: nn.Module, optimizers) -> int:
    """Bytes of parameters and optimizer state held by this rank (its part of each DTensor)."""
    from lightning_phantom.ops.comm import local

    tensors = list(model.parameters())
    tensors += [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * t.element_size() for t in tensors)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--phantom", type=lambda v: v if v == "auto" else int(v), default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "fused-adam", "sgd"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--resume")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--crash-in-save", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--late", type=float, default=0.0)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.late and int(os.environ.get("LOCAL_RANK", "0")) > 0:  # Lightning's launcher started this rank
        say(f"rank {os.environ['LOCAL_RANK']} starts {args.late:g} s late")
        time.sleep(args.late)
    result = job(devices=args.devices, num_nodes=args.num_nodes, phantom=args.phantom, steps=args.steps,
                 optimizer=args.optimizer, lr=args.lr, ckpt_dir=args.ckpt_dir, every=args.every,
                 resume=args.resume, timeout=args.timeout, kill_at=args.kill_at,
                 crash_in_save=args.crash_in_save, slow=args.slow, probe=args.probe,
                 accelerator=args.accelerator, precision=args.precision)
    if args.out:
        torch.save(result, f"{args.out}.rank{result['rank']}.pt")
    say(f"rank {result['rank']} done at step {result['step']}")


if __name__ == "__main__":
    main()
