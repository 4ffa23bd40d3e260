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

__all__ = ["NARROW", "linear", "NarrowLinear", "linear_into", "add_into"]

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
    if x.dim() == 2 and min(w.shape) <= NARROW and torch.is_grad_enabled():
        return NarrowLinear.apply(x, w, b)
    return F.linear(x, w, b)


def _accumulate(acc: Tensor, h: Tensor, w: Tensor, b: Tensor | None, scale: float) -> None:
    """``acc += scale · h wᵀ (+ b)`` in place."""
    flat = acc.view(-1, w.shape[0]).addmm_(h, w.T, alpha=scale)
    if b is not None:
        flat.add_(b)


class _LinearInto(torch.autograd.Function):
    """``acc += scale · h wᵀ (+ b)`` in place (``acc (..., out)``, ``h (T, r)``): the adapter's
    last GEMM accumulates into the frozen layer's output, so neither ``Δy`` nor a scaled copy is
    materialised and no separate sum runs; gradients in the fast orientation of :func:`_mm`."""

    @staticmethod
    def forward(ctx, acc: Tensor, h: Tensor, w: Tensor, b: Tensor | None, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, w)
        ctx.scale = scale
        _accumulate(acc, h, w, b, scale)
        ctx.mark_dirty(acc)
        return acc

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, w = ctx.saved_tensors
        g2 = g.reshape(-1, w.shape[0])
        gh = _mm(g2, w) if ctx.needs_input_grad[1] else None
        gw = _mm(g2.T, h) if ctx.needs_input_grad[2] else None
        gb = g2.sum(0) if ctx.needs_input_grad[3] else None
        if ctx.scale != 1.0:
            gh = None if gh is None else gh * ctx.scale
            gw = None if gw is None else gw * ctx.scale
        return g, gh, gw, gb, None


def linear_into(acc: Tensor | None, h: Tensor, w: Tensor, b: Tensor | None, scale: float) -> Tensor:
    """``scale · h wᵀ + b`` (``(T, out)``; ``b`` only with ``scale`` 1), or with ``acc`` (the frozen
    layer's output, any shape ending in ``out``, that no backward reads): ``acc`` plus it,
    accumulated in place."""
    if acc is None:
        out = linear(h, w, b)
        return out if scale == 1.0 else out * scale
    if torch.compiler.is_compiling():
        flat = torch.addmm(acc.reshape(-1, w.shape[0]), h, w.T, alpha=scale)
        return (flat if b is None else flat + b).view(acc.shape)
    if not torch.is_grad_enabled():  # no autograd: the same in-place sum without the Function's overhead
        _accumulate(acc, h, w, b, scale)
        return acc
    return _LinearInto.apply(acc, h, w, b, scale)


def add_into(acc: Tensor | None, delta: Tensor) -> Tensor:
    """``delta (T, out)``, or with ``acc``: ``acc + delta`` in ``acc``'s shape."""
    return delta if acc is None else acc + delta.view(acc.shape)
