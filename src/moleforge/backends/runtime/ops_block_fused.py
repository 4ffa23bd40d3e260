"""The routed experts of an FFN block, expert by expert in cache: :class:`RoutedFFN`.

After the block rewrites, the experts' hidden states are read by exactly their gated sum
(``expert_sum``) and, when the down projection carries experts, their own down-projections
(``expert_lora``). Computed node by node, every step is a pass over ``(S, d_ff)`` tensors far
larger than the cache, and the step is bound by memory traffic. This function instead runs
runs of experts' slots (a few MB per tensor) through the whole chain while they sit in cache:

    U = up_base[t] + s_u z_u B_uᵀ,  G = gate_base[t] + s_g z_g B_gᵀ,  h = act(G) ⊙ U,
    y[t] += g h,  z = h A_eᵀ,

keeping ``U``, ``G`` and ``act(G)`` for the backward, which recomputes ``h`` run by run and
never materialises ``∂h``. Same values as the node-by-node ops (summation order aside). In
training with dropout (``ops_block_dropout``) ``z = (h ⊙ m) A_eᵀ`` with each slot's keep factors
``m`` (the frozen down projection, through ``y``, reads ``h`` undropped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops_block_grad import ACTIVATIONS, activation_backward, bounds

__all__ = ["RoutedFFN", "CHUNK"]


def _act_into(name: str, x: Tensor, out: Tensor) -> Tensor:
    match name:
        case "silu":
            return torch.ops.aten.silu.out(x, out=out)
        case "gelu":
            return torch.ops.aten.gelu.out(x, out=out)
        case "gelu_tanh":
            return torch.ops.aten.gelu.out(x, approximate="tanh", out=out)
        case "relu":
            return torch.clamp_min(x, 0, out=out)
    return out.copy_(ACTIVATIONS[name](x))


def _act_grad_into(name: str, grad: Tensor, x: Tensor, out: Tensor) -> Tensor:
    match name:
        case "silu":
            return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)
        case "gelu":
            return torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=out)
        case "gelu_tanh":
            return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=out)
        case "relu":
            return torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)
    return out.copy_(activation_backward(name, grad, x))


def _few_columns(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y`` with few output columns, as ``(yᵀ xᵀ)ᵀ`` (the fast BLAS orientation)."""
    return (y.T @ x.T).T


CHUNK = 1 << 20
"""Values per ``(rows, d_ff)`` tensor processed at once (4 MB in float32)."""


def _chunks(counts: list[int], width: int, elements: int):
    """Runs of consecutive experts with about ``elements`` values per ``(rows, width)`` tensor:
    ``(start, stop, [(expert, start, stop), ...])``; small enough to stay in cache through a
    chain of ops, large enough to keep the number of ops down."""
    lo, parts = 0, []
    for e, (a, b) in enumerate(bounds(counts)):
        if b > a:
            parts.append((e, a, b))
        if parts and (b - lo) * width >= elements:
            yield lo, b, parts
            lo, parts = b, []
    if parts:
        yield lo, parts[-1][2], parts


def _pre_into(out: Tensor, base: Tensor, tok: Tensor, z: Tensor | None, b: Tensor | None,
              parts: list[tuple[int, int, int]], scale: float) -> None:
    """``out = base[tok] + scale · z b_eᵀ`` over a run of experts' slots (``out`` is the run's rows)."""
    torch.index_select(base, 0, tok, out=out)
    if z is None:
        return
    lo = parts[0][1]
    for e, i, j in parts:
        out[i - lo:j - lo].addmm_(z[i:j], b[e].T, alpha=scale)


def _pre_grad(d: Tensor, tok: Tensor, z: Tensor | None, b: Tensor | None, parts: list[tuple[int, int, int]],
              lo: int, scale: float, grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> None:
    d_base, d_z, d_b = grads
    if d_base is not None:
        d_base.index_add_(0, tok, d)  # (T, F)
    for e, i, j in parts if z is not None else ():
        d_z[i:j] = _few_columns(d[i - lo:j - lo], b[e]) * scale  # (n_e, r)
        d_b[e] = (z[i:j].T @ d[i - lo:j - lo]).T * scale  # (F, r)


def _down_lora_grad(dh: Tensor, h: Tensor, gz: Tensor, down_a: Tensor, d_a: Tensor, keep: Tensor | None,
                    parts: list[tuple[int, int, int]], lo: int) -> None:
    """Over a run of slots: ``∂A_e = ∂zᵀ (h ⊙ m)`` and ``∂h += (∂z A_e) ⊙ m`` (``m = 1`` without dropout)."""
    for e, i, j in parts:
        hd = h[i - lo:j - lo] if keep is None else h[i - lo:j - lo] * keep[i - lo:j - lo]
        d_a[e] = gz[i:j].T @ hd  # (r, F)
        if keep is None:
            dh[i - lo:j - lo].addmm_(gz[i:j], down_a[e])  # + ∂z A_e
        else:
            dh[i - lo:j - lo].addcmul_(gz[i:j] @ down_a[e], keep[i - lo:j - lo])


def _zeros_like(t: Tensor | None, want: bool) -> Tensor | None:
    return torch.zeros_like(t) if t is not None and want else None


class RoutedFFN(torch.autograd.Function):
    """``(y (T, F), z (S, r))`` of the experts (see the module docstring): ``token``, ``gate (S,)``
    sorted by expert with ``counts``; ``*_base (T, F)`` the shared frozen projections; ``*_z (S, r)``
    each slot's ``x_t A_eᵀ``; ``*_b (E, F, r)``; ``down_a (E, r, F)`` or ``None`` (then ``z`` is empty);
    ``chunk`` values per tensor at a time; ``down_keep (S, F)`` (sorted slots) the down LoRA's dropout
    keep factors, or ``None``."""

    @staticmethod
    def forward(ctx, token: Tensor, gate: Tensor, counts: list[int], T: int, activation: str, up_base: Tensor,
                up_z: Tensor | None, up_b: Tensor | None, up_scale: float, gate_base: Tensor | None,
                gate_z: Tensor | None, gate_b: Tensor | None, gate_scale: float, down_a: Tensor | None,
                chunk: int = CHUNK, down_keep: Tensor | None = None):
        S, F = token.shape[0], up_base.shape[1]
        U, act = up_base.new_empty(S, F), up_base.new_empty(S, F)
        G = None if gate_base is None else up_base.new_empty(S, F)
        y = up_base.new_zeros(T, F)
        z = up_base.new_empty(S, 0 if down_a is None else down_a.shape[1])
        chunks = list(_chunks(counts, F, chunk))
        buf = up_base.new_empty(max((hi - lo for lo, hi, _ in chunks), default=0), F)
        kept = None if down_keep is None else torch.empty_like(buf)
        for lo, hi, parts in chunks:
            tok, span, h = token[lo:hi], slice(lo, hi), buf[:hi - lo]
            _pre_into(U[span], up_base, tok, up_z, up_b, parts, up_scale)
            if G is None:
                h = _act_into(activation, U[span], act[span])
            else:
                _pre_into(G[span], gate_base, tok, gate_z, gate_b, parts, gate_scale)
                h = torch.mul(_act_into(activation, G[span], act[span]), U[span], out=h)
            hd = h if kept is None else torch.mul(h, down_keep[span], out=kept[:hi - lo])  # the down LoRA's input
            for e, a, b in parts if down_a is not None else ():
                z[a:b] = _few_columns(hd[a - lo:b - lo], down_a[e].T)  # (n_e, r)
            y.index_add_(0, tok, torch.mul(h, gate[span, None], out=buf[:hi - lo]))
        ctx.save_for_backward(token, gate, U, G, act, up_z, up_b, gate_z, gate_b, down_a, down_keep)
        ctx.meta = (counts, T, activation, up_scale, gate_scale, chunk)
        return y, z

    @staticmethod
    def backward(ctx, gy: Tensor, gz: Tensor | None):
        token, gate, U, G, act, up_z, up_b, gate_z, gate_b, down_a, keep = ctx.saved_tensors
        counts, T, activation, up_scale, gate_scale, chunk = ctx.meta
        needs = ctx.needs_input_grad
        F = U.shape[1]
        d_gate = torch.empty_like(gate)
        up_grads = (U.new_zeros(T, F) if needs[5] else None, _zeros_like(up_z, True), _zeros_like(up_b, True))
        gate_grads = (U.new_zeros(T, F) if G is not None and needs[9] else None, _zeros_like(gate_z, True),
                      _zeros_like(gate_b, True))
        d_a = _zeros_like(down_a, gz is not None)
        chunks = list(_chunks(counts, F, chunk))
        m = max((hi - lo for lo, hi, _ in chunks), default=0)
        rows_buf, h_buf = U.new_empty(m, F), U.new_empty(m, F)
        for lo, hi, parts in chunks:
            tok, span, n = token[lo:hi], slice(lo, hi), hi - lo
            rows, a = rows_buf[:n], act[span]
            torch.index_select(gy, 0, tok, out=rows)  # ∂y at each slot's token
            h = a if G is None else torch.mul(a, U[span], out=h_buf[:n])
            d_gate[span] = torch.linalg.vecdot(rows, h)
            dh = rows.mul_(gate[span, None])
            if d_a is not None:
                _down_lora_grad(dh, h, gz, down_a, d_a, None if keep is None else keep[span], parts, lo)
            if G is None:
                dU = _act_grad_into(activation, dh, U[span], h_buf[:n])
            else:
                dU = torch.mul(dh, a, out=h_buf[:n])
                dG = _act_grad_into(activation, dh.mul_(U[span]), G[span], dh)
                _pre_grad(dG, tok, gate_z, gate_b, parts, lo, gate_scale, gate_grads)
            _pre_grad(dU, tok, up_z, up_b, parts, lo, up_scale, up_grads)
        return (None, d_gate, None, None, None, *up_grads, None, *gate_grads, None, d_a, None, None)
