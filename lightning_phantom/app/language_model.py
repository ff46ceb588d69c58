"""The app's language model (``model=gpt``): the dense GPT of ``app/gpt.py``, trained on next-byte
prediction (``data=text``), whatever the strategy does with it.

``self.gpt`` is built densely in ``__init__`` from the run's seed, so every strategy starts from
the same dense model:

* ``PhantomStrategy``: replaces ``gpt.blocks`` after ``configure_model`` by this rank's phantom
  stack (``app/gpt_blocks.py`` registers the GPT's blocks as a stack kind; ``init="svd"``: the
  closest phantom stack to the dense init), and compiles each block with ``model.compile``.
* ``ModelParallelStrategy`` (the tensor-parallel baseline): ``configure_model`` lays the GPT out
  with ``parallelize_gpt`` (torchtitan's plan) over the mesh's ``"tensor_parallel"`` dimension,
  and FSDP2 over ``"data_parallel"`` where there are replicas, as torchtitan composes them; with
  ``compile`` each block is then compiled, as torchtitan compiles them.
* DDP / one device: the GPT as it is.

The loss is the mean cross-entropy per predicted byte in nats (``val_loss``); ``val_bpc`` is the
same in bits (÷ ln 2). With ``tp_head="vocab_parallel"`` the logits stay sharded over the
vocabulary and the loss, forward and backward, runs under DTensor's ``loss_parallel``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

import lightning_phantom.app.gpt_blocks  # noqa: F401  registers the GPT's blocks for strategy=phantom
from lightning_phantom.app.gpt import GPT
from lightning_phantom.app.tensor_parallel import GPT_HEADS, parallelize_gpt
from lightning_phantom.cost.gpt import GPTShape, gpt_cost


class GPTModule(pl.LightningModule):
    """A GPT (``app/gpt.py``) trained with AdamW on next-token cross-entropy.

    Args:
        vocab, context: tokens (the data's vocabulary) and the longest sequence.
        width, layers, heads, mlp_ratio, dropout: the GPT's (``app/gpt.py``); MLP width = mlp_ratio·width.
        lr, weight_decay: AdamW's. fused: fused AdamW (much faster on CPU).
        tp_head: under tensor parallelism, the head ``"replicated"`` (every rank computes all
            logits, no collective) or ``"vocab_parallel"`` (split over the vocabulary, ``loss_parallel``).
        compile: ``torch.compile`` each block once it is laid out, for strategy=tp here (after
            ``parallelize_gpt``); strategy=phantom compiles its blocks itself (``PhantomStrategy(compile=)``,
            which ``conf/strategy/phantom.yaml`` ties to this setting), so ``model.compile=true``
            compiles either side of a comparison.
    """

    loss_name = "cross-entropy, nats/char"

    def __init__(self, vocab: int = 256, context: int = 128, width: int = 128, layers: int = 2, heads: int = 4,
                 mlp_ratio: int = 4, dropout: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.0,
                 fused: bool = True, tp_head: str = "replicated", compile: bool = False) -> None:
        super().__init__()
        if tp_head not in GPT_HEADS:
            raise ValueError(f"model.tp_head must be one of {GPT_HEADS}, got {tp_head!r}")
        self.save_hyperparameters()
        self.gpt = GPT(vocab, width, layers, heads, mlp_ratio, context, dropout)
        self.shape = GPTShape(vocab, width, layers, heads, mlp_ratio * width, context)
        # The whole dense model, each parameter once (a phantom run counts its own: report.model_params).
        self.params_model = self.shape.params
        self.model_name = f"gpt d={width} L={layers} h={heads} f={mlp_ratio * width} T={context} V={vocab}"
        self._vocab_parallel = False

    @override
    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy):
            return  # DDP and one device train the dense GPT
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.gpt.parameters()):
            return  # already laid out by an earlier fit/validate
        parallelize_gpt(self.gpt, self.device_mesh["tensor_parallel"], self.hparams.tp_head)
        self._vocab_parallel = self.hparams.tp_head == "vocab_parallel"
        if self.device_mesh["data_parallel"].size() > 1:
            from torch.distributed.fsdp import fully_shard

            for block in self.gpt.blocks:  # one all-gather per block, as torchtitan wraps them
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.gpt, mesh=self.device_mesh["data_parallel"])
        if self.hparams.compile:
            from lightning_phantom.nn.compiling import compile_options

            for block in self.gpt.blocks:  # in place: the same modules and state-dict keys
                block.compile(**compile_options(True))

    def forward(self, tokens: torch.Tensor):
        return self.gpt(tokens)

    def _loss(self, batch) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        if not self._vocab_parallel:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():  # logits sharded over the vocabulary: the loss without gathering them
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss.to_local()  # replicated: the same scalar on every rank, differentiable

    @override
    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self._vocab_parallel:
            return super().backward(loss, *args, **kwargs)
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():  # loss_parallel's backward needs the context too
            super().backward(loss, *args, **kwargs)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self._loss(batch)
        # Averaged over data-parallel replicas (the strategies reduce over them); ranks of a
        # tensor-parallel group hold the same value. Every window has `context` targets, so the
        # mean over windows is the mean per character.
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_bpc", loss / math.log(2), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                 fused=True if hp.fused else None)

    def step_cost(self, scheme: str, group_size: int, input_shape, element_size: int,
                  stream_element_size: Optional[int] = None):
        """The cost model's figures for one training step on a batch of ``input_shape`` tokens:
        ``scheme`` "dense" (one whole model per rank), "tp" (``parallelize_gpt`` over ``group_size``) or
        "phantom" (the converted stack, with its ghosts); element sizes as ``gpt_cost`` takes them."""
        batch, seq = input_shape
        kw = {"element_size": element_size, "stream_element_size": stream_element_size}
        if scheme == "phantom":
            from lightning_phantom.nn.transformer import PhantomTransformerEncoder

            stack = self.gpt.blocks
            if not isinstance(stack, PhantomTransformerEncoder):
                raise TypeError(f"step_cost('phantom') needs the GPT's blocks converted by PhantomStrategy, found "
                                f"{type(stack).__name__}")
            return gpt_cost(self.shape, batch, seq, stack.shard.size, scheme="phantom", ghosts=stack.ghosts, **kw)
        p = group_size if scheme == "tp" else 1
        return gpt_cost(self.shape, batch, seq, p, self.hparams.tp_head, **kw)
