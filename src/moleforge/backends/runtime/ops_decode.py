"""The decode path's forms of the ops: few tokens per call (one per sequence in a decoding step).

At a handful of tokens a sparse pool's grouped form costs its fixed work (sorting the
(token, slot) pairs, gathers, a scatter, one small GEMM per expert) for a few numbers; computing
all ``E`` experts in one dense GEMM and gating afterwards costs ``T·(E - k)·r·(d_in + d_out)``
extra multiply-adds and none of that. The kernel policy says at how many tokens
(``KernelPolicy.decode_tokens``); the result is the same sum (unselected experts have gate 0),
up to the order of the floating-point additions.

Without autograd in evaluation mode a generated module computes no aux loss (:func:`aux_wanted`)
unless it is asked to (its ``eval_aux`` attribute, ``handle.eval_aux(True)``): nothing could
differentiate it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packed import PackCache, packed

__all__ = ["dense_mix", "aux_wanted"]


def aux_wanted(training: bool, eval_aux: bool) -> bool:
    """Whether a forward computes its aux losses: in training mode, with autograd on, or when
    asked to (``eval_aux``)."""
    return training or eval_aux or torch.is_grad_enabled()


def _stacked(a: Tensor, b: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """``A (E|1, r, d_in)``, ``B (E|1, d_out, r)`` as ``(E·r, d_in)`` rows and ``(d_out, E·r)``
    columns, a factor stored once repeated for each expert."""
    _, r, d_in = a.shape
    d_out = b.shape[1]
    rows = a.expand(E, r, d_in).reshape(E * r, d_in)  # (E·r, d_in)
    cols = b.expand(E, d_out, r).permute(1, 0, 2).reshape(d_out, E * r)  # (d_out, E·r)
    return rows, cols


def dense_mix(x: Tensor, gates: Tensor, a: Tensor, b: Tensor, scale: float,
              cache: PackCache | None = None, name: str = "dense_mix") -> Tensor:
    """``Σ_e scale·g_e B_e A_e x`` over all experts: ``(x A_rowsᵀ ⊙ repeat(scale·g, r)) B_colsᵀ``.

    ``x (T, d_in)``, ``gates (T, E)`` (zero for unselected experts), ``a (E|1, r, d_in)``,
    ``b (E|1, d_out, r)`` -> ``(T, d_out)``. The stacked factors are kept by ``cache`` between
    calls without autograd.
    """
    T, E = gates.shape
    r = a.shape[1]
    rows, cols = packed(cache, name, (a, b), lambda: _stacked(a, b, E))  # type: ignore[misc]
    h = x @ rows.T  # (T, E·r)
    g = (h.view(T, E, r) * (gates * scale).unsqueeze(-1)).view(T, E * r)  # (T, E·r)
    return g @ cols.T  # (T, d_out)
