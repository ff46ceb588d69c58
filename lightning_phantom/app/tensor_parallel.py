"""The tensor-parallel (TP) baseline: Megatron-style sharding of an FFN with DTensor.

This is what a user of Lightning's own ``ModelParallelStrategy`` writes in
``configure_model``::

    def configure_model(self):
        parallelize_ffn(self.ffn, self.device_mesh["tensor_parallel"])

Linear layers alternate ``ColwiseParallel`` / ``RowwiseParallel``, starting with
Colwise, so each Colwise/Rowwise pair costs one all-reduce forward and one backward
(``lightning_phantom.cost.tp_cost`` has the exact accounting, checked against what
DTensor issues). With an odd number of Linear layers the last one is
``ColwiseParallel(output_layouts=Replicate())``, which all-gathers its output: either
way every rank ends with the full output, as with ``PhantomFFN``, so the two are
compared on the same model, data and loss code.

``parallelize_gpt`` (``parallelize_block`` per block) does the same for the GPT of
``lightning_phantom.app.gpt`` with torchtitan's plan: the model file knows nothing of it.
"""

from __future__ import annotations

from torch import nn

from lightning_phantom.nn.layers import ELEMENTWISE


def _linear_indices(module: nn.Sequential) -> list[int]:
    """Positions of the Linear layers, after checking the Sequential is an FFN TP can shard."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"parallelize_ffn expects an nn.Sequential of nn.Linear and element-wise modules, got "
            f"{type(module).__name__}; apply it to the FFN inside your model "
            "(e.g. parallelize_ffn(model.ffn, mesh))."
        )
    linears, width = [], None
    for i, layer in enumerate(module):
        if isinstance(layer, nn.Linear):  # the types ColwiseParallel/RowwiseParallel accept
            if width is not None and layer.in_features != width:
                raise ValueError(
                    f"layer {i} (Linear {layer.in_features} -> {layer.out_features}) does not take the "
                    f"{width} outputs of the previous Linear; the Sequential is not a chain of widths."
                )
            width = layer.out_features
            linears.append(i)
        elif not isinstance(layer, ELEMENTWISE):
            # Anything else (a norm, an attention block) mixes neurons that TP keeps on
            # different ranks, so the alternating plan would compute something else.
            raise TypeError(
                f"layer {i} is {type(layer).__name__}; an FFN for parallelize_ffn may contain only nn.Linear "
                f"and element-wise modules ({', '.join(t.__name__ for t in ELEMENTWISE)}). Parallelize other "
                "modules with your own parallelize_module plan."
            )
    if not linears:
        raise ValueError("parallelize_ffn found no nn.Linear in the Sequential; nothing to shard.")
    return linears


def parallelize_ffn(module: nn.Sequential, tp_mesh) -> nn.Sequential:
    """Shard an FFN over a 1-D tensor-parallel ``DeviceMesh``, in place; returns ``module``.

    The input is expected replicated on the mesh (as a data-parallel batch is within a
    TP group) and the output is the full, replicated tensor on every rank. Widths that a
    layer shards (Colwise: out_features; Rowwise: in_features) must be divisible by the
    mesh size.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if not isinstance(tp_mesh, DeviceMesh):
        raise TypeError(f"tp_mesh must be a torch.distributed DeviceMesh, got {type(tp_mesh).__name__}")
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"tp_mesh must be 1-D, got a {tp_mesh.ndim}-D mesh with dimensions {tp_mesh.mesh_dim_names}; "
            "pass the tensor-parallel dimension, e.g. self.device_mesh['tensor_parallel'] in configure_model."
        )
    p = tp_mesh.size()
    linears = _linear_indices(module)
    plan = {}
    for j, i in enumerate(linears):
        layer = module[i]
        colwise = j % 2 == 0
        last = j == len(linears) - 1
        # Colwise shards out_features, Rowwise in_features; the gathering Colwise at the
        # end of an odd chain needs even shards for its all_gather_into_tensor.
        if colwise:
            sharded, name = layer.out_features, "out_features"
        else:
            sharded, name = layer.in_features, "in_features"
        if sharded % p:
            raise ValueError(
                f"layer {i} (Linear {layer.in_features} -> {layer.out_features}, "
                f"{'ColwiseParallel' if colwise else 'RowwiseParallel'}) has {name} = {sharded}, "
                f"not divisible by the tensor-parallel size {p} ({sharded} % {p} = {sharded % p}). Use "
                f"widths that are multiples of {p}."
            )
        if colwise:
            plan[str(i)] = ColwiseParallel(output_layouts=Replicate()) if last else ColwiseParallel()
        else:
            plan[str(i)] = RowwiseParallel()
    return parallelize_module(module, tp_mesh, plan)


GPT_HEADS = ("replicated", "vocab_parallel")


def _replicated_input(module, inputs, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)


def _local_output(module, output, mesh):
    return output.to_local()


def replicate_module(module, tp_mesh):
    """Keep ``module`` whole on every rank, its parameters as replicated DTensors (torchtitan's
    ``NoParallel``): every parameter is then a DTensor, as fused optimizers and gradient clipping
    need, while the module takes and returns plain tensors. Computed the same on every rank, its
    gradients need no collective."""
    from torch.distributed.tensor import distribute_module

    return distribute_module(module, tp_mesh, input_fn=_replicated_input, output_fn=_local_output)


def parallelize_gpt(gpt, tp_mesh, head: str = "replicated"):
    """Shard ``lightning_phantom.app.gpt.GPT`` Megatron-style over a 1-D ``DeviceMesh``, in place.

    torchtitan's plan without sequence parallelism: per block, colwise ``q``, ``k``, ``v`` and
    ``fc1`` (each rank computes its h/p heads and f/p hidden neurons), rowwise ``out`` and ``fc2``
    (one all-reduce of rows·d each, forward); embeddings and norms replicated (``replicate_module``),
    so the residual stream is whole on every rank. The attention's input is made a replicated
    DTensor once (``PrepareModuleInput``) before ``q``, ``k`` and ``v`` read it: their three partial input
    gradients are summed as DTensors and all-reduced once in backward, as Megatron's fused QKV
    does, instead of once per projection. A block thus sends 2 all-reduces of rows·d forward and 2
    backward (``lightning_phantom.cost.gpt``).

    ``head``: ``"replicated"`` (every rank computes all logits: no collective) or
    ``"vocab_parallel"`` (colwise over the vocabulary, logits stay a DTensor sharded on the last
    dimension; the loss must then be computed, and its backward run, under
    ``torch.distributed.tensor.parallel.loss_parallel()``; it adds one all-reduce of rows·d in
    backward and the loss's own reductions).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    if not isinstance(tp_mesh, DeviceMesh) or tp_mesh.ndim != 1:
        raise TypeError(f"tp_mesh must be a 1-D torch.distributed DeviceMesh, got {tp_mesh!r}; pass "
                        "self.device_mesh['tensor_parallel'] in configure_model")
    if head not in GPT_HEADS:
        raise ValueError(f"head must be one of {GPT_HEADS}, got {head!r}")
    p = tp_mesh.size()
    # Heads divisible by p make the width (heads × head_dim) and the MLP width (a multiple of it) so.
    for name, value in (("heads", gpt.heads),) + ((("vocab", gpt.vocab),) if head == "vocab_parallel" else ()):
        if value % p:
            raise ValueError(f"the GPT's {name} = {value} is not divisible by the tensor-parallel size {p}: every "
                             f"rank computes {name}/{p} of them. Choose a multiple of {p}.")
    for block in gpt.blocks:
        parallelize_block(block, tp_mesh)
    for module in (gpt.tok, gpt.pos, gpt.ln_f):
        replicate_module(module, tp_mesh)
    if head == "vocab_parallel":
        parallelize_module(gpt, tp_mesh, {"head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    else:
        replicate_module(gpt.head, tp_mesh)
    return gpt


def parallelize_block(block, tp_mesh):
    """One ``app/gpt.py`` ``Block`` laid out as ``parallelize_gpt`` lays out each (see there), in place.
    Its input and output are the whole residual stream, a plain tensor on every rank."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   parallelize_module)

    parallelize_module(block, tp_mesh, {
        "attn": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
        "attn.out": RowwiseParallel(),
        "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel(),
    })
    replicate_module(block.ln1, tp_mesh)
    replicate_module(block.ln2, tp_mesh)
    return block
