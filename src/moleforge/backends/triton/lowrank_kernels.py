"""``@triton.jit`` kernels of the routed low-rank product (see ``lowrank.py``).

Every kernel works on ``P`` (token, expert) pairs: pair ``p`` reads row ``row[p]`` of a
token matrix and expert ``e[p]``'s factor. A program takes ``BLOCK_P`` pairs; factors are
addressed through their strides, so a transposed or expanded (shared across experts) factor
needs no copy. ``R`` is the rank rounded up to a power of two (masked). Products accumulate
in the output's dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(row, expert, P, r, BLOCK_P: tl.constexpr, R: tl.constexpr):
    """This program's pairs ``ps``, their mask, token rows and experts, and the rank lanes."""
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    p_ok = ps < P
    rows = tl.load(row + ps, mask=p_ok, other=0)
    es = tl.load(expert + ps, mask=p_ok, other=0)
    js = tl.arange(0, R)
    return ps, p_ok, rows, es, js, js < r


@triton.jit
def gather_down_kernel(src, row, expert, m, out, P, K, r,
                       s_src, s_me, s_mj, s_mk, s_out,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    """``out[p, j] = Σ_k src[row[p], k] · m[e[p], j, k]``: ``(P, r)``."""
    ps, p_ok, rows, es, js, j_ok = _pairs(row, expert, P, r, BLOCK_P, R)
    acc_t = out.dtype.element_ty  # float32, or float64 for float64 inputs
    acc = tl.zeros((BLOCK_P, R), dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(src + rows[:, None] * s_src + ks[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w_ptr = m + es[:, None, None] * s_me + js[None, :, None] * s_mj + ks[None, None, :] * s_mk
        w = tl.load(w_ptr, mask=p_ok[:, None, None] & j_ok[None, :, None] & k_ok[None, None, :], other=0.0)
        acc += tl.sum(x[:, None, :].to(acc_t) * w.to(acc_t), axis=2)  # (BLOCK_P, R)
    tl.store(out + ps[:, None] * s_out + js[None, :], acc, mask=p_ok[:, None] & j_ok[None, :])


@triton.jit
def up_scatter_kernel(v, row, expert, m, dst, P, N, r,
                      s_v, s_me, s_mn, s_mj, s_dst,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """``dst[row[p], n] += Σ_j v[p, j] · m[e[p], n, j]`` (atomic adds in ``dst``'s dtype)."""
    ps, p_ok, rows, es, js, j_ok = _pairs(row, expert, P, r, BLOCK_P, R)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    h = tl.load(v + ps[:, None] * s_v + js[None, :], mask=p_ok[:, None] & j_ok[None, :], other=0.0)
    w_ptr = m + es[:, None, None] * s_me + ns[None, :, None] * s_mn + js[None, None, :] * s_mj
    w = tl.load(w_ptr, mask=p_ok[:, None, None] & n_ok[None, :, None] & j_ok[None, None, :], other=0.0)
    acc_t = dst.dtype.element_ty
    y = tl.sum(h[:, None, :].to(acc_t) * w.to(acc_t), axis=2)  # (BLOCK_P, BLOCK_N)
    tl.atomic_add(dst + rows[:, None] * s_dst + ns[None, :], y, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def outer_scatter_kernel(src, row, v, expert, g, P, N, r,
                         s_src, s_v, s_ge, s_gn,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """``g[e[p], n, j] += src[row[p], n] · v[p, j]``: per-expert factor gradients ``(E, N, r)``
    (atomic adds in ``g``'s dtype; ``g`` contiguous in its last dimension)."""
    ps, p_ok, rows, es, js, j_ok = _pairs(row, expert, P, r, BLOCK_P, R)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    s = tl.load(src + rows[:, None] * s_src + ns[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)
    h = tl.load(v + ps[:, None] * s_v + js[None, :], mask=p_ok[:, None] & j_ok[None, :], other=0.0)
    acc_t = g.dtype.element_ty
    contrib = s[:, :, None].to(acc_t) * h[:, None, :].to(acc_t)  # (BLOCK_P, BLOCK_N, R)
    g_ptr = g + es[:, None, None] * s_ge + ns[None, :, None] * s_gn + js[None, None, :]
    tl.atomic_add(g_ptr, contrib, mask=p_ok[:, None, None] & n_ok[None, :, None] & j_ok[None, None, :])
