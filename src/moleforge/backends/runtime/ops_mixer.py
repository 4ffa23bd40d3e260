"""Ops of LoRA-Mixer: a router that is dense in training and top-k in evaluation, and its RSL
loss."""

from __future__ import annotations

import torch
from torch import Tensor

from ...ir.values import Routing
from .dist import all_sum, reduce_group
from .ops import route_dense, route_softmax_topk
from .ops_decode import aux_wanted

__all__ = ["route_dense_train_topk", "rsl_loss"]


def route_dense_train_topk(z: Tensor, k: int, renormalize: bool, temperature: float, training: bool) -> Routing:
    """Dense softmax in training; softmax top-k in evaluation."""
    if training:
        return route_dense(z, temperature)
    return route_softmax_topk(z, k, renormalize, temperature)


def rsl_loss(probs: Tensor, k: int, weight: float, entropy: float, mask: Tensor | None = None,
             training: bool = False, group=None, eval_aux: bool = True) -> Tensor | None:
    """``weight · Σ_i P_i f_i - entropy · mean_t H(p_t)`` over the tokens (the real ones with a
    ``mask``; of every rank's when ``group`` reduces): ``f_i`` expert i's share of the top-k
    selections of the probabilities, ``P_i`` its mean probability."""
    if not aux_wanted(training, eval_aux):
        return None
    T, E = probs.shape
    index = probs.detach().topk(k, dim=-1).indices  # (T, k)
    hits = torch.zeros_like(probs).scatter(1, index, 1.0)  # (T, E)
    h = -(probs * torch.log(probs)).sum(1, keepdim=True)  # (T, 1)
    n = probs.new_full((1,), T)
    if mask is not None:
        keep = mask.unsqueeze(1)
        probs, hits, h = torch.where(keep, probs, 0), torch.where(keep, hits, 0), torch.where(keep, h, 0)
        n = mask.sum().to(probs.dtype).reshape(1)
    total = torch.cat([probs.sum(0), hits.sum(0), h.sum(0), n])  # (2E + 2,)
    pg = reduce_group(group, training)
    if pg is not None:
        total = all_sum(total, pg)
    p_sum, counts, h_sum, n = total[:E], total[E:2 * E], total[2 * E], total[2 * E + 1].clamp_min(1)
    return weight * torch.sum(p_sum / n * counts / (n * k)) - entropy * h_sum / n
