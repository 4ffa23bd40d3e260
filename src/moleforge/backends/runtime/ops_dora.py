"""Runtime ops of DoRA experts (``ir/dora_nodes.py``, and the block experts of ``ops_block_dora``);
they agree with ``ir/interpret_dora.py`` up to the tolerance table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .packed import PackCache, packed

__all__ = ["pool_magnitude", "dora_scales"]


def _norms(w: Tensor, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(‖W + s B_e A_e‖ (E, out), ‖W‖ (out,))`` without gradient, one expert at a time (an
    ``out × in`` temporary, never ``E × out × in``)."""
    w = w.to(a.dtype)
    with torch.no_grad():
        norms = torch.stack([torch.linalg.vector_norm(torch.addmm(w, b[e], a[e], alpha=scale), dim=1)
                             for e in range(a.shape[0])])  # (E, out)
        return norms, torch.linalg.vector_norm(w, dim=1)  # W is frozen


def dora_scales(w: Tensor, a: Tensor, b: Tensor, scale: float, m: Tensor, cache: PackCache | None = None,
                name: str = "dora") -> Tensor:
    """``c (E, out)``: ``(‖W‖ + M_e) / ‖W + s B_e A_e‖`` for ``W (out, in)``, ``A (E, r, in)``,
    ``B (E, out, r)``, ``M (E, out)``; the norms over the input dim, the denominator without gradient
    (DoRA, PEFT), kept by ``cache`` under ``name`` without autograd."""
    norms, row = packed(cache, name, (w, a, b), lambda: _norms(w, a, b, scale))  # type: ignore[misc]
    return (row + m) / norms


def pool_magnitude(x: Tensor, gates: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, dm: Tensor) -> Tensor:
    """``Σ_i g_i [(c_i - 1) ⊙ (x Wᵀ) + c_i ⊙ s (x A_iᵀ) B_iᵀ]``, ``c_i = (‖W‖ + dm_i) / ‖W + s B_i A_i‖``
    (``a (E|1, r, d_in)``, ``b (E|1, d_out, r)``):
    ``x Wᵀ`` once, every expert's LoRA as one batched product, the norms without gradient (PEFT)."""
    w = w.to(x.dtype)
    E = gates.shape[1]
    a, b = a.expand(E, *a.shape[1:]), b.expand(E, *b.shape[1:])  # a factor the experts share: one copy each
    c = dora_scales(w, a, b, scale, dm)  # (E, d_out)
    base = F.linear(x, w)  # (T, d_out)
    lora = torch.einsum("ter,eor->teo", torch.einsum("ti,eri->ter", x, a), b) * scale  # (T, E, d_out)
    mixed = (c - 1.0) * base[:, None, :] + c * lora  # (T, E, d_out)
    return torch.einsum("te,teo->to", gates, mixed)  # (T, d_out)
