"""The routed low-rank product as Triton kernels behind a ``torch.library`` custom op:

    y[t] = Σ_{p : row[p] = t} w[p] · B_{e[p]} (A_{e[p]} x_t)        x (T, d_in) -> y (T, d_out)

over ``P`` (token, expert) pairs: the sparse expert pool of ``ops.grouped_mix``, whose pairs
are each token's selected experts and ``w`` their gates times the scale. Nothing of size
``(P, d_in)`` or ``(P, d_out)`` is built: the forward gathers ``h = A_e x_t (P, r)`` in one
kernel and scatters ``w·B_e h`` into ``y`` in another; the backward runs the same two kernels
with the factors transposed (through strides) for ``∂h`` and ``∂x``, and an outer-product
kernel for ``∂A`` and ``∂B``. Layers: kernels (``lowrank_kernels.py``) -> launchers, which
validate their inputs -> custom ops ``moleforge::routed_lowrank`` (and its backward) with fake
and autograd registrations -> ``ops.grouped_mix``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import check_device
from . import lowrank_kernels as kernels

__all__ = ["routed_lowrank", "check_inputs"]

BLOCK_P, BLOCK_K, BLOCK_N = 16, 32, 32


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(x: Tensor, row: Tensor, w: Tensor, expert: Tensor, a: Tensor, b: Tensor) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype or device does not fit."""

    def bad(name: str, t: Tensor, want: str) -> ValueError:
        return ValueError(f"routed_lowrank: {name} has shape {tuple(t.shape)}, dtype {t.dtype}, device "
                          f"{t.device}; expected {want}")

    if x.dim() != 2 or not x.is_floating_point():
        raise bad("x", x, "a floating (tokens, d_in) matrix")
    if row.dim() != 1 or row.dtype != torch.int64:
        raise bad("row", row, "int64 of shape (pairs,)")
    P = row.shape[0]
    if expert.shape != (P,) or expert.dtype != torch.int64:
        raise bad("expert", expert, f"int64 of shape ({P},), one expert per pair")
    if w.shape != (P,) or w.dtype != x.dtype:
        raise bad("w", w, f"{x.dtype} of shape ({P},), one weight per pair")
    if a.dim() != 3 or a.shape[2] != x.shape[1] or a.dtype != x.dtype:
        raise bad("a", a, f"{x.dtype} of shape (experts, rank, {x.shape[1]})")
    if b.dim() != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1] or b.dtype != x.dtype:
        raise bad("b", b, f"{x.dtype} of shape ({a.shape[0]}, d_out, {a.shape[1]})")
    for name, t in (("row", row), ("w", w), ("expert", expert), ("a", a), ("b", b)):
        if t.device != x.device:
            raise bad(name, t, f"a tensor on {x.device}, the device of x")


def _rank_block(r: int) -> int:
    return max(triton.next_power_of_2(r), 2)


def gather_down(src: Tensor, row: Tensor, expert: Tensor, m: Tensor) -> Tensor:
    """``out[p] = m[e[p]] src[row[p]]``: ``src (T, K)``, ``m (E, r, K)`` (any strides) -> ``(P, r)``."""
    src = src.contiguous()
    P, (_, r, K) = row.shape[0], m.shape
    out = src.new_empty(P, r, dtype=_acc_dtype(src))
    if P:
        kernels.gather_down_kernel[(triton.cdiv(P, BLOCK_P),)](
            src, row, expert, m, out, P, K, r, src.stride(0), *m.stride(), out.stride(0),
            BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, R=_rank_block(r))
    return out


def up_scatter(v: Tensor, row: Tensor, expert: Tensor, m: Tensor, T: int) -> Tensor:
    """``dst[row[p]] += m[e[p]] v[p]``: ``v (P, r)``, ``m (E, N, r)`` (any strides) -> ``(T, N)``."""
    v = v.contiguous()
    P, (_, N, r) = row.shape[0], m.shape
    dst = v.new_zeros(T, N, dtype=_acc_dtype(v))
    if P:
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(N, BLOCK_N))
        kernels.up_scatter_kernel[grid](v, row, expert, m, dst, P, N, r, v.stride(0), *m.stride(), dst.stride(0),
                                        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, R=_rank_block(r))
    return dst


def outer_scatter(src: Tensor, row: Tensor, v: Tensor, expert: Tensor, E: int) -> Tensor:
    """``g[e[p]] += src[row[p]] ⊗ v[p]``: ``src (T, N)``, ``v (P, r)`` -> ``(E, N, r)``."""
    src, v = src.contiguous(), v.contiguous()
    P, N, r = row.shape[0], src.shape[1], v.shape[1]
    g = src.new_zeros(E, N, r, dtype=_acc_dtype(src))
    if P:
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(N, BLOCK_N))
        kernels.outer_scatter_kernel[grid](src, row, v, expert, g, P, N, r, src.stride(0), v.stride(0),
                                           g.stride(0), g.stride(1), BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
                                           R=_rank_block(r))
    return g


@torch.library.custom_op("moleforge::routed_lowrank", mutates_args=())
def _routed_lowrank(x: Tensor, row: Tensor, w: Tensor, expert: Tensor, a: Tensor, b: Tensor) -> Tensor:
    h = gather_down(x, row, expert, a)  # (P, r)
    return up_scatter(h * w[:, None].to(h.dtype), row, expert, b, x.shape[0]).to(x.dtype)  # (T, d_out)


@_routed_lowrank.register_fake
def _(x, row, w, expert, a, b):
    return x.new_empty(x.shape[0], b.shape[1])


@torch.library.custom_op("moleforge::routed_lowrank_backward", mutates_args=())
def _routed_lowrank_backward(gy: Tensor, x: Tensor, row: Tensor, w: Tensor, expert: Tensor, a: Tensor,
                             b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    E, T = a.shape[0], x.shape[0]
    h = gather_down(x, row, expert, a)  # (P, r)
    wc = w[:, None].to(h.dtype)
    g_hw = gather_down(gy, row, expert, b.transpose(1, 2))  # (P, r) = B_eᵀ ∂y[row]
    g_h = g_hw * wc
    g_x = up_scatter(g_h, row, expert, a.transpose(1, 2), T)  # (T, d_in)
    g_a = outer_scatter(x, row, g_h, expert, E).transpose(1, 2)  # (E, r, d_in)
    g_b = outer_scatter(gy, row, h * wc, expert, E)  # (E, d_out, r)
    g_w = (g_hw * h).sum(1)  # (P,)
    return g_x.to(x.dtype), g_w.to(w.dtype), g_a.to(a.dtype).contiguous(), g_b.to(b.dtype)


@_routed_lowrank_backward.register_fake
def _(gy, x, row, w, expert, a, b):
    return x.new_empty(x.shape), w.new_empty(w.shape), a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy: Tensor):
    x, row, w, expert, a, b = ctx.saved_tensors
    g_x, g_w, g_a, g_b = _routed_lowrank_backward(gy.contiguous(), x, row, w, expert, a, b)
    return g_x, None, g_w, None, g_a, g_b


_routed_lowrank.register_autograd(_backward, setup_context=_setup_context)


def routed_lowrank(x: Tensor, row: Tensor, w: Tensor, expert: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``y (T, d_out)`` of the module docstring. ``x (T, d_in)``; per pair ``row``, ``expert``
    (int64) and ``w``; ``a (E, r, d_in)``, ``b (E, d_out, r)``, expanded (stride 0) factors
    allowed. Expert indices are not range-checked on the device (that would synchronise)."""
    check_inputs(x, row, w, expert, a, b)
    check_device("routed_lowrank", x)
    return _routed_lowrank(x, row, w, expert, a, b)
