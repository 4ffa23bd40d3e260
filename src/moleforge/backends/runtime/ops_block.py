"""Runtime ops of routed FFN-block experts (MixLoRA): the lowered forms of ``expert_ffn``,
``expert_hidden``, ``expert_sum`` and ``expert_lora``.

A routing of T tokens to k experts each has T·k (token, expert) slots. ``slot_plan`` groups
them by expert once per router (:class:`SlotPlan`); the block ops read that plan, so each
expert's low-rank factors run on its own contiguous segment of slots only. Values of
``expert_hidden`` are ``(S, d_ff)`` in plan order.
They must agree with the reference interpreter (``moleforge.ir.interpret``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cpu.routed_ffn import token_routed_ffn
from .ops_block_fused import CHUNK, RoutedFFN
from .ops_block_grad import ACTIVATIONS, SegmentMatmul, SlotSum
from .packed import PackCache, caching, packed
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["ACTIVATIONS", "SlotPlan", "slot_plan", "expert_hidden", "routed_ffn", "expert_sum", "expert_lora",
           "expert_lora_down", "expert_lora_up", "expert_ffn"]

LinearArgs = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, float]
"""``(W [out, in], b, A (E, r, in), B (E, out, r), scale)`` of one block linear."""


@dataclass(frozen=True)
class SlotPlan:
    """The routed (token, expert) slots sorted by expert, built once per router: ``token``,
    ``expert`` and ``gate`` are ``(S,)``; expert e owns ``counts[e]`` consecutive slots. The same
    slots token by token: ``index`` and ``weights`` are ``(T, k)``, and sorted slot p is
    token-major slot ``order[p]``."""

    T: int
    counts: list[int]
    token: Tensor
    expert: Tensor
    gate: Tensor
    index: Tensor
    weights: Tensor
    order: Tensor


def slot_plan(gates: Tensor, index: Tensor | None) -> SlotPlan:
    """Sort the routed slots by expert; ``index=None`` (dense router) makes every expert a slot."""
    T, E = gates.shape
    if index is None:
        index = torch.arange(E, device=gates.device).expand(T, E)
    k = index.shape[1]
    flat = index.reshape(-1)  # (S,)
    order = torch.argsort(flat, stable=True)  # (S,)
    token = torch.div(order, k, rounding_mode="floor")  # (S,)
    weights = gates.gather(1, index)  # (T, k)
    gate = weights.reshape(-1).index_select(0, order)  # (S,)
    counts = torch.bincount(flat, minlength=E).tolist()
    return SlotPlan(T=T, counts=counts, token=token, expert=flat.index_select(0, order), gate=gate, index=index,
                    weights=weights, order=order)


def _segments(u: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``u[seg_e] @ w[e]ᵀ`` for each expert's segment (plain autograd ops, the unshared form):
    ``(S, i), (E, o, i) -> (S, o)``. ``split`` / ``unbind`` (not slicing) so that autograd joins the
    gradients with one ``cat`` / ``stack`` instead of a zero-filled full-size tensor per segment."""
    pieces = zip(u.split(counts), w.unbind(0), counts, strict=True)
    parts = [ue @ we.T for ue, we, n in pieces if n]  # (n_e, o)
    if not parts:
        return u.new_zeros(0, w.shape[1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _expert_z(x: Tensor, plan: SlotPlan, A: Tensor) -> Tensor:
    """Each slot's ``x_t A_eᵀ``: every expert's down-projection in one GEMM, then gathered ``(S, r)``."""
    E, r, d = A.shape
    z = F.linear(x, A.reshape(E * r, d)).view(plan.T, E, r)  # (T, E, r)
    return z[plan.token, plan.expert]  # (S, r)


def _slot_linear(x: Tensor, plan: SlotPlan, lin: LinearArgs, base: Tensor | None) -> Tensor:
    """``base[t] + s (x_t A_eᵀ) B_eᵀ`` per slot ``(t, e)`` (plain autograd ops)."""
    W, bias, A, B, scale = lin
    # without a precomputed base the frozen GEMM runs per slot (the unshared form)
    if base is None:
        out = F.linear(x.index_select(0, plan.token), W, bias)  # (S, out)
    else:
        out = base.index_select(0, plan.token)  # (S, out)
    if A is None:
        return out
    return out + _segments(_expert_z(x, plan, A), B, plan.counts) * scale  # (S, out)


def expert_hidden(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor | None,
                  gate_base: Tensor | None, activation: str) -> Tensor:
    """``h = act(G_e(x_t)) ⊙ U_e(x_t)`` (or ``act(U_e(x_t))``) per slot: ``(S, d_ff)``."""
    act = ACTIVATIONS[activation]
    u = _slot_linear(x, plan, up, up_base)
    if gate is None:
        return act(u)
    return act(_slot_linear(x, plan, gate, gate_base)) * u


def routed_ffn(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor,
               gate_base: Tensor | None, activation: str, down_a: Tensor | None = None, down_b: Tensor | None = None,
               down_scale: float = 1.0, chunk: int = CHUNK,
               policy: KernelPolicy = TORCH_OPS, cache: PackCache | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`expert_hidden`, :func:`expert_sum` of it and (with ``down_a (E, r, d_ff)``, ``down_b
    (E, d_out, r)``) :func:`expert_lora` of it: ``((T, d_ff), (T, d_out) or None)``. Needs the shared
    frozen projections. Where the module's kernel ``policy`` chooses it (``routed_ffn_kernel``: CPU
    float32/float64 tensors, the kernel built at lowering) the compiled kernel runs it token by
    token (``backends.cpu``); otherwise ``RoutedFFN`` runs it expert by expert in cache, in runs of
    ``chunk`` values. Without autograd the CPU kernel's packed factors are kept by ``cache``
    (``packed.py``)."""
    if policy.routed_ffn_kernel(up_base.device, up_base.dtype) == "cpu":
        _, _, ga, gb, gs = (None, None, None, None, 1.0) if gate is None else gate
        zu, zg = _all_z(x, up[2], ga, cache=cache)
        ub, gb, down_b = (_kernel_layout(cache, name, b) for name, b in (("up_b", up[3]), ("gate_b", gb),
                                                                          ("down_b", down_b)))
        return token_routed_ffn(plan.index, plan.weights, activation, up_base, zu, ub, up[4], gate_base, zg, gb,
                                gs, down_a, down_b, down_scale)
    zu = None if up[2] is None else _expert_z(x, plan, up[2])
    zg = None if gate is None or gate[2] is None else _expert_z(x, plan, gate[2])
    g = (None, None, 1.0) if gate is None else (zg, gate[3], gate[4])
    y, z = RoutedFFN.apply(plan.token, plan.gate, plan.counts, plan.T, activation, up_base, zu, up[3], up[4],
                           gate_base, *g, down_a, chunk)
    return y, (None if down_a is None else expert_lora_up(z, plan, down_b, down_scale))


def _kernel_layout(cache: PackCache | None, name: str, b: Tensor | None) -> Tensor | None:
    """Without autograd, an up factor ``(E, F, r)`` kept by ``cache`` with its transpose contiguous,
    the layout the CPU kernel reads (its launcher's copy is then a no-op); otherwise ``b``."""
    if b is None or cache is None or not caching():
        return b
    return packed(cache, name, (b,), lambda: b.transpose(1, 2).contiguous().transpose(1, 2))


def _all_z(x: Tensor, *factors: Tensor | None, cache: PackCache | None = None) -> list[Tensor | None]:
    """Every expert's ``x_t A_eᵀ`` for each ``A (E, r, d)`` given (``None`` gives ``None``), all in one
    GEMM: ``(T, E, r)`` each, slices of its ``(T, Σ E·r)`` output; the stacked factors kept by
    ``cache`` without autograd."""
    present = [a for a in factors if a is not None]
    if not present:
        return [None] * len(factors)
    stacked = packed(cache, "all_z", present, lambda: torch.cat([a.reshape(-1, a.shape[2]) for a in present])) \
        if len(present) > 1 else present[0].reshape(-1, present[0].shape[2])
    z = F.linear(x, stacked)  # (T, Σ E·r)
    out, col = [], 0
    for a in factors:
        if a is None:
            out.append(None)
            continue
        E, r, _ = a.shape
        out.append(z[:, col:col + E * r].view(x.shape[0], E, r))
        col += E * r
    return out


def expert_sum(h: Tensor, plan: SlotPlan) -> Tensor:
    """``Σ_i g_i h_i``: weighted scatter-add of the slots onto their tokens, ``(T, d_ff)``."""
    return SlotSum.apply(h, plan.gate, plan.token, plan.T)


def expert_lora_down(h: Tensor, plan: SlotPlan, a: Tensor) -> Tensor:
    """Each slot's own expert's down-projection ``h_s A_eᵀ``: ``(S, r)``."""
    return SegmentMatmul.apply(h, a, plan.counts)


def expert_lora_up(z: Tensor, plan: SlotPlan, b: Tensor, scale: float) -> Tensor:
    """``Σ_i g_i s z_i B_iᵀ``: the gated down-projections placed in their expert's block of a
    ``(T, E·r)`` matrix, then one GEMM with the stacked B: ``(T, d_out)``."""
    E, d_out, r = b.shape
    z = z * (plan.gate * scale)[:, None]  # (S, r)
    Z = z.new_zeros(plan.T, E, r).index_put((plan.token, plan.expert), z, accumulate=True)  # (T, E, r)
    return F.linear(Z.view(plan.T, E * r), b.permute(1, 0, 2).reshape(d_out, E * r))  # (T, d_out)


def expert_lora(h: Tensor, plan: SlotPlan, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``Σ_i g_i s (h_i A_iᵀ) B_iᵀ``: ``(T, d_out)``."""
    return expert_lora_up(expert_lora_down(h, plan, a), plan, b, scale)


def _expert_linear(u: Tensor, lin: LinearArgs, e: int, base: Tensor | None) -> Tensor:
    W, bias, A, B, scale = lin
    y = F.linear(u, W, bias) if base is None else base
    if A is None:
        return y
    return y + F.linear(F.linear(u, A[e]), B[e]) * scale


def expert_ffn(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, down: LinearArgs,
               up_base: Tensor | None, gate_base: Tensor | None, activation: str) -> Tensor:
    """The plain form: every expert runs its whole FFN (frozen GEMMs included) on its own
    tokens, weighted and scattered back: ``(T, d_out)``."""
    act = ACTIVATIONS[activation]
    out = x.new_zeros(plan.T, down[0].shape[0])  # (T, d_out)
    slots = zip(plan.token.split(plan.counts), plan.gate.split(plan.counts), strict=True)
    for e, (tok, g) in enumerate(slots):
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)  # (n, d_in)
        u = _expert_linear(xe, up, e, None if up_base is None else up_base.index_select(0, tok))
        if gate is None:
            h = act(u)
        else:
            g_base = None if gate_base is None else gate_base.index_select(0, tok)
            h = act(_expert_linear(xe, gate, e, g_base)) * u
        out = out.index_add(0, tok, _expert_linear(h, down, e, None) * g[:, None])  # (T, d_out)
    return out
