"""PhantomStrategy in a Lightning Trainer on gloo ranks (CPU): training, layout, checkpoints, clipping.

Each distributed test runs a module-level function on a pool of ranks that look like torchrun
children (conftest.run_ranks), so ``Trainer(devices=p, strategy=...)`` uses the existing
process group instead of launching processes.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_phantom as lp
import lightning_phantom.nn as lpnn
from lightning_phantom.strategy.layout import PhantomLayout
from conftest import run_ranks

N, D_IN, D_OUT = 64, 6, 4


def dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, D_IN, generator=g)
    teacher = torch.randn(D_IN, D_OUT, generator=g) / D_IN ** 0.5
    return TensorDataset(x, torch.tanh(x @ teacher))


def ffn(*widths: int) -> nn.Sequential:
    """A plain dense FFN: Linear, ReLU, Linear, ..., Linear."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Regression(L.LightningModule):
    """A plain user module: its own nn.Sequential, nothing from lightning_phantom inside."""

    def __init__(self, width: int = 8, optimizer: str = "sgd", lr: float = 0.1, head: bool = False,
                 scheduler: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, D_OUT))
        self.head = nn.Linear(D_OUT, D_OUT) if head else None  # replicated: not an FFN
        self.optimizer, self.lr, self.scheduler = optimizer, lr, scheduler

    def forward(self, x):
        y = self.net(x)
        return self.head(y) if self.head is not None else y

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        # Summed over replicas: the ranks of one phantom group compute one value, not p of them.
        self.log("replicas", torch.tensor(1.0), reduce_fx="sum", sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        kind = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        optimizer = kind(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(Callback):
    def __init__(self):
        self.losses, self.inputs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0][:, 0].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def make_trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False)
    return L.Trainer(**{**options, **kwargs})


def shard_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------ training


def plain_module_lifecycle():
    L.seed_everything(0)
    model = Regression(optimizer="adam", lr=0.03)
    loader = DataLoader(dataset(), batch_size=8)
    recorder = Recorder()
    trainer = make_trainer(devices=2, strategy="phantom", max_epochs=4, callbacks=[recorder])
    trainer.fit(model, loader)
    val = trainer.validate(model, loader, verbose=False)[0]["val_loss"]
    test = trainer.test(model, loader, verbose=False)[0]["test_loss"]
    x, y = dataset().tensors
    preds = torch.cat(trainer.predict(model, DataLoader(TensorDataset(x), batch_size=16)))
    dense = lp.to_dense(model)  # a collective: every rank gets the dense module
    with torch.no_grad():
        exported, distributed = dense(x), model(x)
    return {
        "strategy": type(trainer.strategy).__name__, "ffn": type(model.net).__name__,
        "dense_ffn": type(dense.net).__name__, "has_trainer": dense._trainer is not None,
        "converted": dict(trainer.strategy.converted_modules), "losses": recorder.losses,
        "val": val, "test": test, "preds": preds, "mse_of_preds": F.mse_loss(preds, y).item(),
        "export_err": (exported - distributed).abs().max(), "pred_err": (preds - distributed).abs().max(),
    }


def test_plain_module_trains_validates_tests_predicts_and_exports():
    assert "phantom" in StrategyRegistry  # registered by `import lightning_phantom`
    results = run_ranks(2, plain_module_lifecycle)
    for r in results:
        assert (r["strategy"], r["ffn"], r["dense_ffn"]) == ("PhantomStrategy", "PhantomFFN", "Sequential")
        assert not r["has_trainer"]
        assert list(r["converted"]) == ["net"]
        assert "(svd)" in r["converted"]["net"] and "vs TP" in r["converted"]["net"]  # the cost summary
        losses = r["losses"]
        assert len(losses) == 4 * N // 8
        assert sum(losses[-4:]) < 0.5 * sum(losses[:4])  # the loss falls
        assert r["preds"].shape == (N, D_OUT)  # predict returns full outputs, not shards
        assert r["pred_err"] < 1e-6 and r["export_err"] < 1e-5  # to_dense serves the same function
        # Every batch has 8 rows, so the mean of the batch losses is the MSE of the predictions.
        assert r["val"] == pytest.approx(r["mse_of_preds"], rel=1e-5)
        assert r["test"] == pytest.approx(r["val"], rel=1e-6)
    assert torch.equal(results[0]["preds"], results[1]["preds"])


def data_by_phantom_from_meta():
    L.seed_everything(0)
    strategy = lp.PhantomStrategy(phantom_parallel_size=2)
    recorder = Recorder()
    trainer = make_trainer(devices=4, strategy=strategy, max_steps=2, accumulate_grad_batches=2,
                           callbacks=[recorder])
    with trainer.init_module(empty_init=True):  # the dense weights are never materialised
        model = Regression(lr=0.5)
    assert all(p.is_meta for p in model.parameters())
    start = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            # A deep copy keeps (rank, size) but not the process group (layers.py): re-attach it.
            start["ffn"] = lpnn.set_group(copy.deepcopy(pl_module.net), trainer.strategy.phantom_group)

    trainer.callbacks.append(Snapshot())
    trainer.fit(model, DataLoader(dataset(), batch_size=4))
    initial = shard_state(start["ffn"])

    # The rows each replica saw, from Lightning's DistributedSampler rebuilt for both replicas.
    used = trainer.train_dataloader.sampler
    rows = [list(DistributedSampler(dataset(), num_replicas=used.num_replicas, rank=replica,
                                    shuffle=used.shuffle, seed=used.seed))
            for replica in range(used.num_replicas)]
    x, y = dataset().tensors
    # Reference: the same phantom model, stepped by the mean gradient over all the rows both
    # replicas saw in a step (2 micro-batches of 4 rows each), on this phantom group.
    ref = start["ffn"]
    for step in range(2):
        batch = [i for replica_rows in rows for i in replica_rows[8 * step:8 * step + 8]]
        ref.zero_grad()
        F.mse_loss(ref(x[batch]), y[batch]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    final = shard_state(model.net)
    return {
        "coords": strategy.layout.coordinates(dist.get_rank()),
        "sampler": strategy.distributed_sampler_kwargs,
        "mesh": strategy.device_mesh.mesh_dim_names, "summary": strategy.converted_modules["net"],
        "inputs": torch.cat(recorder.inputs), "sampled": x[rows[used.rank][:16], 0],
        "initial": initial, "final": final, "meta_left": any(p.is_meta for p in model.parameters()),
        "ref_err": max((final[k] - v).abs().max().item() for k, v in ref.state_dict().items()),
        "replicas": trainer.callback_metrics["replicas"].item(),
    }


def test_two_data_by_two_phantom_built_from_meta():
    results = run_ranks(4, data_by_phantom_from_meta)
    for rank, r in enumerate(results):
        assert r["coords"] == (rank // 2, rank % 2)
        assert r["sampler"] == {"num_replicas": 2, "rank": rank // 2}
        assert r["mesh"] == ("data_parallel", "phantom_parallel")
        assert r["replicas"] == 2  # self.log(sync_dist=True) reduces over the data-parallel group
        assert "random, from meta" in r["summary"] and not r["meta_left"]
        assert torch.equal(r["inputs"], r["sampled"])  # Lightning sampled by data-parallel rank and size
        assert r["ref_err"] < 1e-6  # the data-axis mean of gradients accumulated over 2 micro-batches
        assert any(not torch.equal(r["final"][k], v) for k, v in r["initial"].items())
    for a, b in ((0, 1), (2, 3)):  # a phantom group sees the same batches
        assert torch.equal(results[a]["inputs"], results[b]["inputs"])
    assert not torch.equal(results[0]["inputs"], results[2]["inputs"])  # replicas see different data
    for a, b in ((0, 2), (1, 3)):  # the replicas of a shard hold identical weights, at start and end
        for k in results[a]["final"]:
            assert torch.equal(results[a]["initial"][k], results[b]["initial"][k])
            assert torch.equal(results[a]["final"][k], results[b]["final"][k])
    assert not torch.equal(results[0]["final"]["2.compress"], results[1]["final"]["2.compress"])


def exact_conversion_in_float64():
    L.seed_everything(0)
    model = Regression()
    dense = copy.deepcopy(model.net).double()
    x = torch.randn(10, D_IN, dtype=torch.float64)
    strategy = lp.PhantomStrategy(ghosts="full", timeout=42)
    trainer = make_trainer(devices=2, strategy=strategy, precision="64-true")
    preds = torch.cat(trainer.predict(model, DataLoader(TensorDataset(x), batch_size=5)))
    timeouts = [group._get_backend(torch.device("cpu")).options._timeout  # gloo's own record
                for group in (strategy.phantom_group, strategy.data_parallel_group)]
    with torch.no_grad():
        return (preds - dense(x)).abs().max().item(), preds.dtype, model.net.ghosts, timeouts


def test_full_rank_ghosts_convert_exactly():
    for err, dtype, ghosts, timeouts in run_ranks(2, exact_conversion_in_float64):
        assert dtype == torch.float64 and ghosts == [4]  # "full": n/p = 8/2
        assert err < 1e-12
        assert timeouts == [timedelta(seconds=42)] * 2  # a dead peer ends a phantom collective too


class UserBuilt(Regression):
    """Builds its own PhantomFFN on the strategy's phantom group, next to dense FFNs left to the strategy."""

    def configure_model(self):
        if isinstance(self.net, lp.PhantomFFN):  # configure_model runs for every fit/validate/...
            return
        group = self.device_mesh["phantom_parallel"].get_group()
        self.net = self.built = lp.PhantomFFN([D_IN, 8, 8, D_OUT], ghosts=2, activation="tanh", group=group)
        self.aux = ffn(D_OUT, 8, 8, 8, D_OUT)
        self.tail = ffn(D_OUT, 8, 8, D_OUT)

    def forward(self, x):
        return self.tail(self.aux(self.net(x)))


def user_built_and_per_module_ghosts():
    L.seed_everything(0)
    model = UserBuilt(optimizer="adam", lr=0.01)
    strategy = lp.PhantomStrategy(ghosts={"aux": [1, 3]})
    trainer = make_trainer(devices=2, strategy=strategy, max_steps=3)
    trainer.fit(model, DataLoader(dataset(), batch_size=8))
    return (model.net is model.built, model.net.ghosts, model.aux.ghosts + model.tail.ghosts,
            strategy.converted_modules, trainer.callback_metrics["train_loss"].item())


def test_user_built_phantom_ffn_is_kept_and_ghosts_per_module():
    for kept, net_ghosts, other_ghosts, summaries, loss in run_ranks(2, user_built_and_per_module_ghosts):
        assert kept and net_ghosts == [2] and summaries["net"].startswith("user-built PhantomFFN")
        assert sorted(summaries) == ["aux", "net", "tail"]
        assert other_ghosts == [1, 3, 4]  # aux as asked; tail "auto" = min(32, 8/2)
        assert 0 <= loss < 10


# --------------------------------------------------------------------- checkpoints


def resume_matches_uninterrupted(tmp_dir: str):
    loader = DataLoader(dataset(), batch_size=8)  # 64 rows over 2 replicas: 4 steps per epoch
    L.seed_everything(0)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2), max_epochs=2,
                           callbacks=[recorder, checkpoint], enable_checkpointing=True)
    trainer.fit(Regression(optimizer="adam", lr=0.02, scheduler=True), loader)
    val = trainer.validate(trainer.lightning_module, loader, verbose=False)[0]["val_loss"]

    # The last checkpoint into a fresh model, for evaluation only (no optimizer state to load).
    trainer = make_trainer(devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2))
    val_loaded = trainer.validate(Regression(), loader, ckpt_path=os.path.join(tmp_dir, "epoch=1.ckpt"),
                                  verbose=False)[0]["val_loss"]
    try:  # shards of phantom groups of 2 cannot be loaded by groups of 4
        make_trainer(devices=4, strategy="phantom").validate(Regression(), loader,
                                                             ckpt_path=os.path.join(tmp_dir, "epoch=1.ckpt"))
        wrong_layout = None
    except ValueError as e:
        wrong_layout = str(e)

    torch.manual_seed(1)  # another initialisation (PL_GLOBAL_SEED, which seeds the sampler, stays 0)
    resumed = Recorder()
    trainer = make_trainer(devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2), max_epochs=2,
                           callbacks=[resumed])
    trainer.fit(Regression(optimizer="adam", lr=0.02, scheduler=True), loader,
                ckpt_path=os.path.join(tmp_dir, "epoch=0.ckpt"))
    return recorder.losses, resumed.losses, trainer.global_step, val, val_loaded, wrong_layout


def test_resume_from_sharded_checkpoint_continues_exactly(tmp_path):
    results = run_ranks(4, resume_matches_uninterrupted, str(tmp_path))
    for full, resumed, step, val, val_loaded, wrong_layout in results:
        assert len(full) == 8 and len(resumed) == 4 and step == 8
        assert resumed == pytest.approx(full[4:], rel=1e-6, abs=1e-7)  # Adam state, LR schedule, loops
        assert val_loaded == pytest.approx(val, rel=1e-6)
        assert "phantom groups of 2 ranks" in wrong_layout and "phantom(4)" in wrong_layout
    path = tmp_path / "epoch=0.ckpt"
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert meta["phantom"]["phantom_parallel"] == 2 and meta["global_step"] == 4
    metadata = FileSystemReader(str(path)).read_metadata()
    keys = set(metadata.state_dict_metadata)
    for rank in (0, 1):  # each phantom rank's shard of the model and of Adam's state, under its own key
        assert f"model::net.2.compress|phantom{rank}/2" in keys
        assert f"optimizer_0::net.2.decompress|phantom{rank}/2::exp_avg" in keys
    assert "model::net.4.bias" in keys  # replicated (row-parallel bias): one key
    written = [index.fqn for index in metadata.storage_data]
    assert len(written) == len(set(written))  # every tensor written once, not once per replica


def test_checkpoint_metadata_is_read_without_arbitrary_unpickling():
    from lightning_phantom.strategy.storage import _MetadataUnpickler

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load it"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Exploit()))).load()


# ------------------------------------------------------------------------ clipping


class ClipGrads(Callback):
    """Gradients before clipping (on_before_optimizer_step) and as the optimizer used them."""

    def __init__(self):
        self.before, self.after = [], []

    def on_train_start(self, trainer, pl_module):
        def post_step(optimizer, args, kwargs):  # the step leaves the (clipped) gradients as they were
            self.after.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

        trainer.optimizers[0].register_step_post_hook(post_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def clipped_gradients(max_norm: float):
    L.seed_everything(0)
    model = Regression(head=True)
    grads = ClipGrads()
    trainer = make_trainer(devices=4, strategy=lp.PhantomStrategy(phantom_parallel_size=2), max_steps=2,
                           precision="bf16-mixed", gradient_clip_val=max_norm, callbacks=[grads])
    trainer.fit(model, DataLoader(dataset(), batch_size=8))
    sharded = {n for n, p in model.named_parameters() if any(p is q for q in lpnn.sharded_parameters(model))}
    return grads.before, grads.after, sharded


def test_gradient_clipping_uses_the_norm_of_the_whole_model():
    max_norm = 0.05
    results = run_ranks(4, clipped_gradients, max_norm)
    sharded = results[0][2]
    assert sharded and "head.weight" not in sharded and "net.4.bias" not in sharded  # replicated ones
    for step in range(2):
        before = [results[rank][0][step] for rank in (0, 1)]  # phantom ranks 0 and 1 of replica 0
        # The model on one process: every phantom rank's shards and the replicated parameters
        # once, clipped by torch itself.
        one_process = {}
        for name, grad in before[0].items():
            for rank in ((0, 1) if name in sharded else (0,)):
                one_process[(rank, name)] = param = nn.Parameter(torch.zeros_like(grad))
                param.grad = before[rank][name].clone()
        total = torch.nn.utils.clip_grad_norm_(list(one_process.values()), max_norm)
        assert total > 2 * max_norm  # clipping is active
        for rank, (all_before, all_after, _) in enumerate(results):
            for name, grad in all_after[step].items():
                # Replicas hold the same (data-parallel mean) gradients, phantom ranks the same
                # replicated ones.
                assert torch.equal(all_before[step][name], before[rank % 2][name])
                expected = one_process[(rank % 2 if name in sharded else 0, name)].grad
                assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-9), name


# -------------------------------------------------------------------------- errors


def error_message(kind: str):
    L.seed_everything(0)
    model, strategy = Regression(), "phantom"
    if kind == "no_ffn":
        model.net = nn.Sequential(nn.Linear(D_IN, 8), nn.Softmax(-1), nn.Linear(8, 8), nn.Linear(8, D_OUT))
    elif kind == "indivisible":
        model = Regression(width=9)
    elif kind == "unknown_name":
        strategy = lp.PhantomStrategy(ghosts={"nett": 2})
    elif kind == "ghosts":
        strategy = lp.PhantomStrategy(ghosts=5)
    try:
        trainer = make_trainer(devices=2, strategy=strategy, max_steps=1)
        trainer.fit(model, DataLoader(dataset(), batch_size=8))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind, words", [
    ("no_ffn", ["nothing to shard", "net[1] is Softmax", "'ddp'"]),
    ("indivisible", ["nothing to shard", "hidden width 9", "not divisible by phantom(2)"]),
    ("ghosts", ["ghosts=5 is too large", "n_in/p = 8/2 = 4"]),
    ("unknown_name", ["['nett']", "['net']"]),
])
def test_model_errors_are_raised_on_every_rank(kind, words):
    for message in run_ranks(2, error_message, kind):  # every rank raises, none hangs
        assert message is not None
        for word in words:
            assert word in message


@pytest.mark.parametrize("kwargs, words", [
    (dict(phantom_parallel_size=0), ["phantom_parallel_size", "got 0"]),
    (dict(data_parallel_size="two"), ["data_parallel_size", "'two'"]),
    (dict(ghosts=0), ["ghosts must be", "got 0"]),
    (dict(ghosts=[2, -1]), ["ghosts must be"]),
    (dict(ghosts={"net": "many"}), ["ghosts must be"]),
    (dict(init="zeros"), ["init must be 'svd' or 'random'"]),
    (dict(timeout=-5), ["timeout must be positive"]),
    (dict(timeout="soon"), ["timeout must be a datetime.timedelta"]),
    (dict(setup_timeout=0), ["setup_timeout must be positive"]),
])
def test_bad_arguments_fail_in_the_constructor(kwargs, words):
    with pytest.raises(ValueError) as info:
        lp.PhantomStrategy(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("devices, kwargs, words", [
    (3, dict(phantom_parallel_size=2), ["world size (3) is not divisible by phantom(2)"]),
    (4, dict(data_parallel_size=3, phantom_parallel_size=2), ["data(3) * phantom(2) != world size (4)"]),
    (6, dict(data_parallel_size=4), ["world size (6) is not divisible by data(4)"]),
])
def test_layout_is_checked_before_processes_start(devices, kwargs, words):
    with pytest.raises(ValueError) as info:  # Trainer() itself raises: no process is launched yet
        make_trainer(devices=devices, strategy=lp.PhantomStrategy(**kwargs))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true", MixedPrecision("16-mixed", "cpu")])
def test_unsupported_precision_is_refused_before_processes_start(precision):
    options = {"plugins": [precision]} if isinstance(precision, MixedPrecision) else {"precision": precision}
    with pytest.raises(ValueError, match="does not support precision") as info:
        make_trainer(devices=2, strategy="phantom", **options)
    assert "'32-true', '64-true', 'bf16-mixed'" in str(info.value)


def test_defaults_and_layout_arithmetic():
    strategy = make_trainer(devices=4, strategy="phantom").strategy
    assert isinstance(strategy, lp.PhantomStrategy)
    assert (strategy.layout.data, strategy.layout.phantom) == (1, 4)  # "auto": one phantom group
    assert lp.PhantomStrategy(timeout=30)._timeout == timedelta(seconds=30)
    assert PhantomLayout.resolve("auto", 2, 8) == PhantomLayout(4, 2, 8)
    assert PhantomLayout.resolve(2, "auto", 8) == PhantomLayout(2, 4, 8)
    assert PhantomLayout.resolve(2, 4, 8).data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(RuntimeError, match="before processes have initialized"):
        strategy.device_mesh


def test_every_rank_lightnings_launcher_starts_takes_its_share_of_the_cores(tmp_path):
    """Lightning's launcher sets rank 0's threads only; the ranks it starts each took every core
    (on 2 cores, TP on 4 ranks ran 5x slower). Under PhantomStrategy every rank takes cores / ranks."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "threads.py"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    threads = dict(re.findall(r"rank (\d) threads (\d+)", out.stdout))
    assert threads == {"0": str(max(1, os.cpu_count() // 2)), "1": str(max(1, os.cpu_count() // 2))}, out.stdout


# --------------------------------------------------------------------- Lightning's collectives
class Gathers(Regression):
    """Gathers each replica's rows in training_step, as a user collecting predictions does."""

    def training_step(self, batch, batch_idx):
        self.mine = batch[0][:, 0]
        self.gathered = self.all_gather(self.mine)  # (replicas, rows): one copy per replica
        every = dist.new_group(list(range(dist.get_world_size())))  # every rank, when asked for by a group
        self.gathered_world = self.all_gather(batch[0][:, 0], group=every)
        return super().training_step(batch, batch_idx)


def lightnings_collectives():
    L.seed_everything(0)
    model, strategy = Gathers(), lp.PhantomStrategy(phantom_parallel_size=2)
    trainer = make_trainer(devices=4, strategy=strategy, max_steps=1)
    trainer.fit(model, DataLoader(dataset(), batch_size=8))
    data_rank = strategy.layout.coordinates(trainer.global_rank)[0]
    strategy.barrier("test")
    return {
        "mine": model.mine, "gathered": model.gathered, "world": model.gathered_world.shape,
        "data_rank": data_rank,
        "sum": strategy.reduce(torch.tensor(float(data_rank + 1)), reduce_op="sum").item(),  # 1 + 2, once each
        "plain": strategy.reduce(2.5),  # not a tensor: given back as it is
        "broadcast": strategy.broadcast({"from": trainer.global_rank}),
        "all": strategy.reduce_boolean_decision(trainer.global_rank != 3),
        "any": strategy.reduce_boolean_decision(trainer.global_rank == 3, all=False),
    }


def test_all_gather_and_reduce_run_once_per_replica_and_the_rest_over_every_rank():
    ranks = run_ranks(4, lightnings_collectives)
    replicas = [r["gathered"] for r in ranks]
    for r in ranks:
        assert r["gathered"].shape == (2, 8) and torch.equal(r["gathered"], replicas[0])
        assert r["world"] == (4, 8)
        assert r["sum"] == 3.0 and r["plain"] == 2.5 and r["broadcast"] == {"from": 0}
        assert r["all"] is False and r["any"] is True  # rank 3's vote counts
    # The two replicas saw different rows; each rank's own rows are its replica's entry.
    assert not torch.equal(replicas[0][0], replicas[0][1])
    for r in ranks:
        assert torch.equal(r["gathered"][r["data_rank"]], r["mine"])
