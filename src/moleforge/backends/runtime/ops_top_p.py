"""Runtime ops of the variable-width routers: DynMoLE's (Li et al. 2025) top-p ∪ top-k gate
with its Tsallis-entropy broadcast and its two aux losses, and MoRA-CL's self-activated gate.
Vectorised; they agree with the reference interpreter (``ir/interpret_top_p.py``,
``ir/interpret.py``) up to the tolerance table and selection near-ties.

The gate's routing has no index tensor: each token keeps from ``k`` to E experts, so the sparse
pool (``ops.grouped_mix``) takes its (token, expert) pairs from the non-zero gates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...ir.values import Routing
from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted

__all__ = ["route_top_p", "route_self_activated", "normalised_tsallis", "tsallis_entropy_loss", "soft_lb"]


def normalised_tsallis(probs: Tensor, q: float) -> Tensor:
    """``(1 - Σ_i p_i^q) / (1 - E^{1-q})`` per row of ``probs (T, E)`` (Shannon's
    ``-Σ p ln p / ln E`` at ``q = 1``; 0 for one expert): ``(T,)`` in [0, 1]."""
    E = probs.shape[-1]
    if E == 1:
        return probs.sum(-1) * 0.0
    if q == 1.0:
        return -torch.xlogy(probs, probs).sum(-1) / math.log(E)
    return (1.0 - probs.pow(q).sum(-1)) / (1.0 - E ** (1.0 - q))


def route_top_p(z: Tensor, k: int, top_p: float, q: float, threshold: float) -> Routing:
    """-> ``(gates (T, E), probs (T, E), None)``: the kept probabilities, not renormalised."""
    probs = torch.softmax(z, dim=-1)  # (T, E)
    E = probs.shape[-1]
    with torch.no_grad():
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (T, E)
        reach = (sorted_p.cumsum(-1) < top_p).sum(-1) + 1  # (T,) shortest prefix reaching top_p
        count = reach.clamp(min=k, max=E)  # (T,)
        count = torch.where(normalised_tsallis(probs, q) > threshold, E, count)  # (T,) broadcast
        keep = torch.arange(E, device=z.device) < count.unsqueeze(-1)  # (T, E) in sorted order
        mask = torch.zeros_like(keep).scatter(-1, order, keep)  # (T, E)
    return Routing(probs * mask, probs, None)


def route_self_activated(h: Tensor, k: int, temperature: float, threshold: float, training: bool) -> Routing:
    """MoRA-CL's self-activated routing on the experts' own activations ``h (T, R)``:
    ``w = softmax(|h| / τ)``; training keeps the top-k (``index (T, k)``), evaluation every
    ``w >= threshold`` (a variable count, ``index None``). -> ``(gates, w, index)``."""
    w = torch.softmax(h.abs() / temperature, dim=-1)  # (T, R)
    if training:
        top, index = w.topk(k, dim=-1)  # (T, k)
        return Routing(torch.zeros_like(w).scatter(1, index, top), w, index)
    return Routing(torch.where(w >= threshold, w, 0.0), w, None)


def _mean_over_tokens(v: Tensor, mask: Tensor | None, training: bool, group) -> Tensor:
    """The mean over tokens (the real ones with a ``mask``; every rank's when ``group`` reduces)
    of ``v (T, ...)``."""
    if mask is not None:
        v = torch.where(mask.view(-1, *([1] * (v.dim() - 1))), v, 0)
    n = v.new_full((1,), v.shape[0]) if mask is None else mask.sum().to(v.dtype).reshape(1)
    total = v.sum(0).reshape(-1)
    pg = reduce_group(group, training)
    if pg is not None:
        both = all_sum(torch.cat([total, n]), pg)
        total, n = both[:-1], both[-1:]
    return (total / n.clamp_min(1)).reshape(v.shape[1:])


def tsallis_entropy_loss(probs: Tensor, q: float, weight: float, mask: Tensor | None = None,
                         training: bool = False, group=None, eval_aux: bool = True) -> Tensor | None:
    """``weight · mean_t H_q(p_t)`` over the tokens (the real ones with a ``mask``); ``None`` in
    evaluation mode without autograd unless ``eval_aux``."""
    if not aux_wanted(training, eval_aux):
        return None
    return weight * _mean_over_tokens(normalised_tsallis(probs, q), mask, training, group)


def soft_lb(gates: Tensor, probs: Tensor, weight: float, mask: Tensor | None = None, training: bool = False,
            group=None, eval_aux: bool = True) -> Tensor | None:
    """``weight · E · Σ_i mean_t(g_ti) · mean_t(p_ti)`` over the tokens (the real ones with a ``mask``);
    ``None`` in evaluation mode without autograd unless ``eval_aux``."""
    if not aux_wanted(training, eval_aux):
        return None
    E = probs.shape[-1]
    means = _mean_over_tokens(torch.cat([gates, probs], -1), mask, training, group)  # (2E,)
    return weight * E * torch.sum(means[:E] * means[E:])
