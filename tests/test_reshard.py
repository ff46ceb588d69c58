"""``reshard_checkpoint`` on FFNs as people write them: nested blocks of Linear, norms, activations, dropout.

A model with a replicated input LayerNorm and nested ``nn.Sequential`` blocks (one with named
children) holding LayerNorm, RMSNorm, BatchNorm1d (running statistics), GELU and Dropout is
trained under ``strategy="phantom"`` on 4 gloo ranks — phantom(4) with ``data_parallel="ddp"``,
and data(2) × phantom(2) with ``"fsdp"`` — and checkpointed. Each checkpoint is re-sharded and
resumed on fewer ranks: the resumed model computes what the saved one did (eval, and training
mode from the same RNG state: dropout masks and batch statistics), and training goes on.

The replicas see the same rows (no distributed sampler), so that their BatchNorm running
statistics agree and the one copy a checkpoint keeps is the copy the saved outputs were computed
with (issue 23, item 4). The fsdp model
normalises its hidden layers with BatchNorm1d only: it resumes on data(2) × phantom(1), where a
PhantomLayerNorm/PhantomRMSNorm of a group of one sums its statistics over the whole world
(``nn/norms.py`` passes group None when the shard size is 1).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_phantom as lp
from conftest import run_ranks
from lightning_phantom.nn import architecture
from lightning_phantom.strategy.checkpoints import shard_keys
from lightning_phantom.strategy.reshard import reshard_tensors

STEPS, MORE = 4, 2  # steps before the checkpoint; steps after resuming
WIDTH = 8


def blocks(row_norms: bool = True) -> nn.Sequential:
    """``row_norms``: LayerNorm and RMSNorm in the first two blocks (else BatchNorm1d)."""
    first, second = ((nn.LayerNorm(WIDTH), nn.RMSNorm(WIDTH)) if row_norms
                     else (nn.BatchNorm1d(WIDTH), nn.BatchNorm1d(WIDTH)))
    return nn.Sequential(
        nn.LayerNorm(6),  # on the replicated input: a replicated module, no shard
        nn.Sequential(nn.Linear(6, WIDTH), first, nn.GELU(), nn.Dropout(0.2)),
        nn.Sequential(OrderedDict(fc=nn.Linear(WIDTH, WIDTH), norm=second, act=nn.GELU(),
                                  drop=nn.Dropout(0.2))),
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh()),
        nn.Linear(WIDTH, 4),
    )


class Blocks(L.LightningModule):
    def __init__(self, row_norms: bool = True) -> None:
        super().__init__()
        self.net = blocks(row_norms)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.losses = [*getattr(self, "losses", []), loss.item()]
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=8)


def probe(model: Blocks) -> dict[str, torch.Tensor]:
    """The model on fixed inputs: in eval mode, and in training mode from one RNG state (its BatchNorm
    statistics put back after)."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    kept = [[t.clone() for t in m.buffers()] for m in norms]
    was = model.training
    with torch.no_grad(), torch.random.fork_rng():
        model.eval()
        out = {"eval": model(x)}
        model.train()
        torch.manual_seed(3)
        out["train"] = model(x)
    model.train(was)
    for m, tensors in zip(norms, kept):
        for t, value in zip(m.buffers(), tensors):
            t.copy_(value)
    return out


def _trainer(devices: int, max_steps: int, callbacks=(), **strategy) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=lp.PhantomStrategy(**strategy),
                     max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     use_distributed_sampler=False)  # every replica the same rows: see the module docstring


def train_and_save(tmp: str) -> dict:
    out = {}
    for name, layout in (("ddp", {"phantom_parallel_size": 4}),
                         ("fsdp", {"phantom_parallel_size": 2, "data_parallel": "fsdp"})):
        L.seed_everything(0, verbose=False)
        trainer, model = _trainer(4, STEPS, ghosts=1, **layout), Blocks(row_norms=name == "ddp")
        trainer.fit(model, loader())
        trainer.save_checkpoint(f"{tmp}/{name}.ckpt")
        out[name] = probe(model)
    return out


class Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.loaded = probe(pl_module)  # right after loading: what the checkpoint computes


def resume(path: str, devices: int, row_norms: bool = True, **strategy) -> dict:
    L.seed_everything(0, verbose=False)
    looked = Probe()
    trainer, model = _trainer(devices, STEPS + MORE, [looked], **strategy), Blocks(row_norms)
    trainer.fit(model, loader(), ckpt_path=path)
    return {"loaded": looked.loaded, "after": probe(model), "step": trainer.global_step,
            "losses": model.losses, "layout": str(trainer.strategy.layout)}


def resume_each(tmp: str, ghosts: dict) -> dict:
    return {"ddp": resume(f"{tmp}/ddp-p2.ckpt", 2, phantom_parallel_size=2, ghosts=ghosts["net"]),
            "fsdp": resume(f"{tmp}/fsdp-p1.ckpt", 2, False, phantom_parallel_size=1, data_parallel="fsdp")}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    saved = run_ranks(4, train_and_save, str(tmp), timeout=300)[0]
    ghosts = lp.reshard_checkpoint(tmp / "ddp.ckpt", tmp / "ddp-p2.ckpt", 2)
    assert lp.reshard_checkpoint(tmp / "fsdp.ckpt", tmp / "fsdp-p1.ckpt", 2) == {"net": [2, 2]}
    assert lp.reshard_checkpoint(tmp / "ddp.ckpt", tmp / "ddp-p1.ckpt", 4) == {"net": [4, 4]}
    return tmp, saved, ghosts, run_ranks(2, resume_each, str(tmp), ghosts, timeout=300)


def _same(resumed: dict, saved: dict) -> None:
    for mode in ("eval", "train"):
        torch.testing.assert_close(resumed[mode], saved[mode], rtol=1e-5, atol=1e-6, msg=mode)


def _continued(run: dict, layout: str) -> None:
    assert run["layout"] == layout and run["step"] == STEPS + MORE and len(run["losses"]) == MORE
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert not torch.allclose(run["after"]["eval"], run["loaded"]["eval"])  # the weights moved


def test_nested_ffn_with_norms_and_dropout_reshards_from_4_to_2_ranks_and_resumes(resharded):
    _, saved, ghosts, resumed = resharded
    assert ghosts == {"net": [2, 2]}  # 2 old ranks' ghosts each: k' = m·k
    for rank in resumed:
        _same(rank["ddp"]["loaded"], saved["ddp"])
        _continued(rank["ddp"], "data(1) × phantom(2) = 2 ranks")


def test_fsdp_checkpoint_reshards_and_resumes(resharded):
    _, saved, _, resumed = resharded
    for rank in resumed:  # data(2) × phantom(2) under FSDP → data(2) × phantom(1) under FSDP
        _same(rank["fsdp"]["loaded"], saved["fsdp"])
        _continued(rank["fsdp"], "data(2) × phantom(1) = 2 ranks")


def test_reshard_to_one_rank_and_resume(resharded):
    tmp, saved, _, _ = resharded
    (one,) = run_ranks(1, resume, str(tmp / "ddp-p1.ckpt"), 1, phantom_parallel_size=1)
    _same(one["loaded"], saved["ddp"])
    _continued(one, "data(1) × phantom(1) = 1 ranks")


def test_checkpoint_without_a_record_is_refused(resharded, tmp_path):
    tmp = resharded[0]
    old = tmp_path / "old.ckpt"
    shutil.copytree(tmp / "ddp.ckpt", old)
    meta = torch.load(old / "meta.pt", weights_only=True)
    del meta["phantom"]["architecture"]
    torch.save(meta, old / "meta.pt")
    with pytest.raises(ValueError, match="no record of its phantom modules' structure.*Resume it on phantom "
                                         "groups of 4 and save it again"):
        lp.reshard_checkpoint(old, tmp_path / "new.ckpt", 2)
    assert not (tmp_path / "new.ckpt").exists()


# ------------------------------------------------------------- records, in-process
def _random_shards(record: dict, p: int) -> list[nn.Module]:
    """Every rank's shard of ``record`` with random tensors, the replicated ones equal."""
    torch.manual_seed(0)
    shards = [architecture.build(record, (rank, p)).to_empty(device="cpu").double() for rank in range(p)]
    for shard in shards:
        with torch.no_grad():
            for t in [*shard.parameters(), *shard.buffers()]:
                t.uniform_(0.5, 1.5) if t.is_floating_point() else t.fill_(7)
    for shard in shards[1:]:
        for name, t in shard.state_dict().items():
            if name not in shard_keys(shard, 1, p):
                t.copy_(shards[0].state_dict()[name])
    return shards


def test_record_is_plain_data_and_rebuilds_every_key_for_any_rank_and_size(tmp_path):
    record = architecture.describe(lp.to_phantom(blocks(), 1, init="random"))
    torch.save(record, tmp_path / "record.pt")
    assert torch.load(tmp_path / "record.pt", weights_only=True) == record  # no classes, no pickled objects
    kinds = [(layer["path"], layer["kind"]) for layer in record["layers"]]
    assert kinds[:6] == [("0", "placeholder"), ("1.0", "column"), ("1.1", "norm"), ("1.2", "placeholder"),
                         ("1.3", "dropout"), ("2.fc", "phantom")]
    # Placeholders stand where the replicated tensors are (stored untagged and kept as they are).
    dense_keys = set(blocks().state_dict()) - {"0.weight", "0.bias"}
    compressors = {f"{layer}.{name}" for layer in ("2.fc", "3.0") for name in ("compress", "decompress")}
    for p in (1, 2, 4):
        for rank in range(p):
            shard = architecture.build(record, (rank, p))
            assert set(shard.state_dict()) == dense_keys | (compressors if p > 1 else set())
            assert architecture.describe(shard) == record
    with pytest.raises(ValueError, match="'kind' among \\['PhantomFFN'\\], got 'Nope'"):
        architecture.build({"kind": "Nope"}, (0, 2))
    with pytest.raises(TypeError, match=r"PhantomFFN.layers\[0\].dtype is dtype .*plain data only"):
        architecture._check_plain({"layers": [{"dtype": torch.float32}]}, "PhantomFFN")


def test_reshard_tensors_keeps_shard_keys_and_the_function():
    """4 → 2 in the checkpoint's keys, then each side merged to one shard: the same dense model."""
    record = architecture.describe(lp.to_phantom(blocks(), 1, init="random"))
    shards = _random_shards(record, 4)
    saved = {"head.weight": torch.randn(3, 4)}  # a replicated module outside the FFN
    for rank, shard in enumerate(shards):  # as PhantomStrategy names them in a checkpoint
        keys = shard_keys(shard, rank, 4)
        saved.update({f"ffn.{keys.get(k, k)}": t for k, t in shard.state_dict().items()})

    out, records, ghosts = reshard_tensors(saved, {"ffn": record}, 4, 2)
    assert ghosts == {"ffn": [2, 2]} and records["ffn"]["layers"][5]["ghosts"] == 2
    assert torch.equal(out["head.weight"], saved["head.weight"]) and "ffn.4.bias" in out
    assert not any(k.endswith("/4") for k in out)
    rebuilt = []
    for rank in range(2):
        shard = architecture.build(records["ffn"], (rank, 2))
        keys = shard_keys(shard, rank, 2)
        shard.load_state_dict({k: out[f"ffn.{keys.get(k, k)}"] for k in shard.state_dict()}, assign=True)
        rebuilt.append(shard)
    assert {k for k in out if "|phantom" in k} == {f"ffn.{k}" for r, s in enumerate(rebuilt)
                                                  for k in shard_keys(s, r, 2).values()}
    before, after = lp.merge_shards(shards, 4)[0].state_dict(), lp.merge_shards(rebuilt, 2)[0].state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-12, atol=1e-12, msg=key)

    with pytest.raises(ValueError, match=r"\['other.weight\|phantom0/4'\] are shards of a module that is "
                                         r"not a recorded phantom module \(recorded: \['ffn'\]\)"):
        reshard_tensors({**saved, "other.weight|phantom0/4": torch.ones(1)}, {"ffn": record}, 4, 2)
    del saved["ffn.2.fc.compress|phantom3/4"]
    with pytest.raises(ValueError, match=r"ffn: the checkpoint lacks \['ffn.2.fc.compress\|phantom3/4'\]"):
        reshard_tensors(saved, {"ffn": record}, 4, 2)
