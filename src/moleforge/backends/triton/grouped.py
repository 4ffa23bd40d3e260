"""The fused routed low-rank node (sparse expert pool) in Triton: launchers and custom ops.

``moleforge::grouped_lowrank(x, tokens, w, offs, a, b) -> y`` over ``P`` (token, expert) pairs
sorted by expert:

- ``x (T, d_in)``; ``tokens (P,)`` the token of each pair; ``w (P,)`` its weight (gate · scale);
- ``offs (E,)`` the end of each expert's pairs (``offs[-1] == P``; an expert may have none);
- ``a (E|1, r, d_in)``, ``b (E|1, d_out, r)``: leading dim 1 is a factor shared by all experts;
- ``y[t] = Σ_{p: tokens[p] = t} w[p] · B_e A_e x_t`` ``(T, d_out)``, ``e`` the expert of ``p``.

Its backward is ``moleforge::grouped_lowrank_backward``, differentiable in ``x``, ``w``, ``a``
and ``b``. Values are not checked (that would synchronise with the device): ``tokens`` must lie
in ``[0, T)`` and ``offs`` be non-decreasing. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from moleforge.backends.triton import check_device
from moleforge.backends.triton.grouped_kernels import pair_lowrank_kernel, segment_outer_kernel

__all__ = ["DTYPES", "grouped_lowrank", "grouped_lowrank_backward", "launch_forward", "launch_backward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
BLOCK_P = 16  # pairs per program; tl.dot needs every block dim >= 16
BLOCK_CAP = 64  # the widest column block (of d_in, d_out, r)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _require(ok: bool, name: str, t: Tensor, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}: got {_describe(t)}; expected {expected}")


def _check(x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor, b: Tensor) -> None:
    """ValueError naming the first argument whose shape, dtype or device is off."""
    _require(x.dim() == 2 and x.dtype in DTYPES, "x", x, "(T, d_in) of float32, float16 or bfloat16")
    T, d_in = x.shape
    dev, dt = x.device, x.dtype
    _require(tokens.dim() == 1 and tokens.dtype in INDEX_DTYPES and tokens.device == dev, "tokens", tokens,
             f"(P,) of int32 or int64 on {dev}")
    P = tokens.shape[0]
    _require(w.shape == (P,) and w.dtype == dt and w.device == dev, "w", w, f"({P},) of {dt} on {dev}")
    _require(offs.dim() == 1 and offs.numel() > 0 and offs.dtype in INDEX_DTYPES and offs.device == dev,
             "offs", offs, f"(E,) with E >= 1 of int32 or int64 on {dev}")
    E = offs.shape[0]
    _require(a.dim() == 3 and a.shape[0] in (1, E) and a.shape[2] == d_in and a.dtype == dt and a.device == dev,
             "a", a, f"({E} or 1, r, {d_in}) of {dt} on {dev}")
    r = a.shape[1]
    _require(b.dim() == 3 and b.shape[0] in (1, E) and b.shape[2] == r and b.dtype == dt and b.device == dev,
             "b", b, f"({E} or 1, d_out, {r}) of {dt} on {dev}")
    check_device("grouped_lowrank", x)


def _block(n: int) -> int:
    return min(BLOCK_CAP, max(16, triton.next_power_of_2(n)))


def _segments(offs: Tensor) -> tuple[Tensor, Tensor]:
    """``(start, end)`` of each expert's pairs, ``(E,)`` int64 each."""
    end = offs.long()
    return torch.cat([end.new_zeros(1), end[:-1]]), end


def _pair_blocks(offs: Tensor, P: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each expert's pairs into blocks of ``BLOCK_P``: the expert, first and end pair of each
    block, ``(G,)`` int32 each, for the fixed grid ``G = ⌈P/BLOCK_P⌉ + E`` (an upper bound, so no
    synchronisation); spare blocks are empty (``start == end``)."""
    E = offs.shape[0]
    start, end = _segments(offs)  # (E,)
    blocks = (end - start + BLOCK_P - 1) // BLOCK_P  # (E,)
    last = blocks.cumsum(0)  # (E,) end of each expert's blocks
    ids = torch.arange(triton.cdiv(P, BLOCK_P) + E, device=offs.device)  # (G,)
    expert = torch.searchsorted(last, ids, right=True)  # (G,) E past the last block
    e = expert.clamp(max=E - 1)
    first = start[e] + (ids - (last[e] - blocks[e])) * BLOCK_P  # (G,)
    stop = torch.where(expert < E, end[e], first)  # (G,)
    return e.int(), first.int(), stop.int()


def _pair_lowrank(inp: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, down: Tensor, up: Tensor | None,
                  rank: int) -> tuple[Tensor | None, Tensor]:
    """Per pair ``h = down_e inp[tok]`` ``(P, r)`` and, given ``up``, ``w · up_e h`` ``(P, N)``.
    ``down (E|1, r, K)`` and ``up (E|1, N, r)`` may be strided views (transposes)."""
    P, K = tokens.shape[0], inp.shape[1]
    N = up.shape[1] if up is not None else 0
    hid = inp.new_empty(P, rank, dtype=torch.float32)
    out = inp.new_empty(P, N)
    expert, first, stop = _pair_blocks(offs, P)
    su = up.stride() if up is not None else (0, 0, 0)
    pair_lowrank_kernel[(expert.shape[0],)](
        inp, tokens, w, down, up if up is not None else down, out, hid, expert, first, stop,
        K, N, rank, inp.stride(0),
        down.stride(0) if down.shape[0] > 1 else 0, down.stride(1), down.stride(2),
        su[0] if up is not None and up.shape[0] > 1 else 0, su[1], su[2],
        STORE_H=True, COMPUTE_OUT=up is not None,
        BLOCK_P=BLOCK_P, BLOCK_K=_block(K), BLOCK_N=_block(N), BLOCK_R=_block(rank))
    return (out if up is not None else None), hid


def _segment_outer(left: Tensor, tokens: Tensor, right: Tensor, offs: Tensor) -> Tensor:
    """``out[e] = left[tokens[s_e:t_e]]ᵀ @ right[s_e:t_e]`` ``(E, N, r)`` in ``left``'s dtype."""
    N, R, E = left.shape[1], right.shape[1], offs.shape[0]
    out = left.new_empty(E, N, R)
    start, end = _segments(offs)
    BN = _block(N)
    segment_outer_kernel[(E, triton.cdiv(N, BN))](
        left, tokens, right.contiguous(), start, end, out, N, R, left.stride(0),
        BLOCK_P=BLOCK_P, BLOCK_N=BN, BLOCK_R=_block(R))
    return out


def _fold(grad: Tensor, like: Tensor) -> Tensor:
    """A shared factor's gradient is the sum over experts."""
    return grad if like.shape[0] == grad.shape[0] else grad.sum(0, keepdim=True)


def launch_forward(x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``y (T, d_out)`` of the module docstring; validates, makes inputs contiguous, launches."""
    _check(x, tokens, w, offs, a, b)
    x, tokens, w, a, b = (t.contiguous() for t in (x, tokens, w, a, b))
    ys, _ = _pair_lowrank(x, tokens, w, offs, a, b, a.shape[1])  # (P, d_out)
    return x.new_zeros(x.shape[0], b.shape[1]).index_add_(0, tokens, ys)  # (T, d_out)


def launch_backward(gy: Tensor, x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor,
                    b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``x``, ``w``, ``a``, ``b`` given ``gy (T, d_out)``."""
    _check(x, tokens, w, offs, a, b)
    _require(gy.shape == (x.shape[0], b.shape[1]) and gy.dtype == x.dtype and gy.device == x.device, "gy", gy,
             f"({x.shape[0]}, {b.shape[1]}) of {x.dtype} on {x.device}")
    gy, x, tokens, w, a, b = (t.contiguous() for t in (gy, x, tokens, w, a, b))
    r = a.shape[1]
    _, h = _pair_lowrank(x, tokens, w, offs, a, None, r)  # (P, r) A_e x
    # u = B_eᵀ gy[tok] (P, r); gxs = w · A_eᵀ u (P, d_in): the same kernel on transposed factors
    gxs, u = _pair_lowrank(gy, tokens, w, offs, b.transpose(1, 2), a.transpose(1, 2), r)
    gx = torch.zeros_like(x).index_add_(0, tokens, gxs)  # (T, d_in)
    gw = (u * h).sum(1).to(w.dtype)  # (P,)
    ga = _segment_outer(x, tokens, (u * w[:, None]).to(x.dtype), offs).transpose(1, 2)  # (E, r, d_in)
    gb = _segment_outer(gy, tokens, (h * w[:, None]).to(x.dtype), offs)  # (E, d_out, r)
    return gx, gw, _fold(ga, a).contiguous(), _fold(gb, b)


@torch.library.custom_op("moleforge::grouped_lowrank", mutates_args=())
def grouped_lowrank(x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The routed low-rank product of the module docstring, ``(T, d_out)``."""
    return launch_forward(x, tokens, w, offs, a, b)


@grouped_lowrank.register_fake
def _grouped_lowrank_fake(x, tokens, w, offs, a, b):
    return x.new_empty(x.shape[0], b.shape[1])


@torch.library.custom_op("moleforge::grouped_lowrank_backward", mutates_args=())
def grouped_lowrank_backward(gy: Tensor, x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor,
                             b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``grouped_lowrank`` in ``x``, ``w``, ``a``, ``b``."""
    return launch_backward(gy, x, tokens, w, offs, a, b)


@grouped_lowrank_backward.register_fake
def _grouped_lowrank_backward_fake(gy, x, tokens, w, offs, a, b):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    x, tokens, w, offs, a, b = ctx.saved_tensors
    gx, gw, ga, gb = grouped_lowrank_backward(gy, x, tokens, w, offs, a, b)
    return gx, None, gw, None, ga, gb


grouped_lowrank.register_autograd(_backward, setup_context=_setup_context)
