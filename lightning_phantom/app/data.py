"""Data modules for the app (``conf/data``): both small, generated or bundled, no download.

* ``TeacherDataModule`` — regression: inputs x ~ N(0, I), targets from a fixed random dense
  teacher FFN (tanh), standardised per output, plus Gaussian noise. A wide student can fit
  it down to the noise floor (MSE ≈ ``noise²``), so a target loss is reachable and losses of
  different strategies compare on the same scale.
* ``DigitsDataModule`` — classification: scikit-learn's bundled 8×8 handwritten digits
  (1797 images, 10 classes), pixels scaled to [0, 1] and standardised.

Both build the same tensors on every rank from their own ``seed`` (independent of the run's
seed), so every strategy trains on the same data; Lightning's distributed sampler then
splits the batches over data-parallel replicas only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
    return value


def _task(name: str, task: str, expected: str) -> str:
    if task != expected:
        raise ValueError(f"the {name} data set is for {expected}, got data.task={task!r}; leave data.task as "
                         f"{expected!r} (the model's loss follows it)")
    return task


class _TensorDataModule(pl.LightningDataModule):
    """Train/validation tensors → shuffled train loader, ordered validation loader."""

    task: str

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size = _positive("batch_size", batch_size)
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _make(self) -> tuple[TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._make()

    def train_dataloader(self) -> DataLoader:
        # Lightning swaps the shuffling for a DistributedSampler (seed 0) under a distributed
        # strategy, over the data-parallel replicas: the ranks of a phantom or tensor-parallel
        # group see the same batch.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))


class TeacherDataModule(_TensorDataModule):
    """Regression targets made by a random dense teacher FFN; every size is configurable.

    Args:
        input_size, output_size: features in and targets out (the student's d_in and d_out).
        teacher_width, teacher_depth: the teacher's hidden width and number of hidden layers.
        train_size, val_size: rows generated for training and validation.
        noise: std of the Gaussian noise added to the standardised targets (the loss floor is
            about ``noise**2``).
        batch_size: rows per training step on each data-parallel replica.
        seed: of the teacher and its inputs.
    """

    def __init__(self, task: str = "regression", input_size: int = 32, output_size: int = 8,
                 teacher_width: int = 64, teacher_depth: int = 2, train_size: int = 8192,
                 val_size: int = 1024, noise: float = 0.05, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.task = _task("teacher", task, "regression")
        self.input_size = _positive("input_size", input_size)
        self.output_size = _positive("output_size", output_size)
        self.teacher_width = _positive("teacher_width", teacher_width)
        if isinstance(teacher_depth, bool) or not isinstance(teacher_depth, int) or teacher_depth < 0:
            raise ValueError(f"data.teacher_depth must be an integer >= 0, got {teacher_depth!r}")
        self.teacher_depth = teacher_depth
        self.train_size = _positive("train_size", train_size)
        self.val_size = _positive("val_size", val_size)
        if not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"data.noise must be a number >= 0, got {noise!r}")
        self.noise = float(noise)
        if self.train_size < self.batch_size:
            raise ValueError(f"data.train_size ({train_size}) is smaller than data.batch_size "
                             f"({batch_size}): not one full training batch")

    def teacher(self) -> nn.Sequential:
        """The fixed teacher FFN (the same for a given seed and sizes, on every rank and run)."""
        g = torch.Generator().manual_seed(self.seed)
        widths = [self.input_size] + [self.teacher_width] * (self.teacher_depth + 1) + [self.output_size]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(n_in, n_out)
            with torch.no_grad():
                # Unit-gain weights (std 1/sqrt(n_in)) and tanh keep every layer's output O(1), so
                # the targets depend on the input non-linearly but not chaotically.
                linear.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5)
                linear.bias.copy_(0.1 * torch.randn(n_out, generator=g))
            layers += ([nn.Tanh()] if i else []) + [linear]
        return nn.Sequential(*layers)

    def _make(self) -> tuple[TensorDataset, TensorDataset]:
        g = torch.Generator().manual_seed(self.seed + 1)
        rows = self.train_size + self.val_size
        x = torch.randn(rows, self.input_size, generator=g)
        with torch.no_grad():
            y = self.teacher()(x)
        train_y = y[: self.train_size]
        y = (y - train_y.mean(0)) / train_y.std(0).clamp_min(1e-6)
        y = y + self.noise * torch.randn(y.shape, generator=g)
        n = self.train_size
        return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8×8 digits: 64 features, 10 classes; a seeded train/validation split."""

    def __init__(self, task: str = "classification", input_size: int = 64, output_size: int = 10,
                 val_fraction: float = 0.2, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.task = _task("digits", task, "classification")
        if input_size != 64 or output_size != 10:
            raise ValueError(f"the digits data set has 64 inputs (8×8 pixels) and 10 classes; got "
                             f"data.input_size={input_size!r}, data.output_size={output_size!r}")
        self.input_size, self.output_size = input_size, output_size
        if not isinstance(val_fraction, float) or not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be a number between 0 and 1, got {val_fraction!r}")
        self.val_fraction = val_fraction

    def _make(self) -> tuple[TensorDataset, TensorDataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(x)))
        val, train = order[:n_val], order[n_val:]
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
        x = (x - mean) / std
        if len(train) < self.batch_size:
            raise ValueError(f"data.batch_size ({self.batch_size}) is larger than the {len(train)} training "
                             "images")
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
