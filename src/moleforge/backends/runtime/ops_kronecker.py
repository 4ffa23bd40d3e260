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

__all__ = ["kronecker_group", "kronecker_mix", "task_embed", "task_scale", "task_contrastive"]


def kronecker_group(x: Tensor, g: Tensor, a: Tensor, b: Tensor, kernels: Tensor, d_out: int) -> Tensor:
    """``Σ_i g_i x ((b[:h] a[:, :w]) ⊗ K_i)[:d_out, :d_in]ᵀ`` over experts of one kernel size ``s``
    (``kernels (E_s, s, s)``, ``g (T, E_s)``, ``h = ⌈d_out/s⌉``, ``w = ⌈d_in/s⌉``): they share
    ``Z = b[:h] a[:, :w]``, so ``V = Z X`` is computed once and the kernels merge per token,
    ``Y = V K̃_tᵀ`` with ``K̃_t = Σ_i g_ti K_i``. A width ``s`` does not divide costs a zero-padded
    token (``w·s`` entries) and a cut output: ``(T, d_out)``."""
    T, d_in = x.shape
    s = kernels.shape[-1]
    w, h = -(-d_in // s), -(-d_out // s)
    if w * s != d_in:  # the padded columns meet zeros, as if the product were cut to d_in
        x = F.pad(x, (0, w * s - d_in))  # (T, w·s)
    cols = x.reshape(T, w, s).transpose(1, 2).reshape(T * s, w)  # (T·s, w): the s columns of every token's X
    v = (cols @ a[:, :w].T) @ b[:h].T  # (T·s, h): Z X, column by column
    merged = (g @ kernels.reshape(kernels.shape[0], s * s)).reshape(T, s, s)  # (T, s, s): K̃_t
    y = torch.bmm(merged, v.reshape(T, s, h))  # (T, s, h): (K̃_t (Z X)ᵀ), long rows for the batched product
    return y.transpose(1, 2).reshape(T, h * s)[:, :d_out]  # y[a·s + c] = Y[a, c], cut to d_out


def kronecker_mix(x: Tensor, gates: Tensor, index: Tensor | None, a: Tensor, b: Tensor, kernels: tuple[Tensor, ...],
                  d_out: int, scale: float) -> Tensor:
    """``Σ_i g_i · scale · x ΔW_iᵀ``, the experts grouped by kernel size (:func:`kronecker_group`).
    With a top-k routing's ``index (T, k)``, each group runs on the tokens that selected one of its
    experts (gathered, then added back; a selected gate that underflowed to 0 still passes its
    gradient); ``None``: every group on every token."""
    out = x.new_zeros(x.shape[0], d_out)
    for members in _by_size(kernels):
        g = gates[:, members] * scale  # (T, E_s)
        k = torch.stack([kernels[i] for i in members])  # (E_s, s, s)
        if index is None:
            out = out + kronecker_group(x, g, a, b, k, d_out)
            continue
        # the group's tokens, possibly none (its tensors still get their zero gradient)
        chosen = (index[:, :, None] == index.new_tensor(members)).any(2).any(1)  # (T,)
        idx = chosen.nonzero().squeeze(1)  # (T_s,)
        out = out.index_add(0, idx, kronecker_group(x[idx], g[idx], a, b, k, d_out))
    return out


def _by_size(kernels: tuple[Tensor, ...]) -> list[list[int]]:
    """The experts' indices grouped by kernel size, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(kernels):
        groups.setdefault(k.shape[0], []).append(i)
    return list(groups.values())


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
