"""The interpreter's rule of :class:`~moleforge.ir.dora_nodes.PoolMagnitude`, in float64: each
expert as PEFT's DoRA computes a single LoRA (``interpret_basics.run_magnitude``), mixed by the gates;
and the DoRA factor of an FFN-block expert linear with a magnitude (``block_nodes``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .dora_nodes import PoolMagnitude
from .interpret_basics import dora_scale

__all__ = ["run_pool_magnitude", "block_dora_scale"]


def run_pool_magnitude(n: PoolMagnitude, r) -> Tensor:
    x, g = r.env[n.src], r.env[n.routing].gates  # (T, d_in), (T, E)
    W, A, B, M = r.p[n.weight.name], r.p[n.a.name], r.p[n.b.name], r.p[n.magnitude.name]
    base = x @ W.T  # (T, d_out)
    out = torch.zeros_like(base)
    for i in range(g.shape[1]):
        a, b = A[i if A.shape[0] > 1 else 0], B[i if B.shape[0] > 1 else 0]  # a shared factor: its one copy
        c = dora_scale(W, a, b, n.scale, M[i])  # (d_out,)
        lora = n.scale * ((x @ a.T) @ b.T)  # (T, d_out)
        out = out + g[:, i:i + 1] * ((c - 1.0) * base + c * lora)
    return out


def block_dora_scale(lin, i: int, p) -> Tensor:
    """``c_i = (‖W‖ + M_i) / ‖W + s B_i A_i‖`` ``(out,)`` of expert i on block linear ``lin`` (an
    ``ExpertLinear`` with a magnitude), the denominator without gradient (``block_nodes``)."""
    return dora_scale(p[lin.weight.name], p[lin.a.name][i], p[lin.b.name][i], lin.scale, p[lin.magnitude.name][i])

