"""DoRA on routed FFN-block experts (MixLoRA's ``use_dora``; the semantics are in
``ir/block_nodes.py``'s docstring): expert e's linear computes ``c_e ⊙ (base(u) + s (u' A_eᵀ) B_eᵀ)``
with ``c_e = (‖W‖ + M_e) / ‖W + s B_e A_e‖`` per output row, the frozen bias inside ``base`` (as in
the ``mixlora`` package).

The factors ``c (E, out)`` are computed once per forward and block linear from the weights alone
(``ops_dora.dora_scales``, as for a pool's DoRA experts): the denominator under ``torch.no_grad()``
(no gradient through the norm, as DoRA and the package prescribe), one expert at a time; the numerator
with autograd, so the magnitudes' offsets ``M`` get their gradient. Without autograd (evaluation,
decoding) the norms are kept by the module's ``PackCache`` (``packed.py``) until a weight changes.
Blocks with magnitudes run the torch ops (``expert_ffn`` / ``expert_hidden``), never the fused
``routed_ffn`` op or its CPU kernel.
"""

from __future__ import annotations

from torch import Tensor

from .ops_dora import dora_scales
from .packed import PackCache

__all__ = ["Dora", "block_scales"]

Dora = tuple["Tensor | None", "Tensor | None", "Tensor | None"]
"""The magnitude offsets ``M (E, out)`` of a block's up, gate and down linears (``None``: no DoRA there)."""


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
