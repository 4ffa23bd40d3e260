"""Pieces of routed FFN-block experts over sorted slots (``ops_block.SlotPlan``): the block
activations and their fused backwards, and the autograd functions of the node-by-node ops
(each expert's low-rank product on its own contiguous segment of slots, in the GEMM
orientation CPU BLAS runs fast; the weighted sum with a gather-based backward). The fused
form of a whole block is ``ops_block_fused.RoutedFFN``.

Shapes: ``S`` slots sorted by expert, ``counts[e]`` of them for expert e; ``token (S,)``. With
equal counts (a dense router) every grouped product is one batched GEMM; otherwise one GEMM
per expert.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "activation_backward", "SegmentMatmul", "SlotSum", "segments", "bounds",
           "grouped_mm", "grouped_mm_t", "grouped_outer"]


def segments(counts: list[int]):
    """``(expert, start, stop)`` of every non-empty segment."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def bounds(counts: list[int]):
    """``(start, stop)`` of every segment, empty ones included."""
    start = 0
    for n in counts:
        yield start, start + n
        start += n


def _uniform(counts: list[int]) -> bool:
    """Equal segments (every expert sees every token under a dense router): each grouped
    product is one batched GEMM."""
    return len(set(counts)) == 1


def _mm_few_columns(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y`` (batched or not) for a result with few columns, as ``(yᵀ xᵀ)ᵀ``: CPU BLAS runs
    the tall, narrow shape several times slower."""
    return (y.transpose(-1, -2) @ x.transpose(-1, -2)).transpose(-1, -2)


def grouped_mm_t(u: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``y[seg_e] = u[seg_e] @ w[e]ᵀ`` with few output columns: ``(S, i), (E, o, i) -> (S, o)``."""
    E, o, _ = w.shape
    if _uniform(counts):
        return _mm_few_columns(u.view(E, counts[0], -1), w.transpose(1, 2)).reshape(-1, o)
    parts = [_mm_few_columns(u[lo:hi], w[e].T) for e, lo, hi in segments(counts)]  # (n_e, o)
    return torch.cat(parts) if parts else u.new_zeros(0, o)


def grouped_mm(g: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``y[seg_e] = g[seg_e] @ w[e]``: ``(S, o), (E, o, i) -> (S, i)``."""
    E, _, i = w.shape
    if _uniform(counts):
        return torch.bmm(g.view(E, counts[0], -1), w).reshape(-1, i)
    parts = [g[lo:hi] @ w[e] for e, lo, hi in segments(counts)]  # (n_e, i)
    return torch.cat(parts) if parts else g.new_zeros(0, i)


def grouped_outer(g: Tensor, u: Tensor, counts: list[int]) -> Tensor:
    """``y[e] = g[seg_e]ᵀ @ u[seg_e]``: ``(S, o), (S, i) -> (E, o, i)``; E = ``len(counts)``."""
    E = len(counts)
    if _uniform(counts):
        return torch.bmm(g.view(E, counts[0], -1).transpose(1, 2), u.view(E, counts[0], -1))
    zero = g.new_zeros(g.shape[1], u.shape[1])
    return torch.stack([g[lo:hi].T @ u[lo:hi] if hi > lo else zero  # (o, i)
                        for lo, hi in bounds(counts)])


class SegmentMatmul(torch.autograd.Function):
    """``y[seg_e] = u[seg_e] @ w[e]ᵀ``: ``u (S, i)``, ``w (E, o, i)`` -> ``(S, o)``, for a small ``o``
    (a rank)."""

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(u, w)
        ctx.counts = counts
        return grouped_mm_t(u, w, counts)

    @staticmethod
    def backward(ctx, gy: Tensor):
        u, w = ctx.saved_tensors
        gu = grouped_mm(gy, w, ctx.counts) if ctx.needs_input_grad[0] else None  # (S, i)
        gw = grouped_outer(gy, u, ctx.counts) if ctx.needs_input_grad[1] else None  # (E, o, i)
        return gu, gw, None


def _quick_gelu(v: Tensor) -> Tensor:
    return v * torch.sigmoid(1.702 * v)


def _gelu_tanh(v: Tensor) -> Tensor:
    return F.gelu(v, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "quick_gelu": _quick_gelu,
}
"""Torch forms of ``moleforge.ir.BlockActivation``."""


def activation_backward(name: str, grad: Tensor, x: Tensor) -> Tensor:
    """``grad ⊙ act'(x)`` in one fused pass where ATen has the kernel."""
    match name:
        case "silu":
            return torch.ops.aten.silu_backward(grad, x)
        case "gelu":
            return torch.ops.aten.gelu_backward(grad, x)
        case "gelu_tanh":
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        case "relu":
            return torch.ops.aten.threshold_backward(grad, x, 0)
    pre = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = ACTIVATIONS[name](pre)
    return torch.autograd.grad(out, pre, grad)[0]


class SlotSum(torch.autograd.Function):
    """``y[t] = Σ_{slots s of token t} g_s h_s``: ``h (S, F)``, ``gate (S,)`` -> ``(T, F)``."""

    @staticmethod
    def forward(ctx, h: Tensor, gate: Tensor, token: Tensor, T: int) -> Tensor:
        ctx.save_for_backward(h, gate, token)
        return h.new_zeros(T, h.shape[1]).index_add_(0, token, h * gate[:, None])

    @staticmethod
    def backward(ctx, gy: Tensor):
        h, gate, token = ctx.saved_tensors
        rows = gy.index_select(0, token)  # (S, F)
        d_gate = torch.linalg.vecdot(rows, h) if ctx.needs_input_grad[1] else None  # (S,)
        d_h = rows.mul_(gate[:, None]) if ctx.needs_input_grad[0] else None
        return d_h, d_gate, None, None

