"""Ops of routing by task: scores from each token's task id, and MeteoRA's supervised routing
loss. The task ids arrive as the sample types of the site's ``samples`` (``(T,)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir.task_nodes import task_labels
from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted

__all__ = ["task_scores", "task_routing_loss"]


def task_scores(src: Tensor, table: Tensor | None, samples, experts: int, tasks: int, token_scores: bool,
                what: str) -> Tensor:
    """``(src if token_scores else 0) + (table[t] if table else onehot(t))``: ``(T, E)``."""
    t = task_labels(samples, tasks, what).to(src.device)
    add = table[t] if table is not None else F.one_hot(t, experts).to(src.dtype)  # (T, E)
    return src + add if token_scores else add


def task_routing_loss(probs: Tensor, samples, weight: float, temperature: float, mask: Tensor | None,
                      training: bool, group, what: str, eval_aux: bool = True) -> Tensor | None:
    """``weight · mean_t CE(softmax(log p_t / τ), task_t)`` over the tokens (the real ones with a
    ``mask``; of every rank's when ``group`` reduces). Without task ids (inference) it is 0."""
    if not aux_wanted(training, eval_aux):
        return None
    T, E = probs.shape
    if samples is None or samples[1] is None:
        return probs.sum() * 0.0
    label = task_labels(samples, E, what).to(probs.device)
    logp = torch.log_softmax(torch.log(probs) / temperature, 1)  # (T, E)
    nll = -logp.gather(1, label.unsqueeze(1)).squeeze(1)  # (T,)
    if mask is not None:
        nll = torch.where(mask, nll, 0)
    n = probs.new_full((1,), T) if mask is None else mask.sum().to(probs.dtype).reshape(1)
    total = torch.cat([nll.sum().reshape(1), n])
    pg = reduce_group(group, training)
    if pg is not None:
        total = all_sum(total, pg)
    return weight * total[0] / total[1].clamp_min(1)
