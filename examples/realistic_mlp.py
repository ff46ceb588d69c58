"""An MLP as people write it — LayerNorm, GELU, dropout, nested blocks — trained with strategy="phantom".

    python examples/realistic_mlp.py                  # 2 CPU processes, ~1 min
    python examples/realistic_mlp.py --devices 4 --width 256 --ghosts full

The module below is plain PyTorch: nothing from lightning_phantom in it. ``strategy="phantom"``
finds ``self.mlp`` (a Sequential of blocks), shards its Linear layers, its LayerNorms (one
all-reduce of 2 numbers per row each) and its dropout (each rank drops its own neurons), and
keeps the input LayerNorm and the output dropout replicated. The same model, from the same seed,
is also trained densely on one process with a plain PyTorch loop, and the two losses are
printed side by side.
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_phantom as lp

D_IN, D_OUT = 32, 8


def block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU(), nn.Dropout(dropout))


class MLP(L.LightningModule):
    def __init__(self, width: int = 128, depth: int = 3, dropout: float = 0.1, lr: float = 3e-3):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(D_IN),
            block(D_IN, width, dropout),
            *[block(width, width, dropout) for _ in range(depth - 1)],
            nn.Linear(width, D_OUT),
        )
        self.lr = lr

    def forward(self, x):
        return self.mlp(x)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def data(n: int, seed: int) -> TensorDataset:
    """Samples (drawn with ``seed``) of one smooth teacher function, with noise."""
    teacher = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(D_IN, 64, generator=teacher) / D_IN ** 0.5, torch.randn(64, D_OUT, generator=teacher) / 8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return TensorDataset(x, torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, D_OUT, generator=g))


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def train_dense(model: MLP, loader: DataLoader, steps: int) -> list[float]:
    """The same model and batches on one process, plain PyTorch."""
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    while len(losses) < steps:
        for x, y in loader:
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (the phantom group)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3, help="blocks of Linear, LayerNorm, GELU, Dropout")
    parser.add_argument("--ghosts", default="auto", help="'auto', 'full' or ghosts per rank and layer")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    ghosts = args.ghosts if args.ghosts in ("auto", "full") else int(args.ghosts)

    L.seed_everything(0, verbose=False)
    model = MLP(args.width, args.depth)
    dense = copy.deepcopy(model)  # the same initial weights, before sharding
    train, val = data(4096, 1), data(1024, 2)
    recorder = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=lp.PhantomStrategy(ghosts=ghosts),
                        max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    # shuffle=False: the dense loop below sees the same batches (data-parallel size 1 here).
    trainer.fit(model, DataLoader(train, batch_size=64))
    x, y = val.tensors
    model.eval()
    with torch.no_grad():  # every rank runs the sharded model: its forward has collectives
        phantom_val = F.mse_loss(model(x), y).item()
    exported = lp.to_dense(model).eval()  # a collective too
    if not trainer.is_global_zero:
        return
    torch.manual_seed(0)
    dense_losses = train_dense(dense, DataLoader(train, batch_size=64), args.steps)
    dense.eval()
    with torch.no_grad():
        dense_val = F.mse_loss(dense(x), y).item()
        exported_val = F.mse_loss(exported(x), y).item()
    print(f"phantom layout {trainer.strategy.layout}: mlp -> {trainer.strategy.converted_modules['mlp']}")
    print(f"{'step':>6} {'phantom loss':>13} {'dense loss':>11}")
    for step in sorted({0, *range(9, args.steps, max(1, args.steps // 8)), args.steps - 1}):
        print(f"{step + 1:>6} {recorder.losses[step]:>13.5f} {dense_losses[step]:>11.5f}")
    print(f"validation MSE: phantom {phantom_val:.5f} (its to_dense export {exported_val:.5f}), "
          f"dense {dense_val:.5f}")


if __name__ == "__main__":
    main()
