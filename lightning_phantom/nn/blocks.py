"""The ``nn.Sequential`` blocks an FFN is made of, and the user's classes given back by ``to_dense``.

A *block* runs its layers in order and does nothing else: an ``nn.Sequential``, or a subclass
that keeps ``nn.Sequential.forward`` — torchvision's ``MLP``, a user's ``class MLP(nn.Sequential)``
that only builds its layers in ``__init__``. A subclass with a forward of its own may add a
residual or reorder its layers, so it is no block, and an FFN holding one is refused.

Conversion keeps, per block that is a subclass, its class and its non-module attributes
(``dense_blocks``, stored on the ``PhantomFFN``), so that ``to_dense`` gives back an instance of
the user's class. It is built without calling its ``__init__``, whose arguments are not known
(``user_block``), exactly as ``copy.deepcopy`` builds a copy: the dense layers go in as its
children and the attributes are copied over.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

from torch import nn

#: (path of a nested block, its children) → the module holding them.
Block = Callable[[str, "OrderedDict[str, nn.Module]"], nn.Module]
#: State-dict prefix of a block ("" for the FFN) → (its class, its non-module attributes).
BlockClasses = dict[str, tuple[type, dict[str, Any]]]

# What an nn.Sequential holds by itself: the rest of a subclass's __dict__ is the user's own.
_SEQUENTIAL_STATE = frozenset(vars(nn.Sequential()))


def is_block(module: nn.Module) -> bool:
    """An ``nn.Sequential``, or a subclass that keeps its forward (so runs its layers in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _nested(seq: nn.Module, prefix: str, where: str) -> list[tuple[str, str, nn.Module]]:
    """(state-dict prefix, where for messages, module) of ``seq`` and of every nn.Sequential in it
    inside the blocks ``leaf_layers`` enters, outermost first; a subclass with its own forward is listed,
    not entered."""
    out = [(prefix, where, seq)]
    if is_block(seq):
        for name, child in seq._modules.items():
            if isinstance(child, nn.Sequential):
                inner = f"{where}[{name}]" if name.isdigit() else f"{where}.{name}"
                out += _nested(child, f"{prefix}.{name}" if prefix else name, inner)
    return out


def check_blocks(seq: nn.Sequential, name: str) -> None:
    """A TypeError if ``seq`` is an ``nn.Sequential`` subclass with a forward of its own, a ValueError
    if it or a nested block holds tensors of its own (the conversion would drop them)."""
    for _, where, block in _nested(seq, "", name):
        if not is_block(block):
            raise TypeError(
                f"{where} is {type(block).__name__}, an nn.Sequential subclass with a forward of its own, "
                "which may do more than run its layers in order (add a residual, say), so phantom "
                "parallelism cannot split it. Keep it dense, or shard the plain nn.Sequential FFNs inside "
                "it: they are found by themselves, or name them with PhantomStrategy(plan=...)."
            )
        own = [n for n, _ in block.named_parameters(recurse=False)]
        own += [n for n, _ in block.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"{where} ({type(block).__name__}) holds tensors of its own ({', '.join(own)}) "
                             "that its layers do not use; the conversion would drop them. Move them into a "
                             "layer, or keep this FFN dense.")


def dense_blocks(seq: nn.Sequential) -> BlockClasses:
    """The class and non-module attributes of every block of ``seq`` that is an nn.Sequential subclass."""
    return {prefix: (type(block), {k: v for k, v in vars(block).items() if k not in _SEQUENTIAL_STATE})
            for prefix, _, block in _nested(seq, "", "") if type(block) is not nn.Sequential}


def keep_blocks(source: nn.Module, ffn: nn.Module) -> nn.Module:
    """``ffn`` remembering the user's classes ``source`` remembers (re-sharded shards of one model)."""
    if getattr(source, "dense_blocks", None):
        ffn.dense_blocks = source.dense_blocks
    return ffn


def plain_block(path: str, children: "OrderedDict[str, nn.Module]") -> nn.Module:
    return nn.Sequential(children)


def user_block(classes: BlockClasses) -> Block:
    """A ``Block`` giving each block at a path in ``classes`` its class and (copied) attributes back."""

    def block(path: str, children: "OrderedDict[str, nn.Module]") -> nn.Module:
        cls, attributes = classes.get(path, (nn.Sequential, {}))
        out = cls.__new__(cls)
        nn.Sequential.__init__(out, children)
        out.__dict__.update(copy.deepcopy(attributes))
        return out

    return block
