"""Runtime ops of input dropout, expert capacity, the router z-loss and pools of experts with
their own ranks (``ir/basics_nodes.py``). They agree with the interpreter
(``ir/interpret_basics.py``) up to the tolerance table and top-k tie order."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir.values import Routing
from .dist import all_sum, reduce_group
from .ops_decode import aux_wanted
from .ops_dora import dora_scales
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["dropout", "capacity_limit", "z_loss", "ragged_mix", "magnitude"]


def dropout(x: Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Training: ``x ⊙ [u >= p] / (1 - p)``, ``u`` drawn as ``torch.rand_like(x, generator=generator)``
    would (the site's noise generator; ``None``: torch's global one); evaluation: ``x``."""
    if not training or p == 0:
        return x
    u = torch.empty_like(x).uniform_(0.0, 1.0, generator=generator)  # (T, width)
    return x * (u >= p).to(x.dtype) / (1.0 - p)


def capacity_limit(route: Routing, factor: float) -> Routing:
    """Each expert keeps at most ``ceil(factor · T · k / E)`` of its slots, every token's first
    choice first, then the second ...; dropped slots get gate 0 and are marked in ``dropped``.
    Every token of the forward takes capacity (padding too: the routing does not read the mask)."""
    gates, index = route.gates, route.index
    T, k = index.shape
    E = gates.shape[1]
    cap = math.ceil(factor * T * k / E)
    flat = index.t().reshape(-1)  # (k·T,) slot-major: first choices of every token first
    onehot = F.one_hot(flat, E)  # (k·T, E)
    position = (onehot.cumsum(0) * onehot).sum(1) - 1  # (k·T,) place of each slot in its expert's queue
    keep = (position < cap).reshape(k, T).t()  # (T, k)
    kept = gates.gather(1, index) * keep.to(gates.dtype)  # (T, k)
    return Routing(gates.scatter(1, index, kept), route.probs, index, ~keep)


def z_loss(z: Tensor, weight: float, mask: Tensor | None = None, training: bool = False, group=None,
           eval_aux: bool = True) -> Tensor | None:
    """``weight · mean_t (logsumexp z_t)²`` over the tokens (the real ones with a ``mask``); over
    the tokens of every rank of ``group`` when it reduces (``dist.py``); ``None`` in evaluation
    mode without autograd unless ``eval_aux``."""
    if not aux_wanted(training, eval_aux):
        return None
    lse2 = torch.logsumexp(z, dim=-1).square()  # (T,)
    if mask is not None:
        lse2 = torch.where(mask, lse2, 0)
    n = z.new_full((1,), z.shape[0]) if mask is None else mask.sum().to(z.dtype).reshape(1)
    pg = reduce_group(group, training)
    if pg is not None:
        total = all_sum(torch.cat([lse2.sum().reshape(1), n]), pg)  # (2,)
        return weight * total[0] / total[1].clamp_min(1)
    return weight * lse2.sum() / n[0].clamp_min(1)


def ragged_mix(x: Tensor, gates: Tensor, index: Tensor | None, a: Tensor, b: Tensor, ranks: tuple[int, ...],
               scales: tuple[float, ...], policy: KernelPolicy = TORCH_OPS) -> Tensor:
    """``Σ_i g_i s_i (x A_iᵀ) B_iᵀ`` with ``a (Σ r_i, d_in)``, ``b (d_out, Σ r_i)`` concatenated per
    expert. Dense (``index`` None): two GEMMs, the gates repeated over each expert's ranks. Top-k:
    the ``T·k`` (token, slot) pairs sorted by expert, one pair of GEMMs per expert over the rows
    that selected it (its own rank), summed back per token; when the kernel ``policy`` chooses
    Triton for ``x`` (``policy.grouped_kernel``), one Triton grouped op over the pairs
    (``backends/triton/ragged.py``)."""
    if index is None:
        d = torch.repeat_interleave(gates * gates.new_tensor(scales), torch.tensor(ranks, device=x.device),
                                    dim=1)  # (T, Σ r_i)
        return F.linear(F.linear(x, a) * d, b)  # (T, d_out)
    T, k = index.shape
    flat = index.reshape(-1)  # (T·k,)
    order = torch.argsort(flat, stable=True)  # (T·k,) pairs sorted by expert
    tokens = order // k  # (T·k,)
    w = gates.gather(1, index).reshape(-1)[order]  # (T·k,)
    if policy.grouped_kernel(x.device, x.dtype) == "triton":
        from moleforge.backends.triton.ragged import ragged_lowrank  # imports Triton

        w = w * gates.new_tensor(scales)[flat[order]]  # (T·k,) gate · the expert's scale
        offs = torch.bincount(flat, minlength=len(ranks)).cumsum(0)  # (E,) end of each expert's pairs
        return ragged_lowrank(x, tokens, w, offs, a, b, ranks)
    counts = torch.bincount(flat, minlength=len(ranks)).tolist()
    xs = x.index_select(0, tokens)  # (T·k, d_in)
    parts, start, off = [], 0, 0
    for e, (n, r) in enumerate(zip(counts, ranks)):
        rows = slice(start, start + n)
        if n:
            h = F.linear(xs[rows], a[off:off + r]) * (w[rows, None] * scales[e])  # (n, r)
            parts.append(F.linear(h, b[:, off:off + r]))  # (n, d_out)
        start, off = start + n, off + r
    ys = torch.cat(parts) if parts else x.new_zeros(0, b.shape[0])  # (T·k, d_out)
    return x.new_zeros(T, b.shape[0]).index_add(0, tokens, ys)  # (T, d_out)


def magnitude(x: Tensor, lora: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, dm: Tensor) -> Tensor:
    """DoRA's ``(c - 1) ⊙ (x Wᵀ) + c ⊙ lora``, ``c = (‖W‖ + dm) / ‖W + s·B A‖`` (row norms; the
    denominator without gradient, as PEFT). ``w (d_out, d_in)`` is the frozen weight."""
    w = w.to(x.dtype)
    c = dora_scales(w, a[None], b[None], scale, dm[None])[0]  # (d_out,): one expert
    return (c - 1.0) * F.linear(x, w) + c * lora  # (T, d_out)
