"""A routed LoRA pool's sparse training step in the compiled CPU kernel (``pool_sparse.cpp``): each
(token, slot) pair runs its own expert's factors only, forward and backward, reading the token rows
in place (no gathered copy, no scatter of per-pair results). Two ops, each with its backward:
``moleforge_cpu::pool_sparse`` (the pool under given gates; ``ops.grouped_mix`` calls it) and
``moleforge_cpu::routed_pool`` (the router, its softmax top-k gate and the pool;
``ops_routed.routed_grouped_mix`` calls it), where the kernel policy chooses them
(``KernelPolicy.grouped_kernel``: CPU float32/float64 once built). Each forward has an in-place form
that adds into the frozen output (eager) and a functional one (under ``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SparsePool", "sparse_pool", "RoutedPool", "routed_pool", "register_fakes"]


def _accumulated(acc: Tensor | None, x: Tensor, d_out: int) -> tuple[Tensor | None, bool]:
    """``acc`` as the ops read it, ``(T, d_out)`` contiguous, and whether the sum is added to it in
    place: outside ``torch.compile`` when ``acc`` is that tensor itself (the frozen output); else a new
    tensor holds ``acc`` plus the sum."""
    if acc is None:
        return None, False
    if acc.is_contiguous() and acc.shape == (x.shape[0], d_out) and not torch.compiler.is_compiling():
        return acc, True
    return acc.reshape(x.shape[0], d_out).contiguous(), False


def _factors(a: Tensor, b: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """``A (E, r, d_in)`` and ``Bᵀ (E, r, d_out)`` as the kernel reads them (a factor stored once
    repeated for each expert); called without autograd (inside the Functions)."""
    a = a if a.shape[0] == E and a.is_contiguous() else a.expand(E, *a.shape[1:]).contiguous()
    return a, b.expand(E, *b.shape[1:]).transpose(1, 2).contiguous()


def _factor_grads(da: Tensor | None, dbt: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The kernel's ``dA (E, r, d_in)`` and ``dBᵀ (E, r, d_out)`` as gradients of the stored factors
    (summed over the experts of a factor stored once)."""
    if da is not None and a.shape[0] != da.shape[0]:
        da = da.sum(0, keepdim=True)
    db = None if dbt is None else dbt.transpose(1, 2)
    if db is not None and b.shape[0] != db.shape[0]:
        db = db.sum(0, keepdim=True)
    return da, db


class SparsePool(torch.autograd.Function):
    """``y = acc + Σ_j w_tj B_e A_e x_t`` over token-major pairs; see ``pool_sparse.cpp``. With
    ``in_place`` the sum is added to ``acc`` itself (the frozen output, which no backward reads)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, index: Tensor, w: Tensor, acc: Tensor | None,  # type: ignore[override]
                in_place: bool):
        ak, bt = _factors(a, b, max(a.shape[0], b.shape[0]))
        if in_place:
            h = torch.ops.moleforge_cpu.pool_sparse_(x, ak, bt, index, w, acc)
            ctx.mark_dirty(acc)
            y = acc
        else:
            y, h = torch.ops.moleforge_cpu.pool_sparse(x, ak, bt, index, w, acc)
        ctx.save_for_backward(x, a, b, ak, bt, index, w, h)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, a, b, ak, bt, index, w, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, dbt, dw = torch.ops.moleforge_cpu.pool_sparse_backward(gy.contiguous(), x, ak, bt, index, w, h,
                                                                       need[0], need[1], need[2], need[4])
        da, db = _factor_grads(da if need[1] else None, dbt if need[2] else None, a, b)
        return dx if need[0] else None, da, db, None, dw if need[4] else None, gy if need[5] else None, None


def sparse_pool(x: Tensor, index: Tensor, w: Tensor, a: Tensor, b: Tensor, acc: Tensor | None) -> Tensor:
    """``acc + Σ_j w_tj B_e A_e x_t`` (``(T, d_out)``; without ``acc`` the sum alone) for ``x (T, d_in)``,
    ``index (T, k)`` the experts of each token's slots, ``w (T, k)`` their weights (gate times
    scale), ``a (E|1, r, d_in)`` and ``b (E|1, d_out, r)`` (a factor all experts share is
    repeated). A contiguous ``(T, d_out)`` ``acc`` is added to in place. Needs the kernels loaded
    (:func:`moleforge.backends.cpu.build`, which lowering runs).
    """
    flat, in_place = _accumulated(acc, x, b.shape[1])
    return SparsePool.apply(x.contiguous(), a, b, index.contiguous(), w.to(x.dtype).contiguous(), flat, in_place)


class RoutedPool(torch.autograd.Function):
    """The router, its softmax top-k gate and the pool in one op: ``(y, probs, gates, index)``; see
    ``pool_sparse.cpp``. ``probs`` and ``gates`` are differentiable (aux losses read them). With
    ``acc`` the pool's sum is added to it in place."""

    @staticmethod
    def forward(ctx, x: Tensor, router_w: Tensor, a: Tensor, b: Tensor, acc: Tensor | None, in_place: bool,  # type: ignore[override]
                k: int, renormalize: bool, temperature: float, scale: float):
        ak, bt = _factors(a, b, router_w.shape[0])
        if in_place:
            probs, gates, index, w, h = torch.ops.moleforge_cpu.routed_pool_(x, router_w, ak, bt, acc, k, renormalize,
                                                                             temperature, scale)
            ctx.mark_dirty(acc)
            y = acc
        else:
            y, probs, gates, index, w, h = torch.ops.moleforge_cpu.routed_pool(x, router_w, ak, bt, acc, k, renormalize,
                                                                               temperature, scale)
        ctx.save_for_backward(x, router_w, a, b, ak, bt, index, probs, w, h)
        ctx.meta = (renormalize, temperature, scale)
        ctx.mark_non_differentiable(index)
        return y, probs, gates, index

    @staticmethod
    def backward(ctx, gy: Tensor, gprobs: Tensor | None, ggates: Tensor | None, _):  # type: ignore[override]
        x, router_w, a, b, ak, bt, index, probs, w, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dwr, da, dbt = torch.ops.moleforge_cpu.routed_pool_backward(
            gy.contiguous(), None if gprobs is None else gprobs.contiguous(),
            None if ggates is None else ggates.contiguous(), x, router_w, ak, bt, index, probs, w, h, *ctx.meta,
            need[0], need[1], need[2], need[3])
        da, db = _factor_grads(da if need[2] else None, dbt if need[3] else None, a, b)
        return (dx if need[0] else None, dwr if need[1] else None, da, db, gy if need[4] else None, None, None, None,
                None, None)


def routed_pool(x: Tensor, router_w: Tensor, a: Tensor, b: Tensor, acc: Tensor | None, k: int, renormalize: bool,
                temperature: float, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, probs, gates, index)``: the router ``z = x W_rᵀ``, ``probs = softmax(z / temperature)``,
    the top-``k`` ``gates (T, E)`` (renormalised to sum 1 when asked), their experts ``index (T, k)``,
    and ``y = acc + Σ_j scale·g_j B_e A_e x`` (``acc`` may be ``None``; a contiguous ``(T, d_out)``
    one is added to in place). ``router_w (E, d_in)``, ``a (E|1, r, d_in)``, ``b (E|1, d_out, r)``.
    Needs the kernels loaded."""
    flat, in_place = _accumulated(acc, x, b.shape[1])
    return RoutedPool.apply(x.contiguous(), router_w.contiguous(), a, b, flat, in_place, k, bool(renormalize),
                            float(temperature), float(scale))


def register_fakes() -> None:
    """Shape-only implementations of the ops, so ``torch.compile`` can trace them (the functional ones;
    the in-place forms run eagerly only)."""

    @torch.library.register_fake("moleforge_cpu::pool_sparse")
    def _sparse(x, A, Bt, index, w, acc=None):
        T, k = index.shape
        return x.new_empty(T, Bt.shape[2]), x.new_empty(T, k, A.shape[1])

    @torch.library.register_fake("moleforge_cpu::routed_pool")
    def _routed(x, router_w, A, Bt, acc, k, renormalize, temperature, scale):
        T, E = x.shape[0], router_w.shape[0]
        return (x.new_empty(T, Bt.shape[2]), x.new_empty(T, E), x.new_empty(T, E),
                x.new_empty((T, k), dtype=torch.long), x.new_empty(T, k), x.new_empty(T, k, A.shape[1]))

    def maybe(like: Tensor, shape, need: bool) -> Tensor:
        return like.new_empty(shape if need else (0,))

    @torch.library.register_fake("moleforge_cpu::routed_pool_backward")
    def _routed_backward(grad_y, grad_probs, grad_gates, x, router_w, A, Bt, index, probs, w, h, renormalize,
                         temperature, scale, need_x, need_router, need_a, need_b):
        return (maybe(x, x.shape, need_x), maybe(x, router_w.shape, need_router), maybe(x, A.shape, need_a),
                maybe(x, Bt.shape, need_b))

    @torch.library.register_fake("moleforge_cpu::pool_sparse_backward")
    def _sparse_backward(grad_y, x, A, Bt, index, w, h, need_x, need_a, need_b, need_w):
        return (maybe(x, x.shape, need_x), maybe(x, A.shape, need_a), maybe(x, Bt.shape, need_b),
                maybe(x, w.shape, need_w))
