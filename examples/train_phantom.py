"""Train an FFN with phantom parallelism from plain Python — no Hydra — and measure its energy.

    python examples/train_phantom.py                     # 2 CPU processes, ~30 s
    python examples/train_phantom.py --devices 4 --width 1024 --ghosts 16 --steps 500

``Trainer(strategy="phantom")`` (registered by ``import lightning_phantom``) splits the module's
``nn.Sequential`` FFN over the processes after ``configure_model``; ``EnergyMonitor`` logs joules
per step and records the energy and time to reach the target validation loss. Lightning's
launcher re-runs this script in each further process. At the end every rank writes its shard
of the model into one checkpoint directory, ``<out>/phantom.ckpt``, which
``examples/serve_dense.py`` turns into a dense model served on one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

import lightning_phantom as lp
from lightning_phantom.app.data import TeacherDataModule
from lightning_phantom.app.module import FFNModule


def train(devices: int = 2, width: int = 256, depth: int = 3, ghosts="auto", steps: int = 200,
          lr: float = 1e-3, target_loss: float = 0.2, out: str = "runs/train_phantom",
          checkpoint: bool = True):
    """Fit on the teacher data set; returns (trainer, model, energy monitor)."""
    L.seed_everything(0, verbose=False)  # the same dense init on every rank, then sharded
    data = TeacherDataModule(batch_size=64)
    model = FFNModule(input_size=data.input_size, output_size=data.output_size, width=width, depth=depth,
                      lr=lr)
    monitor = lp.EnergyMonitor(meter="auto", target={"monitor": "val_loss", "value": target_loss})
    strategy = "phantom" if ghosts == "auto" else lp.PhantomStrategy(ghosts=ghosts)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        val_check_interval=min(50, steps), check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, callbacks=[monitor], default_root_dir=out, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    if checkpoint:
        # A directory: each rank's shard (torch.distributed.checkpoint) plus meta.pt (hyper-parameters).
        trainer.save_checkpoint(Path(out) / "phantom.ckpt")
    return trainer, model, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (the phantom group)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3, help="hidden width -> width (phantom) layers")
    parser.add_argument("--ghosts", default="auto",
                        help="ghosts per rank and layer, or 'auto' (min(32, width/p))")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--target-loss", type=float, default=0.2)
    parser.add_argument("--out", default="runs/train_phantom")
    args = parser.parse_args()
    ghosts = args.ghosts if args.ghosts in ("auto", "full") else int(args.ghosts)
    trainer, model, monitor = train(args.devices, args.width, args.depth, ghosts, args.steps,
                                    target_loss=args.target_loss, out=args.out)
    if trainer.is_global_zero:
        print(f"phantom layout: {trainer.strategy.layout}; {trainer.strategy.converted_modules['net']}")
        val_loss = float(trainer.callback_metrics["val_loss"])
        print(f"final val_loss {val_loss:.6g} at step {trainer.global_step}")
        summary = monitor.summary()
        print(f"energy ({summary['meter']}): {summary['total_J']:.4g} J in {summary['steps']} steps; "
              f"to val_loss <= {args.target_loss}: {summary['energy_to_target'] or 'not reached'}")
        print(f"checkpoint: {Path(args.out) / 'phantom.ckpt'}  (serve it: python examples/serve_dense.py "
              f"{Path(args.out) / 'phantom.ckpt'})")


if __name__ == "__main__":
    main()
