"""``@triton.jit`` kernels of one residual-tree level's node step (see ``tree.py``).

Rows are routed contexts ``q`` (``Q = T·C`` of them), each with ``f`` child nodes ``n = q·f + p``.
A program takes ``BLOCK_Q`` contexts and ``BLOCK_D`` columns. ``ACT``: 0 identity, 1 tanh,
2 relu. Arithmetic runs in the dtype of the tensors (float32 or float64).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 1:
        return 2.0 * tl.sigmoid(2.0 * v) - 1.0  # tanh
    if ACT == 2:
        return tl.maximum(v, 0.0)
    return v


@triton.jit
def _act_grad(g, a, ACT: tl.constexpr):
    """``∂L/∂pre`` from ``∂L/∂a`` and the saved ``a = act(pre)``."""
    if ACT == 1:
        return g * (1.0 - a * a)
    if ACT == 2:
        return tl.where(a > 0.0, g, 0.0)
    return g


@triton.jit
def node_mix_kernel(u, flat, v, weight, a_out, out, Q, D,
                    F: tl.constexpr, HAS_V: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """``a[n] = act(u[flat[n]] + v[n])``, ``out[q] = Σ_p weight[q·f+p] · a[q·f+p]``."""
    qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (qs < Q)[:, None] & (ds < D)[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=out.dtype.element_ty)
    for p in range(F):
        ns = qs * F + p  # (BLOCK_Q,) nodes
        rows = tl.load(flat + ns, mask=qs < Q, other=0)
        pre = tl.load(u + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
        if HAS_V:
            pre += tl.load(v + ns[:, None] * D + ds[None, :], mask=ok, other=0.0)
        a = _act(pre, ACT)
        tl.store(a_out + ns[:, None] * D + ds[None, :], a, mask=ok)
        w = tl.load(weight + ns, mask=qs < Q, other=0.0)
        acc += w[:, None] * a
    tl.store(out + qs[:, None] * D + ds[None, :], acc, mask=ok)


@triton.jit
def node_mix_backward_kernel(g_out, a, flat, weight, g_u, g_pre, g_weight, Q, D,
                             F: tl.constexpr, ACT: tl.constexpr,
                             BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """``g_pre[n] = act'(a[n]) · weight[n] · g_out[q]`` (also added into ``g_u[flat[n]]``) and
    ``g_weight[n] += Σ_d a[n] · g_out[q]`` over this program's columns (atomic adds)."""
    qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    q_ok = qs < Q
    ok = q_ok[:, None] & (ds < D)[None, :]
    go = tl.load(g_out + qs[:, None] * D + ds[None, :], mask=ok, other=0.0)
    for p in range(F):
        ns = qs * F + p
        av = tl.load(a + ns[:, None] * D + ds[None, :], mask=ok, other=0.0)
        w = tl.load(weight + ns, mask=q_ok, other=0.0)
        tl.atomic_add(g_weight + ns, tl.sum(av * go, axis=1), mask=q_ok)
        gp = _act_grad(w[:, None] * go, av, ACT)
        tl.store(g_pre + ns[:, None] * D + ds[None, :], gp, mask=ok)
        rows = tl.load(flat + ns, mask=q_ok, other=0)
        tl.atomic_add(g_u + rows[:, None] * D + ds[None, :], gp, mask=ok)
