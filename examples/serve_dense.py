"""Serve a phantom-trained model densely, on one process.

    python examples/serve_dense.py runs/train_phantom/phantom.ckpt   # the checkpoint train_phantom.py wrote
    python examples/serve_dense.py outputs/.../logs/checkpoints/*.ckpt  # the app's (trainer.enable_checkpointing=true)
    python examples/serve_dense.py --inline                          # train one here first (2 processes)
    python examples/serve_dense.py CKPT --inputs '[[0.1, ...input_size numbers...]]'   # predict and exit
    python examples/serve_dense.py CKPT --port 8000
    curl -s localhost:8000 -d '{"inputs": [[0.1, ...input_size numbers...]]}'

Any checkpoint of the app's ``FFNModule`` loads: a ``PhantomStrategy`` checkpoint directory, or
the single file DDP or one device writes. Sizes come from the checkpoint's hyper-parameters;
the model is evaluated on the built-in data set of its shape (teacher: 32 -> 8, digits:
64 -> 10), if there is one.

A phantom model is exactly a dense model whose off-diagonal blocks are low rank
(docs/operator.md §7): the p shards are merged into one (``merge_shards``) and
``to_dense`` turns it into a plain ``nn.Sequential``, with no approximation and no process
group. From a checkpoint, the shards are read straight from its ``torch.distributed.checkpoint``
files on this one process; with ``--inline`` the ranks that trained it call ``to_dense``
together and rank 0 serves.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lightning_phantom import PhantomFFN, merge_shards, to_dense
from lightning_phantom.nn import sharded_parameters
from lightning_phantom.app.data import DigitsDataModule, TeacherDataModule
from lightning_phantom.app.module import FFNModule

sys.path.insert(0, str(Path(__file__).resolve().parent))


def phantom_from_checkpoint(path: Path) -> tuple[dict, PhantomFFN]:
    """(the module's hyper-parameters, its FFN merged onto one rank) from a PhantomStrategy checkpoint."""
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    hp, p = meta["hyper_parameters"], meta["phantom"]["phantom_parallel"]
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sizes = [hp["input_size"]] + [hp["width"]] * (hp["depth"] + 1) + [hp["output_size"]]
    # Ghosts per phantom layer: rows of each compressor C_i (k × a) as saved.
    phantom_layers = range(2, 2 * hp["depth"] + 1, 2)  # net: Linear, act, Linear, act, ..., Linear
    ghosts = [stored[f"model::net.{i}.compress|phantom0/{p}"].size[0] for i in phantom_layers]
    shards = [PhantomFFN(sizes, ghosts, hp["activation"], shard=(r, p)) for r in range(p)]
    # The strategy names a sharded tensor "model::net.<key>|phantom<rank>/<p>" and a replicated one
    # "model::net.<key>".
    targets: dict[str, torch.Tensor] = {}
    for r, shard in enumerate(shards):
        sharded = {id(t) for t in sharded_parameters(shard)}
        for key, tensor in shard.named_parameters():
            name = f"model::net.{key}" + (f"|phantom{r}/{p}" if id(tensor) in sharded else "")
            targets.setdefault(name, tensor.data)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(targets, checkpoint_id=path, no_dist=True)  # in place, into the shards' tensors
    with torch.no_grad():  # replicated tensors were loaded into shard 0's copy
        for shard in shards[1:]:
            for key, tensor in shard.named_parameters():
                if f"model::net.{key}" in targets:
                    tensor.copy_(targets[f"model::net.{key}"])
    return hp, merge_shards(shards, p)[0]


def dense_from_checkpoint(path: Path) -> FFNModule:
    """The dense ``FFNModule`` of a phantom checkpoint directory or of a one-file Lightning checkpoint."""
    if not path.exists():
        raise SystemExit(f"serve_dense: no checkpoint at {path}")
    if path.is_dir():
        if not (path / "meta.pt").is_file():
            raise SystemExit(f"serve_dense: {path} is a directory without meta.pt: not a PhantomStrategy "
                             "checkpoint (a tensor-parallel one is not supported: reshard or train with "
                             "strategy=phantom, ddp or single)")
        hp, phantom = phantom_from_checkpoint(path)
        module = FFNModule(**hp)
        module.net = to_dense(phantom)  # one shard of size 1: no process group, no communication
        return module.eval()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # DDP or one device: one file
    module = FFNModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def builtin_data(model: nn.Module, task: str):
    """The validation set (x, y) of the app's data set that has the model's shape, or None."""
    shape = (*sizes(model), task)
    if shape == (32, 8, "regression"):
        data = TeacherDataModule(batch_size=64)
    elif shape == (64, 10, "classification"):
        data = DigitsDataModule(batch_size=64)
    else:
        return None
    data.setup("fit")
    return data.val_set.tensors


def sizes(model: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the dense FFN: its first and last Linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


def predict(model: nn.Module, inputs) -> torch.Tensor:
    """``model`` on rows of numbers; a ValueError that names the expected width for anything else."""
    width = sizes(model)[0]
    x = torch.as_tensor(inputs, dtype=torch.float32)
    if x.dim() != 2 or x.shape[1] != width:
        got = f"{x.shape[1]} numbers per row" if x.dim() == 2 else f"a tensor of shape {tuple(x.shape)}"
        raise ValueError(f"this model takes rows of {width} numbers (its input_size), got {got}; send "
                         f'{{"inputs": [[...{width} numbers...], ...]}}')
    with torch.no_grad():
        return model(x)


def dense_inline() -> FFNModule | None:
    """Train with phantom parallelism here; every rank joins ``to_dense``, rank 0 returns the model."""
    from train_phantom import train

    trainer, model, _ = train(devices=2, steps=100, checkpoint=False, out="runs/serve_dense")
    dense = to_dense(model)  # a collective: every rank of the phantom group gathers the shards
    return dense.eval() if trainer.is_global_zero else None


class _Handler(BaseHTTPRequestHandler):
    model: nn.Module

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            reply, status = {"outputs": predict(self.model, body["inputs"]).tolist()}, 200
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            reply, status = {"error": f"{type(e).__name__}: {e}; send {{\"inputs\": [[...], ...]}}"}, 400
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint written by the app or train_phantom.py")
    parser.add_argument("--inline", action="store_true", help="train a small phantom model here first")
    parser.add_argument("--inputs", help="JSON rows to predict, printed as JSON; then exit")
    parser.add_argument("--port", type=int, help="serve JSON predictions over HTTP on this port")
    args = parser.parse_args()
    if bool(args.checkpoint) == args.inline:
        parser.error("give a checkpoint or --inline (one of them)")
    if args.inline:
        model = dense_inline()
        if model is None:
            return  # ranks > 0 only helped to gather the shards
    else:
        model = dense_from_checkpoint(Path(args.checkpoint))
    (width, outputs), task = sizes(model), getattr(model, "task", "regression")
    print(f"dense model: {sum(t.numel() for t in model.parameters()):,} parameters, "
          f"{width} inputs -> {outputs} outputs")
    if args.inputs is not None:
        try:
            print(json.dumps({"outputs": predict(model, json.loads(args.inputs)).tolist()}))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"serve_dense: error: {e}") from None
        return
    data = builtin_data(model, task)
    if data is None:
        print("no built-in data set has this shape: not evaluated")
    else:
        x, y = data
        pred = predict(model, x)
        if task == "regression":
            quality = f"validation MSE {torch.nn.functional.mse_loss(pred, y).item():.6g}"
        else:
            quality = f"validation accuracy {(pred.argmax(1) == y).float().mean().item():.4f}"
        print(f"{quality} on {len(x)} rows")
    if args.port:
        _Handler.model = model
        print(f"serving on http://127.0.0.1:{args.port}  (POST {{\"inputs\": [[...{width} numbers...]]}})",
              flush=True)
        HTTPServer(("127.0.0.1", args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main()
