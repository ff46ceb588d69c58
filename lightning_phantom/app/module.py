"""The app's LightningModule: one FFN, whatever the strategy does with it.

``self.net`` is a plain ``nn.Sequential`` (Linear, activation, …, Linear) built densely in
``__init__`` from the seed, so every strategy starts from the same dense model:

* ``strategy="phantom"``: ``PhantomStrategy`` replaces ``net`` after ``configure_model`` by
  this rank's ``PhantomFFN`` (``init="svd"``: the closest phantom model to the dense init).
* ``ModelParallelStrategy`` (the tensor-parallel baseline): ``configure_model`` shards ``net``
  Megatron-style with ``parallelize_ffn`` over the mesh's ``"tensor_parallel"`` dimension.
* DDP / one device: ``net`` as it is.

Either way the net's output is the full tensor on every rank, so the loss and metrics are
written once, as for a single device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_phantom.nn.layers import ACTIVATIONS

TASKS = ("regression", "classification")


def build_ffn(input_size: int, output_size: int, width: int, depth: int, activation: str) -> nn.Sequential:
    """Linear(input, width), ``depth`` × Linear(width, width), Linear(width, output), activations between."""
    sizes = [input_size] + [width] * (depth + 1) + [output_size]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def ffn_sizes(input_size: int, output_size: int, width: int, depth: int) -> list[int]:
    """``sizes`` of the FFN in the notation of the cost model: [d_in, n, …, n, d_out]."""
    return [input_size] + [width] * (depth + 1) + [output_size]


class FFNModule(pl.LightningModule):
    """An FFN regressor (MSE) or classifier (cross-entropy, accuracy) trained with Adam.

    Args:
        input_size, output_size: features in; targets (regression) or classes out.
        task: ``"regression"`` or ``"classification"``.
        width: hidden width n; depth: hidden n → n layers (the phantom layers), >= 0.
        activation: a name from ``lightning_phantom.nn.layers.ACTIVATIONS``.
        lr, weight_decay: Adam's.
        fused: fused Adam (one pass per parameter), several times faster than the default on CPU.
        compile: ``torch.compile`` the FFN once it is sharded, for strategy=tp here (after
            ``parallelize_ffn``); strategy=phantom compiles its shards itself (``PhantomStrategy(compile=)``,
            which ``conf/strategy/phantom.yaml`` ties to this setting), so ``model.compile=true``
            compiles either side of a comparison.
    """

    def __init__(self, input_size: int, output_size: int, task: str = "regression", width: int = 512,
                 depth: int = 4, activation: str = "relu", lr: float = 1e-3, weight_decay: float = 0.0,
                 fused: bool = True, compile: bool = False) -> None:
        super().__init__()
        for name, value, low in (("input_size", input_size, 1), ("output_size", output_size, 1),
                                 ("width", width, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"model.{name} must be an integer >= {low}, got {value!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if task == "classification" and output_size < 2:
            raise ValueError(f"a classifier needs output_size >= 2 classes, got {output_size}")
        self.save_hyperparameters()
        self.task = task
        self.sizes = ffn_sizes(input_size, output_size, width, depth)
        self.net = build_ffn(input_size, output_size, width, depth, activation)
        if task == "classification":
            from torchmetrics.classification import MulticlassAccuracy

            self.train_acc = MulticlassAccuracy(num_classes=output_size)
            self.val_acc = MulticlassAccuracy(num_classes=output_size)

    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy):
            return  # PhantomStrategy converts (and compiles) `net` itself after this hook; DDP keeps it dense
        from torch.distributed.tensor import DTensor

        from lightning_phantom.app.tensor_parallel import parallelize_ffn

        if any(isinstance(p, DTensor) for p in self.net.parameters()):
            return  # already sharded by an earlier fit/validate
        parallelize_ffn(self.net, self.device_mesh["tensor_parallel"])
        if self.device_mesh["data_parallel"].size() > 1:
            # Replicas of the TP model keep their gradients in step through FSDP2 over the data
            # dimension, as Lightning's tensor-parallel examples do (TP inside, FSDP across).
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])
        if self.hparams.compile:
            from lightning_phantom.nn.compiling import compile_options

            self.net.compile(**compile_options(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.task == "regression":
            return F.mse_loss(out, y)
        loss = F.cross_entropy(out, y)
        acc = self.train_acc if stage == "train" else self.val_acc
        acc(out.detach(), y)
        self.log(f"{stage}_acc", acc, on_step=stage == "train", on_epoch=stage == "val", sync_dist=False)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, "train")
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self._loss(batch, "val")
        # Averaged over data-parallel replicas (the strategies reduce over them); ranks of a
        # phantom or tensor-parallel group hold the same value.
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                fused=True if hp.fused else None)
