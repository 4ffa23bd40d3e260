"""Runtime ops of EPT's nodes (``ir/kronecker_nodes.py``): Kronecker-product experts computed by
the vec trick, never as a ``d_out × d_in`` matrix; the task embedding, the per-task factor and the
contrastive loss. They agree with the interpreter (``ir/interpret_kronecker.py``) up to the
tolerance table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir.task_nodes import task_labels
from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted

__all__ = ["kronecker_expert", "kronecker_mix", "task_embed", "task_scale", "task_contrastive"]


def kronecker_expert(x: Tensor, a: Tensor, b: Tensor, kernel: Tensor, d_out: int) -> Tensor:
    """``x ((b[:h] a[:, :w]) ⊗ K)ᵀ`` for ``x (T, d_in)``, ``w = d_in/s``, ``h = d_out/s``:
    ``X K_iᵀ`` on the token's rows, then the meta-seed's two GEMMs on every column: ``(T, d_out)``."""
    T, d_in = x.shape
    s = kernel.shape[0]
    w, h = d_in // s, d_out // s
    xk = x.reshape(T, w, s) @ kernel.T  # (T, w, s): X K_iᵀ
    cols = xk.transpose(1, 2).reshape(T * s, w)  # (T·s, w): the s columns of every token
    u = cols @ a[:, :w].T  # (T·s, R)
    y = u @ b[:h].T  # (T·s, h)
    return y.reshape(T, s, h).transpose(1, 2).reshape(T, d_out)  # y[a·s + c] = Y[a, c]


def kronecker_mix(x: Tensor, gates: Tensor, a: Tensor, b: Tensor, kernels: tuple[Tensor, ...], d_out: int,
                  scale: float, sparse: bool) -> Tensor:
    """``Σ_i g_i · scale · x ΔW_iᵀ``. ``sparse``: each expert runs on the tokens that route to it
    (gathered, then added back), not on every token."""
    out = x.new_zeros(x.shape[0], d_out)
    for i, kernel in enumerate(kernels):
        g = gates[:, i]  # (T,)
        if not sparse:
            out = out + (g * scale)[:, None] * kronecker_expert(x, a, b, kernel, d_out)
            continue
        idx = g.nonzero().squeeze(1)  # (T_i,) possibly none: the expert's tensors still get their (zero) gradient
        y = kronecker_expert(x[idx], a, b, kernel, d_out)  # (T_i, d_out)
        out = out.index_add(0, idx, (g[idx] * scale)[:, None] * y)
    return out


def task_embed(x: Tensor, table: Tensor, samples, what: str) -> Tensor:
    """``x_t + table[task_t]``: ``(T, width)``; ``x`` without task ids."""
    if samples is None or samples[1] is None:
        return x
    t = task_labels(samples, table.shape[0], what).to(x.device)
    return x + table[t]


def task_scale(x: Tensor, factors: tuple[float, ...], samples, what: str) -> Tensor:
    """``factors[task_t] · x_t``; ``x`` without task ids."""
    if samples is None or samples[1] is None:
        return x
    t = task_labels(samples, len(factors), what).to(x.device)
    return x * x.new_tensor(factors)[t][:, None]


def task_contrastive(x: Tensor, table: Tensor, samples, weight: float, temperature: float, mask: Tensor | None,
                     training: bool, group, what: str, eval_aux: bool = True) -> Tensor | None:
    """``weight · mean_t CE(cos(x_t, table) / τ, task_t)`` over the (real) tokens, of every rank's
    when ``group`` reduces; 0 without task ids (inference)."""
    if not aux_wanted(training, eval_aux):
        return None
    if samples is None or samples[1] is None:
        return (x.sum() + table.sum()) * 0.0
    label = task_labels(samples, table.shape[0], what).to(x.device)
    logits = F.normalize(x, dim=1) @ F.normalize(table, dim=1).T / temperature  # (T, tasks)
    nll = F.cross_entropy(logits, label, reduction="none")  # (T,)
    if mask is not None:
        nll = torch.where(mask, nll, 0)
    n = x.new_full((1,), x.shape[0]) if mask is None else mask.sum().to(x.dtype).reshape(1)
    total = torch.cat([nll.sum().reshape(1), n])
    pg = reduce_group(group, training)
    if pg is not None:
        total = all_sum(total, pg)
    return weight * total[0] / total[1].clamp_min(1)
