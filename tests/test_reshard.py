"""``reshard_checkpoint`` on FFNs as people write them and on transformer stacks beside them.

A model with a replicated input LayerNorm and nested ``nn.Sequential`` blocks (one with named
children) holding LayerNorm, RMSNorm, BatchNorm1d (running statistics), GELU and Dropout, and
beside it a causal ``nn.TransformerEncoder`` (d=16, 4 heads, f=32, 2 post-norm layers with
dropout, a final RMSNorm) between replicated Linear layers, is trained under
``strategy="phantom"`` on 4 gloo ranks — phantom(4) with ``data_parallel="ddp"``, and
data(2) × phantom(2) with ``"fsdp"`` — and checkpointed. Each checkpoint is re-sharded and
resumed on fewer ranks: the resumed model computes what the saved one did (eval, and training
mode from the same RNG state: dropout masks and batch statistics), and training goes on.
Resuming with other ghosts than the re-sharded checkpoint's is refused on every rank with the
ghosts to pass.

The replicas see the same rows (no distributed sampler), so that their BatchNorm running
statistics agree and the one copy a checkpoint keeps is the copy the saved outputs were computed
with (issue 23, item 4).
"""

from __future__ import annotations

import shutil
import time
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
from lightning_phantom.nn import PhantomRMSNorm, architecture
from lightning_phantom.nn.layers import ELEMENTWISE
from lightning_phantom.nn.transformer_architecture import activation_record, build_activation
from lightning_phantom.strategy.checkpoints import shard_keys
from lightning_phantom.strategy.reshard import reshard_tensors

STEPS, MORE = 4, 2  # steps before the checkpoint; steps after resuming
WIDTH = 8
D, HEADS, FF, SEQ = 16, 4, 32, 3  # the stack's width, heads, MLP width; tokens per row


def blocks() -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(6),  # on the replicated input: a replicated module, no shard
        nn.Sequential(nn.Linear(6, WIDTH), nn.LayerNorm(WIDTH), nn.GELU(), nn.Dropout(0.2)),
        nn.Sequential(OrderedDict(fc=nn.Linear(WIDTH, WIDTH), norm=nn.RMSNorm(WIDTH), act=nn.GELU(),
                                  drop=nn.Dropout(0.2))),
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh()),
        nn.Linear(WIDTH, 4),
    )


def stack() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, activation="gelu", batch_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.RMSNorm(D), enable_nested_tensor=False)


class Blocks(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = blocks()
        self.embed, self.encoder, self.head = nn.Linear(6, SEQ * D), stack(), nn.Linear(D, 4)

    def forward(self, x):
        tokens = self.embed(x).unflatten(-1, (SEQ, D))
        mask = nn.Transformer.generate_square_subsequent_mask(SEQ)
        return self.net(x) + self.head(self.encoder(tokens, mask=mask, is_causal=True).mean(1))

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
        trainer, model = _trainer(4, STEPS, ghosts=1, **layout), Blocks()
        trainer.fit(model, loader())
        trainer.save_checkpoint(f"{tmp}/{name}.ckpt")
        out[name] = probe(model)
    return out


class Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.loaded = probe(pl_module)  # right after loading: what the checkpoint computes


def resume(path: str, devices: int, **strategy) -> dict:
    L.seed_everything(0, verbose=False)
    looked = Probe()
    trainer, model = _trainer(devices, STEPS + MORE, [looked], **strategy), Blocks()
    trainer.fit(model, loader(), ckpt_path=path)
    return {"loaded": looked.loaded, "after": probe(model), "step": trainer.global_step,
            "losses": model.losses, "layout": str(trainer.strategy.layout)}


def refused(path: str, **strategy) -> tuple:
    start = time.monotonic()
    try:
        resume(path, 2, **strategy)
    except BaseException as error:  # noqa: BLE001 - the test checks its type (DCP's is no Exception)
        return type(error).__name__, str(error), time.monotonic() - start
    return "loaded"


def resume_each(tmp: str, ghosts: dict) -> dict:
    return {"ddp": resume(f"{tmp}/ddp-p2.ckpt", 2, phantom_parallel_size=2, ghosts=ghosts),
            "fsdp": resume(f"{tmp}/fsdp-p1.ckpt", 2, phantom_parallel_size=1, data_parallel="fsdp"),
            "wrong ghosts": refused(f"{tmp}/ddp-p2.ckpt", phantom_parallel_size=2, ghosts=1)}


def _ghosts(k: int) -> dict:
    return {"net": [k, k], "encoder": [k] * 8}  # one per phantom layer: the FFN's 2, the stack's 4 per block


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    saved = run_ranks(4, train_and_save, str(tmp), timeout=300)[0]
    ghosts = lp.reshard_checkpoint(tmp / "ddp.ckpt", tmp / "ddp-p2.ckpt", 2)
    assert lp.reshard_checkpoint(tmp / "fsdp.ckpt", tmp / "fsdp-p1.ckpt", 2) == _ghosts(2)
    assert lp.reshard_checkpoint(tmp / "ddp.ckpt", tmp / "ddp-p1.ckpt", 4) == _ghosts(4)
    return tmp, saved, ghosts, run_ranks(2, resume_each, str(tmp), ghosts, timeout=300)


def _same(resumed: dict, saved: dict) -> None:
    for mode in ("eval", "train"):
        torch.testing.assert_close(resumed[mode], saved[mode], rtol=1e-5, atol=1e-6, msg=mode)


def _continued(run: dict, layout: str) -> None:
    assert run["layout"] == layout and run["step"] == STEPS + MORE and len(run["losses"]) == MORE
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert not torch.allclose(run["after"]["eval"], run["loaded"]["eval"])  # the weights moved


def test_nested_ffn_and_stack_reshard_from_4_to_2_ranks_and_resume(resharded):
    _, saved, ghosts, resumed = resharded
    assert ghosts == _ghosts(2)  # 2 old ranks' ghosts each: k' = m·k; passed as they are to resume
    for rank in resumed:
        _same(rank["ddp"]["loaded"], saved["ddp"])
        _continued(rank["ddp"], "data(1) × phantom(2) = 2 ranks")


def test_resuming_with_other_ghosts_is_refused_on_every_rank_with_the_ghosts_to_pass(resharded):
    tmp, _, _, resumed = resharded
    for rank in resumed:
        kind, message, seconds = rank["wrong ghosts"]
        assert kind == "ValueError" and seconds < 10, (kind, message, seconds)
        assert message.startswith(
            f"{str(tmp / 'ddp-p2.ckpt')!r} was saved with other ghosts than this run builds: net has [2, 2] "
            "in the checkpoint and [1, 1] here; encoder has [2, 2, 2, 2, 2, 2, 2, 2] in the checkpoint and "
            "[1, 1, 1, 1, 1, 1, 1, 1] here"), message
        assert f"Resume with PhantomStrategy(ghosts={_ghosts(2)!r})" in message


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
    assert architecture.record_ghosts(record) == [1, 1]  # the PhantomFFN's ghosts
    kinds = r"\['PhantomFFN', 'PhantomTransformerEncoder'\]"
    with pytest.raises(ValueError, match=rf"'kind' among {kinds}, got 'Nope'"):
        architecture.build({"kind": "Nope"}, (0, 2))
    with pytest.raises(TypeError, match=r"PhantomFFN.layers\[0\].dtype is dtype .*plain data only"):
        architecture._check_plain({"layers": [{"dtype": torch.float32}]}, "PhantomFFN")


def phantom_stack(rank: int, p: int, activation=nn.GELU(approximate="tanh")) -> lp.PhantomTransformerEncoder:
    """Shard (rank, p) of a stack built directly, on meta: always causal, pre-norm, no bias, its own eps,
    a tanh GELU module, other ghosts per phantom layer, a final RMSNorm."""
    layer = lp.PhantomTransformerEncoderLayer(D, HEADS, FF, 0.2, activation, 1e-6, batch_first=True,
                                              norm_first=True, bias=False, ghosts=[1, 2, 3, 4], causal=True,
                                              shard=(rank, p), device="meta")
    return lp.PhantomTransformerEncoder(layer, 2, PhantomRMSNorm(D, shard=(rank, p), device="meta"))


def test_stack_record_is_plain_data_and_rebuilds_each_shard_for_any_rank_and_size(tmp_path):
    record = architecture.describe(phantom_stack(0, 4))
    torch.save(record, tmp_path / "record.pt")
    assert torch.load(tmp_path / "record.pt", weights_only=True) == record  # no classes, no pickled objects
    assert record["dense_type"] == "torch.nn.modules.transformer.TransformerEncoder"
    assert record["layers"][1]["activation"] == {"module": "GELU", "config": {"approximate": "tanh"}}
    assert architecture.record_ghosts(record) == [1, 2, 3, 4] * 2  # the stack's ghosts, in its order
    for p in (1, 2, 4):
        for rank in range(p):
            shard, built = phantom_stack(rank, p), architecture.build(record, (rank, p))
            assert {k: t.shape for k, t in built.state_dict().items()} == {
                k: t.shape for k, t in shard.state_dict().items()}
            assert architecture.describe(built) == record  # every setting back, whatever the rank and size
            assert built.dense_type is nn.TransformerEncoder
            assert built.layers[0].dense_type is nn.TransformerEncoderLayer
    relu = architecture.describe(phantom_stack(0, 2, activation="relu"))  # F.relu, as torch's layer takes it
    assert relu["layers"][0]["activation"] == {"function": "relu"}
    assert architecture.build(relu, (1, 2)).layers[0].activation is F.relu

    class OwnGELU(nn.GELU):  # its forward may differ: recorded by name, not rebuilt as a GELU
        pass

    own = architecture.describe(phantom_stack(0, 2, activation=OwnGELU()))
    with pytest.raises(ValueError, match=r"layers.0's activation is '.*OwnGELU', which a checkpoint record "
                                         r"cannot rebuild.*merge it in memory with lightning_phantom"):
        architecture.build(own, (0, 2))
    odd = phantom_stack(0, 2)
    odd.dense_config = {"dtype": torch.float64}  # a registered kind's reader may return such settings
    assert architecture.describe(odd)["dense_config"] is None  # saved all the same
    with pytest.raises(ValueError, match=r"settings of this .*TransformerEncoder \(its StackParts.config\) "
                                         r"are not plain data, so a checkpoint record cannot rebuild it"):
        architecture.build(architecture.describe(odd), (0, 2))
    # The kinds listed are those registered so far (the app's GPT too, once imported by another test).
    with pytest.raises(ValueError, match=r"my.Encoder is not a registered dense kind \(torch.nn.modules."
                                         r"transformer.TransformerEncoder[^)]*\). Import the module that"):
        architecture.build({**record, "dense_type": "my.Encoder"}, (0, 2))


def test_every_elementwise_activation_module_is_recorded_with_its_settings():
    odd = {nn.GELU: {"approximate": "tanh"}, nn.LeakyReLU: {"negative_slope": 0.3}, nn.ELU: {"alpha": 0.5},
           nn.Softplus: {"beta": 2.0, "threshold": 5.0}, nn.Hardtanh: {"min_val": -0.5, "max_val": 2.0},
           nn.PReLU: {"init": 0.1}, nn.Dropout: {"p": 0.3}}
    for cls in ELEMENTWISE:
        module = cls(**odd.get(cls, {}))
        rebuilt = build_activation(activation_record(module), "activation")
        assert type(rebuilt) is cls and {k: v for k, v in vars(rebuilt).items() if not k.startswith("_")} == {
            k: v for k, v in vars(module).items() if not k.startswith("_")}, cls


def test_reshard_tensors_keeps_shard_keys_and_the_function():
    """An FFN and a stack, 4 → 2 in the checkpoint's keys, then each side merged to one shard: the same
    dense modules."""
    records = {"ffn": architecture.describe(lp.to_phantom(blocks(), 1, init="random")),
               "encoder": architecture.describe(phantom_stack(0, 4))}
    shards = {name: _random_shards(record, 4) for name, record in records.items()}
    saved = {"head.weight": torch.randn(3, 4)}  # a replicated module outside the FFN
    for name, per_rank in shards.items():
        for rank, shard in enumerate(per_rank):  # as PhantomStrategy names them in a checkpoint
            keys = shard_keys(shard, rank, 4)
            saved.update({f"{name}.{keys.get(k, k)}": t for k, t in shard.state_dict().items()})

    out, new_records, ghosts = reshard_tensors(saved, records, 4, 2)
    assert ghosts == {"ffn": [2, 2], "encoder": [2, 4, 6, 8] * 2}
    assert [architecture.record_ghosts(r) for r in new_records.values()] == list(ghosts.values())
    assert torch.equal(out["head.weight"], saved["head.weight"]) and "ffn.4.bias" in out
    assert not any(k.endswith("/4") for k in out)
    for name in records:
        rebuilt = []
        for rank in range(2):
            shard = architecture.build(new_records[name], (rank, 2))
            keys = shard_keys(shard, rank, 2)
            tensors = {k: out[f"{name}.{keys.get(k, k)}"] for k in shard.state_dict()}
            shard.load_state_dict(tensors, assign=True)
            rebuilt.append(shard)
        assert {k for k in out if "|phantom" in k and k.startswith(f"{name}.")} == {
            f"{name}.{k}" for r, s in enumerate(rebuilt) for k in shard_keys(s, r, 2).values()}
        before = lp.merge_shards(shards[name], 4)[0].state_dict()
        after = lp.merge_shards(rebuilt, 2)[0].state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, rtol=1e-12, atol=1e-12, msg=f"{name}.{key}")

    record = records["ffn"]
    saved = {k: v for k, v in saved.items() if not k.startswith("encoder.")}
    with pytest.raises(ValueError, match=r"\['other.weight\|phantom0/4'\] are shards of a module that is "
                                         r"not a recorded phantom module \(recorded: \['ffn'\]\)"):
        reshard_tensors({**saved, "other.weight|phantom0/4": torch.ones(1)}, {"ffn": record}, 4, 2)
    del saved["ffn.2.fc.compress|phantom3/4"]
    with pytest.raises(ValueError, match=r"ffn: the checkpoint lacks \['ffn.2.fc.compress\|phantom3/4'\]"):
        reshard_tensors(saved, {"ffn": record}, 4, 2)
