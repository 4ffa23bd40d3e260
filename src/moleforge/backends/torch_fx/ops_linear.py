"""``linear`` for the narrow GEMMs of low-rank adapters and routers.

CPU BLAS runs a product whose result has many rows and few columns (LoRA's ``∂B = gyᵀ h``
with a rank-8 ``h``, or ``∂h = gy B``) several times slower than the same product transposed.
For a weight with at most ``NARROW`` rows or columns, :class:`NarrowLinear` computes both
gradients in the fast orientation (the same products, only the summation order may differ);
the forward is ``F.linear`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NARROW", "linear", "NarrowLinear"]

NARROW = 32


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, as ``(bᵀ aᵀ)ᵀ`` when the result is tall and narrow."""
    if b.shape[1] <= NARROW and 4 * b.shape[1] <= a.shape[0]:
        return (b.T @ a.T).T.contiguous()
    return a @ b


class NarrowLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` for 2-D ``x``; both gradient GEMMs in their fast orientation."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        # the forward stays F.linear: the same rounding as nn.Linear (and PEFT / mixlora) gives
        return F.linear(x, w, b)  # (T, out)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        gx = _mm(gy, w) if ctx.needs_input_grad[0] else None  # (T, in)
        gw = _mm(gy.T, x) if ctx.needs_input_grad[1] else None  # (out, in)
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear``, through :class:`NarrowLinear` when ``x`` is 2-D and ``w`` has a narrow side."""
    if x.dim() == 2 and min(w.shape) <= NARROW:
        return NarrowLinear.apply(x, w, b)
    return F.linear(x, w, b)
