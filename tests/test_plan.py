"""PhantomStrategy(plan=...): modules named by pattern, each with its own settings."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_phantom as lp
from lightning_phantom.nn.plan import PhantomPlan, plan_module
from conftest import run_ranks


def mlp(width: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Linear(6, width), nn.LayerNorm(width), nn.GELU()),
                         nn.Sequential(nn.Linear(width, width), nn.GELU()), nn.Linear(width, 6))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = mlp()

    def forward(self, x):
        return x + self.ffn(x)


class Encoder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Residual(), Residual()])
        self.head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        for layer in self.encoder:
            x = layer(x)
        return self.head(x)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_explicit_plan_names_modules_with_their_settings():
    plan = PhantomPlan(ghosts="full", modules={"encoder.*.ffn": {"ghosts": 2, "init": "random"},
                                               "head": {"overlap": False}})
    found = plan_module(Encoder(), plan, 2)
    assert [(f.name, f.ghosts, f.init, f.overlap) for f, _ in found.convert] == [
        ("encoder.0.ffn", (2,), "random", True), ("encoder.1.ffn", (2,), "random", True),
        ("head", (4,), "svd", False)]  # head: the request's ghosts="full", its own overlap


@pytest.mark.parametrize("entries, words", [
    ({"encoder.*.mlp": {}}, ["'encoder.*.mlp'", "matches no module", "fnmatch"]),
    ({"encoder.0": {}}, ["'encoder.0'", "Residual", "residual connection", "nn.Sequential inside it"]),
    ({"encoder.*.ffn": {}, "encoder.0.ffn": {}}, ["'encoder.0.ffn'", "matched by plan patterns"]),
    ({"encoder.0.ffn.0": {}}, ["'encoder.0.ffn.0'", "1 Linear"]),
    ({"head": {}, "head.*": {}},
     ["plan shards both 'head.0' and a module that contains it", "name one of them"]),
])
def test_bad_plan_for_the_model_is_a_clear_error(entries, words):
    with pytest.raises(ValueError) as err:
        plan_module(Encoder(), PhantomPlan(modules=entries), 2)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("entries, words", [
    ({"net": {"gohsts": 2}}, ["plan['net']", "gohsts", "ghosts"]),
    ({"net": {"init": "xavier"}}, ["init", "'xavier'"]),
    ({"net": {"ghosts": 0}}, ["ghosts", "0"]),
    ({}, ["non-empty mapping"]),
    ({1: {}}, ["plan keys are module-name patterns such as 'encoder.*.ffn', got 1"]),
    ({"net": {"overlap": "yes"}}, ["plan['net']['overlap'] must be True or False, got 'yes'"]),
])
def test_bad_plan_settings_fail_when_the_strategy_is_built(entries, words):
    with pytest.raises(ValueError) as err:
        lp.PhantomStrategy(plan=entries)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"ghosts": {1: 2}}, ["a ghosts mapping is keyed by module name", "got keys [1]"]),
    ({"ghosts": {"net": 2}, "plan": {"net": {}}},
     ["either in ghosts={name: ...} or in the plan's", "not both"]),
])
def test_per_module_ghosts_given_wrongly_fail_when_the_strategy_is_built(kwargs, words):
    with pytest.raises(ValueError) as err:
        lp.PhantomStrategy(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_an_explicit_plan_keeps_the_phantom_modules_it_names_and_takes_module_settings():
    from lightning_phantom.nn.plan import ModuleSettings

    model = Encoder()
    model.head = lp.PhantomFFN([6, 8, 8, 2], ghosts=2, shard=(0, 2))  # built by the user, this rank's shard
    layer = lp.PhantomTransformerEncoderLayer(8, 2, 16, ghosts=2, shard=(0, 2))
    model.stack = lp.PhantomTransformerEncoder(layer, 1)
    settings = ModuleSettings(2, "random", False)  # as well as a mapping
    found = plan_module(model, PhantomPlan(modules={"head": {}, "stack": {}, "encoder.0.ffn": settings}), 2)
    assert found.built == [("head", model.head)] and found.built_stacks == [("stack", model.stack)]
    converted = [(f.name, f.ghosts, f.init, f.overlap) for f, _ in found.convert]
    assert converted == [("encoder.0.ffn", (2,), "random", False)]


def fit_with_plan(entries):
    L.seed_everything(0)
    model = Encoder()
    dense = copy.deepcopy(model)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(plan=entries),
                        precision="64-true", logger=False, enable_progress_bar=False, enable_model_summary=False)
    x = torch.randn(5, 6, dtype=torch.float64)
    try:
        preds = torch.cat(trainer.predict(model, DataLoader(TensorDataset(x), batch_size=5)))
    except ValueError as e:
        return str(e)
    with torch.no_grad():
        err = (preds - dense.double()(x)).abs().max().item()
    return sorted(trainer.strategy.converted_modules), type(model.head).__name__, err


def test_plan_in_a_trainer():
    for converted, head, err in run_ranks(2, fit_with_plan, {"encoder.*.ffn": {"ghosts": "full"}}):
        assert converted == ["encoder.0.ffn", "encoder.1.ffn"]
        assert head == "Sequential"  # not named by the plan: stays dense
        assert err < 1e-10
    for message in run_ranks(2, fit_with_plan, {"decoder.*": {}}):
        assert "'decoder.*' matches no module" in message  # on every rank alike


# ------------------------------------------------- nn.Sequential subclasses (torchvision's MLP)
class MLP(nn.Sequential):
    """The shape of torchvision.ops.MLP (torchvision cannot be installed beside this torch): per hidden
    layer Linear, [norm], activation, Dropout; then Linear, Dropout. Its forward is nn.Sequential's."""

    def __init__(self, in_channels, hidden_channels, norm_layer=None, activation_layer=nn.ReLU, dropout=0.0):
        layers, in_dim = [], in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers.append(nn.Linear(in_dim, hidden_dim))
            if norm_layer is not None:
                layers.append(norm_layer(hidden_dim))
            layers += [activation_layer(), nn.Dropout(dropout)]
            in_dim = hidden_dim
        layers += [nn.Linear(in_dim, hidden_channels[-1]), nn.Dropout(dropout)]
        super().__init__(*layers)
        self.hidden_channels = list(hidden_channels)  # a user's attribute, which to_dense must keep


class Stage(nn.Sequential):  # a nested block of a user's class
    pass


class ResidualMLP(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class Vision(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.mlp = MLP(6, [8, 8, 8, 6], norm_layer=nn.LayerNorm, dropout=0.1)
        self.head = nn.Sequential(Stage(nn.Linear(6, 8), nn.GELU()), nn.Linear(8, 8), nn.GELU(),
                                  nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.mlp(x))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def sharded_and_given_back():
    L.seed_everything(0)
    model = Vision()
    dense = copy.deepcopy(model).double().eval()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lp.PhantomStrategy(ghosts="full"),
                        precision="64-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    x = torch.randn(5, 6, dtype=torch.float64)
    preds = torch.cat(trainer.predict(model, DataLoader(TensorDataset(x), batch_size=5)))
    back = lp.to_dense(trainer.lightning_module).eval()
    with torch.no_grad():
        want = dense(x)
        errors = [(preds - want).abs().max().item(), (back(x) - want).abs().max().item()]
    return (sorted(trainer.strategy.converted_modules), errors, type(back.mlp), back.mlp.hidden_channels,
            type(back.head[0]), list(back.state_dict()) == list(dense.state_dict()))


def test_sequential_subclasses_are_sharded_without_a_plan_and_given_back():
    for converted, errors, mlp, hidden, stage, keys in run_ranks(2, sharded_and_given_back):
        assert converted == ["head", "mlp"]  # found without a plan
        assert max(errors) < 1e-12  # ghosts="full": sharded and to_dense predict what the dense model does
        assert mlp is MLP and hidden == [8, 8, 8, 6]  # the user's class, with its own attribute
        assert stage is Stage and keys


def test_sequential_subclass_with_its_own_forward_is_refused_by_name():
    model = Vision()
    model.mlp = ResidualMLP(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    model.head = nn.Linear(6, 2)
    with pytest.raises(ValueError) as err:
        plan_module(model, PhantomPlan(), 2)
    for words in ("found nothing to shard", "mlp is ResidualMLP", "forward of its own", "Keep it dense",
                  "plan="):
        assert words in str(err.value)
    with pytest.raises(ValueError, match="'mlp', which cannot be sharded: mlp is ResidualMLP, an "
                                         "nn.Sequential"):
        plan_module(model, PhantomPlan(modules={"mlp": {}}), 2)
