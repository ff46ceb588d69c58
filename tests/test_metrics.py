"""torchmetrics and self.log(sync_dist=True) on data(2) × phantom(2): each batch counted once."""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_phantom as lp
from conftest import run_ranks

N = 32


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        self.total = torchmetrics.SumMetric()  # Σ of the inputs' first feature
        self.rows = torchmetrics.SumMetric()
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.total.update(x[:, 0])
        self.rows.update(torch.tensor(float(len(x))))
        self.accuracy.update(self(x).argmax(-1), y)
        self.log("logged_rows", torch.tensor(float(len(x))), reduce_fx="sum", sync_dist=True)

    def on_validation_epoch_end(self):
        self.log("total", self.total.compute())
        self.log("rows", self.rows.compute())
        self.log("accuracy", self.accuracy.compute())

    def forward(self, x):
        return self.net(x)


def validate(devices: int, phantom: int):
    L.seed_everything(0)
    model = Classifier()
    strategy = lp.PhantomStrategy(phantom_parallel_size=phantom, ghosts="full") if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    out = trainer.validate(model, DataLoader(data(), batch_size=4), verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def test_sum_metric_on_data_by_phantom_equals_single_process():
    single = validate(1, 1)
    assert single["rows"] == single["logged_rows"] == N
    x, _ = data().tensors
    assert abs(single["total"] - x[:, 0].sum().item()) < 1e-4
    for r in run_ranks(4, validate, 4, 2):
        assert r["rows"] == r["logged_rows"] == N  # not 2N: the phantom replicas count once
        assert abs(r["total"] - single["total"]) < 1e-4
        assert abs(r["accuracy"] - single["accuracy"]) < 1e-6


def dense_copy_with_metrics():
    """to_dense of a module whose metrics the strategy pointed at its data-parallel group."""
    L.seed_everything(0)
    model = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(ghosts="full"),
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, DataLoader(data(), batch_size=4), verbose=False)
    synced = model.accuracy.process_group is not None
    dense = lp.to_dense(trainer.lightning_module)
    x, y = data().tensors
    with torch.no_grad():
        err = (dense(x) - model(x)).abs().max().item()
    dense.accuracy.reset()
    dense.accuracy.update(dense(x).argmax(-1), y)
    return synced, dense.accuracy.process_group, type(dense.net).__name__, err


def test_to_dense_of_a_module_with_metrics_is_a_model_for_one_process():
    for synced, group, net, err in run_ranks(2, dense_copy_with_metrics):
        assert synced  # the strategy set the metrics' process group: to_dense must not copy it
        assert group is None and net == "Sequential"
        assert err < 1e-5  # the same predictions
