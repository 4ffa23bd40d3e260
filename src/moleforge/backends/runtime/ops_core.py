"""Runtime ops of CoMoL's core-space experts (``ir/core_nodes.py``): ``h (T, r)`` the token in
the core space, ``gates (T, E)``, ``cores (E, r, r)`` (``[out, in]``), ``b (d_out, r)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["core_experts_loop", "core_merge"]


def core_experts_loop(h: Tensor, gates: Tensor, cores: Tensor, b: Tensor, scale: float) -> Tensor:
    """The mixture of full experts, one expert at a time (the unoptimised form):
    ``Σ_i g_i · scale · B (M_i h)``, ``(T, d_out)``."""
    out = h.new_zeros(h.shape[0], b.shape[0])  # (T, d_out)
    for i in range(cores.shape[0]):
        out = out + gates[:, i:i + 1] * F.linear(F.linear(h, cores[i]), b)  # (T, d_out)
    return out * scale


def core_merge(h: Tensor, gates: Tensor, cores: Tensor) -> Tensor:
    """The soft-merged core per token, ``(Σ_i g_i M_i) h``, as ``Σ_i g_i (M_i h)``: one GEMM of
    ``h`` with every core stacked, then the gated sum over experts; ``(T, r)``. The per-token
    ``r × r`` merged cores are never formed."""
    E, r, _ = cores.shape
    u = F.linear(h, cores.reshape(E * r, r)).view(-1, E, r)  # (T, E, r)
    return (u * gates.unsqueeze(-1)).sum(1)  # (T, r)
