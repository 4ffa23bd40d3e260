"""Runtime ops of routed FFN-block experts (MixLoRA): the lowered forms of ``expert_ffn``,
``expert_hidden``, ``expert_sum`` and ``expert_lora``.

A routing of T tokens to k experts each has S = T·k (token, expert) slots. ``slot_plan``
sorts them by expert once per router; the block ops read that plan, so each expert's
low-rank factors run on one contiguous segment of slots and no expert ever touches a
token that did not select it. Values of ``expert_hidden`` are ``(S, d_ff)`` in plan order.
They must agree with the reference interpreter (``moleforge.ir.interpret``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "slot_plan", "expert_hidden", "expert_sum", "expert_lora", "expert_ffn"]

Plan = tuple[Tensor, Tensor, Tensor, list[int], int]
"""``(token (S,), expert (S,), gate (S,), slots per expert [E], T)``, slots sorted by expert."""

LinearArgs = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, float]
"""``(W [out, in], b, A (E, r, in), B (E, out, r), scale)`` of one block linear."""


def _quick_gelu(v: Tensor) -> Tensor:
    return v * torch.sigmoid(1.702 * v)


def _gelu_tanh(v: Tensor) -> Tensor:
    return F.gelu(v, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "quick_gelu": _quick_gelu,
}
"""Torch forms of ``moleforge.ir.BlockActivation``."""


def slot_plan(gates: Tensor, index: Tensor | None) -> Plan:
    """Sort the routed slots by expert; ``index=None`` (dense router) makes every expert a slot."""
    T, E = gates.shape
    if index is None:
        index = torch.arange(E, device=gates.device).expand(T, E)
    k = index.shape[1]
    flat = index.reshape(-1)  # (S,)
    order = torch.argsort(flat, stable=True)  # (S,)
    token = torch.div(order, k, rounding_mode="floor")  # (S,)
    expert = flat.index_select(0, order)  # (S,)
    gate = gates.gather(1, index).reshape(-1).index_select(0, order)  # (S,)
    counts = torch.bincount(flat, minlength=E).tolist()
    return token, expert, gate, counts, T


def _segments(u: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``u[seg_e] @ w[e]ᵀ`` for each expert's segment of sorted slots: ``(S, i), (E, o, i) -> (S, o)``."""
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n:
            parts.append(u[start:start + n] @ w[e].T)  # (n, o)
            start += n
    if not parts:
        return u.new_zeros(0, w.shape[1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _slot_linear(x: Tensor, plan: Plan, lin: LinearArgs, base: Tensor | None) -> Tensor:
    """``base[t] + s (x_t A_eᵀ) B_eᵀ`` per sorted slot ``(t, e)``: ``(S, out)``."""
    token, expert, _, counts, T = plan
    W, bias, A, B, scale = lin
    if base is None:
        out = F.linear(x.index_select(0, token), W, bias)  # (S, out): frozen GEMM per slot
    else:
        out = base.index_select(0, token)  # (S, out): frozen GEMM done once, gathered
    if A is None:
        return out
    E, r, d = A.shape
    z = F.linear(x, A.reshape(E * r, d)).view(T, E, r)  # (T, E, r): every expert's down-projection, one GEMM
    z = z[token, expert]  # (S, r)
    return out + _segments(z, B, counts) * scale  # (S, out)


def expert_hidden(x: Tensor, plan: Plan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor | None,
                  gate_base: Tensor | None, activation: str) -> Tensor:
    """``h = act(G_e(x_t)) ⊙ U_e(x_t)`` (or ``act(U_e(x_t))``) per sorted slot: ``(S, d_ff)``."""
    act = ACTIVATIONS[activation]
    u = _slot_linear(x, plan, up, up_base)  # (S, d_ff)
    if gate is None:
        return act(u)
    return act(_slot_linear(x, plan, gate, gate_base)) * u  # (S, d_ff)


def expert_sum(h: Tensor, plan: Plan) -> Tensor:
    """``Σ_i g_i h_i``: weighted scatter-add of the slots onto their tokens, ``(T, d_ff)``."""
    token, _, gate, _, T = plan
    return h.new_zeros(T, h.shape[1]).index_add(0, token, h * gate[:, None])


def expert_lora(h: Tensor, plan: Plan, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``Σ_i g_i s (h_i A_iᵀ) B_iᵀ``: per-expert down-projections of the slots, placed in their
    expert's block of a ``(T, E·r)`` matrix, then one GEMM with the stacked B: ``(T, d_out)``."""
    token, expert, gate, counts, T = plan
    E, r, _ = a.shape
    z = _segments(h, a, counts) * (gate * scale)[:, None]  # (S, r)
    Z = z.new_zeros(T, E, r).index_put((token, expert), z, accumulate=True)  # (T, E, r)
    return F.linear(Z.view(T, E * r), b.permute(1, 0, 2).reshape(b.shape[1], E * r))  # (T, d_out)


def _expert_linear(u: Tensor, lin: LinearArgs, e: int, base: Tensor | None) -> Tensor:
    W, bias, A, B, scale = lin
    y = F.linear(u, W, bias) if base is None else base
    if A is None:
        return y
    return y + F.linear(F.linear(u, A[e]), B[e]) * scale


def expert_ffn(x: Tensor, plan: Plan, up: LinearArgs, gate: LinearArgs | None, down: LinearArgs,
               up_base: Tensor | None, gate_base: Tensor | None, activation: str) -> Tensor:
    """The plain form: every expert runs its whole FFN (frozen GEMMs included) on its own
    tokens, weighted and scattered back: ``(T, d_out)``."""
    token, _, gate_w, counts, T = plan
    act = ACTIVATIONS[activation]
    out = x.new_zeros(T, down[0].shape[0])  # (T, d_out)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token[start:start + n]
        xe = x.index_select(0, tok)  # (n, d_in)
        u = _expert_linear(xe, up, e, None if up_base is None else up_base.index_select(0, tok))
        if gate is None:
            h = act(u)
        else:
            h = act(_expert_linear(xe, gate, e, None if gate_base is None else gate_base.index_select(0, tok))) * u
        y = _expert_linear(h, down, e, None)  # (n, d_out)
        out = out.index_add(0, tok, y * gate_w[start:start + n, None])
        start += n
    return out
