"""NonFiniteGuard on one process: what its cheap per-gradient sums catch, and what they must not."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

import lightning_phantom as lp


class Planted(L.LightningModule):
    """A finite loss whose gradient for ``w`` at batch i is ``grads[i]`` (a tensor hook plants it)."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.other = nn.Parameter(torch.ones(3))
        self.batch_idx = 0
        self.w.register_hook(lambda grad: grads[min(self.batch_idx, len(grads) - 1)].clone())

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        return self.w.sum() + (self.other * batch[0][0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: only the guard can stop a step


def fit(grads, steps: int, guard):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(steps, 3)), batch_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[guard], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Planted(grads), data)
    return trainer


def test_finite_gradients_whose_sum_overflows_are_no_alarm():
    big = torch.full((4,), 3e38)  # each element finite; their float32 sum is inf
    assert not torch.isfinite(big.sum())
    guard = lp.NonFiniteGuard()
    assert fit([big], steps=3, guard=guard).global_step == 3


@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (float("-inf"), "inf")])
def test_non_finite_gradient_stops_before_the_step_and_names_it(bad, shown):
    guard = lp.NonFiniteGuard()
    with pytest.raises(lp.NonFiniteError) as info:
        fit([torch.ones(4), torch.full((4,), 3e38), torch.tensor([1.0, bad, 2.0, 3.0])], steps=5, guard=guard)
    error = info.value
    assert error.step == 2 and error.ranks == [0] and error.tensors == {0: ["w"]}
    assert "Non-finite gradient at global step 2 (epoch 0, batch 2) on rank(s) 0 of 1" in str(error)
    assert f"gradient of w (max |grad| = {shown})" in str(error)


def test_gradients_unchecked_when_asked():
    # Step 0's NaN gradient passes unchecked into SGD (0 * NaN = NaN); step 1's loss is caught.
    with pytest.raises(lp.NonFiniteError) as info:
        fit([torch.full((4,), float("nan"))], steps=3, guard=lp.NonFiniteGuard(check_gradients=False))
    assert info.value.step == 1 and info.value.tensors == {0: ["loss"]}
