"""``@triton.jit`` kernels of the routed low-rank product over (token, expert) pairs sorted by
expert. Launched only from :mod:`moleforge.backends.triton.grouped`, which validates shapes.

Pairs ``p < P`` are sorted by expert; ``tokens (P,)`` is the token (row of the input) of each
pair and expert ``e`` owns the contiguous pairs ``[start_e, end_e)``. Products accumulate in
float32; ``tl.dot`` runs in IEEE precision so float32 agrees with the torch path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pair_lowrank_kernel(inp, tokens, w, down, up, out, hid,
                        block_expert, block_start, block_end,
                        K, N, R,
                        s_inp, s_de, s_dr, s_dk, s_ue, s_un, s_ur,
                        STORE_H: tl.constexpr, COMPUTE_OUT: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """One block of ``BLOCK_P`` pairs of one expert ``e``: ``h = inp[tok] @ down_eᵀ`` (P, R), stored
    to ``hid`` if ``STORE_H``; ``out[p] = w[p] · up_e @ h[p]`` (P, N) if ``COMPUTE_OUT``.
    ``down_e`` is read as (R, K), ``up_e`` as (N, R), through their strides."""
    pid = tl.program_id(0)
    start = tl.load(block_start + pid)
    end = tl.load(block_end + pid)
    if start >= end:  # a spare block (the grid is an upper bound)
        return
    e = tl.load(block_expert + pid).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_P)  # (BP,) pairs
    live = rows < end
    tok = tl.load(tokens + rows, mask=live, other=0).to(tl.int64)  # (BP,)
    rs = tl.arange(0, BLOCK_R)
    h = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(inp + tok[:, None] * s_inp + ks[None, :],
                     mask=live[:, None] & (ks[None, :] < K), other=0.0)  # (BP, BK)
        dt = tl.load(down + e * s_de + rs[None, :] * s_dr + ks[:, None] * s_dk,
                     mask=(ks[:, None] < K) & (rs[None, :] < R), other=0.0)  # (BK, BR)
        h = tl.dot(xt, dt, h, input_precision="ieee")  # (BP, BR)
    if STORE_H:
        tl.store(hid + rows[:, None] * R + rs[None, :], h, mask=live[:, None] & (rs[None, :] < R))
    if COMPUTE_OUT:
        wp = tl.load(w + rows, mask=live, other=0.0).to(tl.float32)  # (BP,)
        hw = (h * wp[:, None]).to(up.dtype.element_ty)  # (BP, BR)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            ut = tl.load(up + e * s_ue + rs[:, None] * s_ur + ns[None, :] * s_un,
                         mask=(rs[:, None] < R) & (ns[None, :] < N), other=0.0)  # (BR, BN)
            o = tl.dot(hw, ut, input_precision="ieee")  # (BP, BN)
            tl.store(out + rows[:, None] * N + ns[None, :], o.to(out.dtype.element_ty),
                     mask=live[:, None] & (ns[None, :] < N))


@triton.jit
def segment_outer_kernel(left, tokens, right, seg_start, seg_end, out,
                         N, R, s_left,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per expert ``e`` and column block: ``out[e] = Σ_{p ∈ e} left[tok_p]ᵀ ⊗ right[p]``, i.e.
    ``left[tokens[s_e:t_e]]ᵀ @ right[s_e:t_e]`` (N, R); zero for an expert without pairs."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rs = tl.arange(0, BLOCK_R)
    start = tl.load(seg_start + e)
    end = tl.load(seg_end + e)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)  # (BP,)
        live = rows < end
        tok = tl.load(tokens + rows, mask=live, other=0).to(tl.int64)
        lt = tl.load(left + tok[None, :] * s_left + ns[:, None],
                     mask=live[None, :] & (ns[:, None] < N), other=0.0)  # (BN, BP)
        rt = tl.load(right + rows[:, None] * R + rs[None, :],
                     mask=live[:, None] & (rs[None, :] < R), other=0.0)  # (BP, BR)
        acc = tl.dot(lt, rt.to(lt.dtype), acc, input_precision="ieee")  # (BN, BR)
    tl.store(out + e.to(tl.int64) * N * R + ns[:, None] * R + rs[None, :], acc.to(out.dtype.element_ty),
             mask=(ns[:, None] < N) & (rs[None, :] < R))
