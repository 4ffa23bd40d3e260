"""The float64 semantics of X-LoRA's site scalings and gate (``xlora_nodes``, ``gates.XLoRAScale``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from .interpret_tree import stable_top
from .values import Routing

__all__ = ["run_layer_scalings", "xlora_gate"]

F64 = torch.float64


def run_layer_scalings(n, src: Tensor, scalings: Tensor | None) -> Tensor:
    """The call's scalings ``(T, E)`` of the site, checked against its tokens and experts."""
    T = src.shape[0]
    if scalings is None:
        raise InputError(f"router {n.origin or n.id} reads X-LoRA scalings, and none were given for this call: "
                         "pass scalings=(T, E) (a model runs its X-LoRA classifier first)")
    if tuple(scalings.shape) != (T, n.experts):
        raise InputError(f"router {n.origin or n.id}: X-LoRA scalings have shape {tuple(scalings.shape)}, the site "
                         f"needs (T, E) = {(T, n.experts)}")
    return scalings.to(F64)


def xlora_gate(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    """``g = weight · s'``: ``s' = s`` kept at the top ``top_k`` per token (or the ``fixed``
    indices), then softmax over the non-zero kept entries if ``softmax_topk``. The margin is the
    smallest gap between the last kept and the first dropped scaling (``inf`` when dense)."""
    T, E = z.shape
    kept, margin = z, math.inf
    if g.top_k is not None:
        rows = []
        for t in range(T):
            if fixed is not None:
                sel = torch.as_tensor(fixed[t])
            else:
                sel, m = stable_top(z[t], g.top_k)
                margin = min(margin, m)
            mask = torch.zeros(E, dtype=F64)
            mask[sel] = 1.0
            rows.append(z[t] * mask)
        kept = torch.stack(rows) if rows else z
    if g.softmax_topk:
        rows = []
        for t in range(T):
            nz = kept[t] != 0
            row = torch.zeros(E, dtype=F64)
            if bool(nz.any()):
                row = row.index_put((nz.nonzero()[:, 0],), torch.softmax(kept[t][nz], 0))
            rows.append(row)
        kept = torch.stack(rows) if rows else kept
    return Routing(g.weight * kept, z), margin
