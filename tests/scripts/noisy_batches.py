"""A user's program whose Dataset adds fresh noise in ``__getitem__``, loaded by DataLoader workers.

Run by tests/test_batches.py as ``python noisy_batches.py`` (Lightning's launcher starts the
second rank): ``seed_everything(workers=True)``, two DataLoader workers, one phantom group of
two ranks. Every rank prints ``rank R step S batch DIGEST`` for each training batch: the ranks
of one phantom group must print the same digests, and the run must end with ``rank R done``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

import lightning_phantom as lp
from train import Regression, dataset, say  # this script's folder is first on sys.path


class Noisy(Dataset):
    """Rows of the teacher data set plus noise drawn in the worker (random augmentation)."""

    def __init__(self) -> None:
        self.x, self.y = dataset(64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


class Digests(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = " ".join(f"{v:.6f}" for v in batch[0].sum(1).tolist()[:4])
        say(f"rank {trainer.global_rank} step {trainer.global_step} batch {digest}")


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(phantom_parallel_size=2),
                        max_steps=3, callbacks=[Digests()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(), DataLoader(Noisy(), batch_size=8, num_workers=2))
    say(f"rank {trainer.global_rank} done")


if __name__ == "__main__":
    main()
