"""The semantics of DynMoLE's routing and losses, in float64, token by token: the top-p ∪ top-k
gate with its Tsallis-entropy broadcast (:class:`~moleforge.ir.gates.TopPTsallis`) and the
``tsallis_entropy`` and ``soft_lb`` aux losses. Rules of :mod:`.interpret`.

Selection per token: the experts sorted by probability (descending, ties to the lower index),
the shortest prefix whose sum reaches ``top_p`` (all E if rounding keeps the sum below it), at
least ``k`` long; all E when the normalised entropy exceeds the threshold. The margin is the
smallest distance of a quantity that decides the selection from its cut: the gap between the
last kept and the first dropped probability, the prefix sums next to ``top_p`` and the entropy
next to the threshold. The gate has no index tensor (its width varies); fixed-routing mode does
not apply to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .values import Routing

__all__ = ["normalised_tsallis", "top_p_gate", "top_p_aux"]

F64 = torch.float64


def normalised_tsallis(probs: Tensor, q: float) -> Tensor:
    """``H_q(p) / H_q(uniform)`` of each row of ``probs (T, E)``: ``(1 - Σ p^q) / (1 - E^{1-q})``,
    at ``q = 1`` Shannon's ``-Σ p ln p / ln E``; 0 for one expert. ``(T,)``."""
    E = probs.shape[-1]
    if E == 1:
        return probs.sum(-1) * 0.0
    if q == 1.0:
        return -torch.xlogy(probs, probs).sum(-1) / math.log(E)
    return (1.0 - probs.pow(q).sum(-1)) / (1.0 - E ** (1.0 - q))


def _keep(row: Tensor, h: float, g) -> tuple[Tensor, float]:
    """The kept experts of one token's probabilities ``row (E,)`` and the selection margin."""
    E = row.numel()
    order = torch.sort(row.detach(), descending=True, stable=True).indices  # (E,)
    cum = torch.cumsum(row.detach()[order], 0)  # (E,)
    reached = (cum >= g.top_p).nonzero()
    m = int(reached[0]) + 1 if reached.numel() else E  # shortest prefix reaching top_p
    margin = abs(h - g.threshold)
    near = [m - 2, m - 1] if reached.numel() else [E - 1]
    margin = min([margin] + [abs(float(cum[j]) - g.top_p) for j in near if 0 <= j < E])
    count = E if h > g.threshold else max(m, g.k)
    if count < E:
        margin = min(margin, float(row[order[count - 1]].detach() - row[order[count]].detach()))
    return order[:count], margin


def top_p_gate(g, z: Tensor, p, experts: int, fixed) -> tuple[Routing, float]:
    """Rule of ``GATES`` for :class:`~moleforge.ir.gates.TopPTsallis`: ``(routing, margin)``."""
    probs = torch.softmax(z, 1)  # (T, E)
    h = normalised_tsallis(probs, g.q)  # (T,)
    rows, margin = [], math.inf
    for t in range(probs.shape[0]):
        sel, m = _keep(probs[t], float(h[t].detach()), g)
        margin = min(margin, m)
        row = torch.zeros(experts, dtype=F64)
        row[sel] = 1.0
        rows.append(probs[t] * row)
    gates = torch.stack(rows) if rows else probs * 0.0  # (T, E)
    return Routing(gates, probs), margin


def top_p_aux(n, route: Routing) -> Tensor:
    """``tsallis_entropy``: ``w · mean_t H_q(p_t)``; ``soft_lb``: ``w · E · Σ_i mean_t(g_ti) mean_t(p_ti)``."""
    gates, probs = route.gates, route.probs
    if n.kind == "tsallis_entropy":
        return n.weight * normalised_tsallis(probs, n.q).mean()
    return n.weight * probs.shape[1] * torch.sum(gates.mean(0) * probs.mean(0))
