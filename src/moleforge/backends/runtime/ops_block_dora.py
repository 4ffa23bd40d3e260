"""DoRA on routed FFN-block experts (MixLoRA's ``use_dora``; the semantics are in
``ir/block_nodes.py``'s docstring): expert e's linear computes ``c_e ⊙ (base(u) + s (u' A_eᵀ) B_eᵀ)``
with ``c_e = (‖W‖ + M_e) / ‖W + s B_e A_e‖`` per output row, the frozen bias inside ``base`` (as in
the ``mixlora`` package).

The factors ``c (E, out)`` are computed once per forward and block linear from the weights alone:
the denominator under ``torch.no_grad()`` (no gradient through the norm, as DoRA and the package
prescribe), one expert at a time (an ``out × in`` temporary, never ``E × out × in``); the numerator
with autograd, so the magnitudes' offsets ``M`` get their gradient. Without autograd (evaluation,
decoding) the norms are kept by the module's ``PackCache`` (``packed.py``) until a weight changes.
Blocks with magnitudes run the torch ops (``expert_ffn`` / ``expert_hidden``), never the fused
``routed_ffn`` op or its CPU kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packed import PackCache, packed

__all__ = ["Dora", "dora_scales", "block_scales"]

Dora = tuple["Tensor | None", "Tensor | None", "Tensor | None"]
"""The magnitude offsets ``M (E, out)`` of a block's up, gate and down linears (``None``: no DoRA there)."""


def _norms(w: Tensor, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(‖W + s B_e A_e‖ (E, out), ‖W‖ (out,))`` without gradient, one expert at a time."""
    w = w.to(a.dtype)
    with torch.no_grad():
        norms = torch.stack([torch.linalg.vector_norm(torch.addmm(w, b[e], a[e], alpha=scale), dim=1)
                             for e in range(a.shape[0])])  # (E, out)
        return norms, torch.linalg.vector_norm(w, dim=1)  # W is frozen


def dora_scales(w: Tensor, a: Tensor, b: Tensor, scale: float, m: Tensor, cache: PackCache | None = None,
                name: str = "dora") -> Tensor:
    """``c (E, out)``: ``(‖W‖ + M_e) / ‖W + s B_e A_e‖`` for ``W (out, in)``, ``A (E, r, in)``,
    ``B (E, out, r)``, ``M (E, out)``; the norms over the input dim, the denominator without gradient,
    kept by ``cache`` under ``name`` without autograd."""
    norms, row = packed(cache, name, (w, a, b), lambda: _norms(w, a, b, scale))  # type: ignore[misc]
    return (row + m) / norms


def block_scales(lins: dict[str, tuple | None], dora: Dora | None, cache: PackCache | None = None
                 ) -> dict[str, Tensor]:
    """``{role: c (E, out)}`` of the linears ``lins`` (``up``, ``gate``, ``down``: ``LinearArgs`` or
    ``None``) whose entry of ``dora`` (in the order up, gate, down) is a magnitude; ``{}`` without."""
    if dora is None:
        return {}
    out = {}
    for (role, lin), m in zip(lins.items(), dora, strict=True):
        if m is not None and lin is not None:
            w, _, a, b, scale = lin
            out[role] = dora_scales(w, a, b, scale, m, cache, f"dora_norms_{role}")
    return out
