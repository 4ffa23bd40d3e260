"""Runtime op of DoRA experts (``ir/dora_nodes.py``); agrees with ``ir/interpret_dora.py`` up to
the tolerance table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pool_magnitude"]


def pool_magnitude(x: Tensor, gates: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, dm: Tensor) -> Tensor:
    """``Σ_i g_i [(c_i - 1) ⊙ (x Wᵀ) + c_i ⊙ s (x A_iᵀ) B_iᵀ]``, ``c_i = (‖W‖ + dm_i) / ‖W + s B_i A_i‖``
    (``a (E|1, r, d_in)``, ``b (E|1, d_out, r)``):
    ``x Wᵀ`` once, every expert's LoRA as one batched product, the norms without gradient (PEFT)."""
    w = w.to(x.dtype)
    E = gates.shape[1]
    a, b = a.expand(E, *a.shape[1:]), b.expand(E, *b.shape[1:])  # a factor the experts share: one copy each
    with torch.no_grad():
        norms = torch.linalg.vector_norm(w + scale * torch.bmm(b, a), dim=2)  # (E, d_out)
    c = (torch.linalg.vector_norm(w, dim=1) + dm) / norms  # (E, d_out)
    base = F.linear(x, w)  # (T, d_out)
    lora = torch.einsum("ter,eor->teo", torch.einsum("ti,eri->ter", x, a), b) * scale  # (T, E, d_out)
    mixed = (c - 1.0) * base[:, None, :] + c * lora  # (T, E, d_out)
    return torch.einsum("te,teo->to", gates, mixed)  # (T, d_out)
