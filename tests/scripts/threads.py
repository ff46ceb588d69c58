"""Two ranks of ``strategy="phantom"`` through Lightning's own launcher print the threads each uses.

Run with no OMP_NUM_THREADS in the environment (``tests/test_strategy.py``): every rank should take
its share of the cores, as Lightning gives DDP's ranks.
"""

import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_phantom  # noqa: F401  registers strategy="phantom"


class Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            # One write of the whole line: the two ranks share stdout (print writes the text and its
            # newline apart, so the lines could interleave).
            os.write(1, f"rank {self.global_rank} threads {torch.get_num_threads()}\n".encode())
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    assert "OMP_NUM_THREADS" not in os.environ
    L.seed_everything(0)  # the same data on both ranks
    L.Trainer(accelerator="cpu", devices=2, strategy="phantom", max_steps=1, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(
        Probe(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
