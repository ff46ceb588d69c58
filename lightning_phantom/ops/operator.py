"""The fused phantom-layer operator: forward and backward of docs/operator.md §3–§4 for one rank.

Layout choices that keep the hot path free of copies:

* Ghosts travel transposed, ``gT_i = C_i X_iᵀ`` (k × B), so the all-gathered buffer
  ``GT`` (p·k × B) holds rank j's ghosts in rows ``j·k .. (j+1)·k``. The ghosts of the
  ranks before and after this one are then two contiguous row blocks, and
  ``Σ_{j≠i} G_j D_ijᵀ`` is at most two ``addmm`` calls on transposed views (no
  concatenation, no permute).
* ``decompress`` is stored as one (c × (p−1)·k) matrix ``[D_ij]_{j≠i}`` in increasing j,
  so its two column blocks line up with those row blocks.
* In backward the reduce-scatter buffer (p·k × B) is written in place by ``mm(out=)``
  with this rank's own block zeroed (docs/operator.md §4, Backward step 1).

The collectives are started asynchronously and waited for only when their result is
needed, so with ``overlap=True`` the ghost exchange runs while the local block is
multiplied (forward 2–3) and the reduce-scatter while the weight gradients are computed
(backward 2–3). ``overlap=False`` waits immediately, for comparison and debugging. They
are functional collectives (``ops/comm.py``), so the same code runs eagerly and under
``torch.compile(fullgraph=True)``, where the compiler places the waits itself.

Under bfloat16/float16 the ghost gradients are summed over ranks in float32 (a k × B
buffer per rank) and rounded once, instead of once per addition.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_phantom.ops.comm import start_all_gather, start_reduce_scatter, wait


def _others(x: Tensor, rank: int, ghosts: int, dim: int) -> tuple[Tensor, Tensor]:
    """The blocks of ``x`` along ``dim`` before and after this rank's own ``ghosts``-sized block."""
    lo, hi = rank * ghosts, (rank + 1) * ghosts
    return x.narrow(dim, 0, lo), x.narrow(dim, hi, x.shape[dim] - hi)


class PhantomLinearFunction(torch.autograd.Function):
    """Z_i = X_i L_iᵀ + b_i + Σ_{j≠i} G_j D_ijᵀ with G = all_gather(X C_iᵀ) (docs/operator.md §3)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # B × a, this rank's slice of the layer input
        weight: Tensor,  # L_i, c × a
        bias: Optional[Tensor],  # b_i, c
        compress: Tensor,  # C_i, k × a
        decompress: Tensor,  # [D_ij]_{j≠i}, c × (p−1)k
        group,
        rank: int,
        size: int,
        overlap: bool,
    ) -> Tensor:
        ghosts = compress.shape[0]
        x = x.contiguous()
        # Forward 1: the ghosts, transposed (k × B).
        ghosts_t = torch.mm(compress, x.t())
        # Forward 2: every rank's ghosts; started first so that 3 overlaps it.
        all_ghosts_t = start_all_gather(ghosts_t, group, size)
        if not overlap:
            all_ghosts_t = wait(all_ghosts_t)
        # Forward 3: the local block.
        z = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        if overlap:
            all_ghosts_t = wait(all_ghosts_t)
        # Forward 4: decompress the other ranks' ghosts; own block skipped.
        before, after = _others(all_ghosts_t, rank, ghosts, 0)
        d_before, d_after = decompress.split([before.shape[0], after.shape[0]], dim=1)
        if before.shape[0]:
            z.addmm_(before.t(), d_before.t())
        if after.shape[0]:
            z.addmm_(after.t(), d_after.t())
        ctx.save_for_backward(x, weight, compress, decompress, all_ghosts_t)
        ctx.has_bias = bias is not None
        ctx.group, ctx.rank, ctx.size, ctx.overlap = group, rank, size, overlap
        return z

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        x, weight, compress, decompress, all_ghosts_t = ctx.saved_tensors
        need_x, need_w, need_b, need_c, need_d = ctx.needs_input_grad[:5]
        rank, ghosts = ctx.rank, compress.shape[0]
        grad_z = grad_z.contiguous()
        d_before, d_after = decompress.split([rank * ghosts, decompress.shape[1] - rank * ghosts], dim=1)

        # Backward 1–2: what this rank owes every other rank's ghosts, then reduce-scatter.
        grad_ghosts_t = None
        if need_x or need_c:
            send = grad_z.new_empty((ctx.size * ghosts, grad_z.shape[0]))
            s_before, s_own, s_after = send.split([d_before.shape[1], ghosts, d_after.shape[1]], dim=0)
            torch.mm(d_before.t(), grad_z.t(), out=s_before)
            s_own.zero_()
            torch.mm(d_after.t(), grad_z.t(), out=s_after)
            grad_ghosts_t = start_reduce_scatter(send, ctx.group, ctx.size)
            if not ctx.overlap:
                grad_ghosts_t = wait(grad_ghosts_t, grad_z.dtype)

        # Backward 3: everything that needs no remote data, while the reduce-scatter runs.
        grad_w = torch.mm(grad_z.t(), x) if need_w else None
        grad_b = grad_z.sum(0) if need_b and ctx.has_bias else None
        grad_d = None
        if need_d:
            g_before, g_after = _others(all_ghosts_t, rank, ghosts, 0)
            # Two products joined by cat (a c × (p−1)k copy): the column blocks of one buffer
            # are not contiguous for a middle rank, and torch.compile refuses mm(out=) into them.
            grad_d = torch.cat([torch.mm(grad_z.t(), g_before.t()), torch.mm(grad_z.t(), g_after.t())], dim=1)
        grad_x = torch.mm(grad_z, weight) if need_x else None

        # Backward 4: the ghosts' own gradient reaches the input and the compressor.
        grad_c = None
        if grad_ghosts_t is not None:
            if ctx.overlap:
                grad_ghosts_t = wait(grad_ghosts_t, grad_z.dtype)
            if need_x:
                grad_x.addmm_(grad_ghosts_t.t(), compress)
            if need_c:
                grad_c = torch.mm(grad_ghosts_t, x)
        return grad_x, grad_w, grad_b, grad_c, grad_d, None, None, None, None
