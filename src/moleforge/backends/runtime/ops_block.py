"""Runtime ops of routed FFN-block experts (MixLoRA): the lowered forms of ``expert_ffn``,
``expert_hidden``, ``expert_sum`` and ``expert_lora``.

A routing of T tokens to k experts each has T·k (token, expert) slots. ``slot_plan`` groups
them by expert once per router (:class:`SlotPlan`); the block ops read that plan, so each
expert's low-rank factors run on its own contiguous segment of slots only. Values of
``expert_hidden`` are ``(S, d_ff)`` in plan order.
They must agree with the reference interpreter (``moleforge.ir.interpret``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cpu.routed_ffn import token_routed_ffn
from .ops_block_dora import Dora, block_scales
from .ops_block_dropout import Drop, draw_keeps, dropping, slot_z, sorted_rows, token_z
from .ops_block_fused import CHUNK, RoutedFFN
from .ops_block_grad import ACTIVATIONS, SegmentMatmul, SlotSum
from .packed import PackCache, caching, packed
from .policy import TORCH_OPS, KernelPolicy

__all__ = ["ACTIVATIONS", "SlotPlan", "slot_plan", "expert_hidden", "routed_ffn", "expert_sum", "expert_lora",
           "expert_lora_down", "expert_lora_up", "expert_ffn"]

LinearArgs = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, float]
"""``(W [out, in], b, A (E, r, in), B (E, out, r), scale)`` of one block linear."""


class SlotPlan:
    """The routed (token, expert) slots of one router, token by token: ``index`` and ``weights`` are
    ``(T, k)`` over ``E`` experts. Sorted by expert on first use (once per router): ``token``, ``expert`` and ``gate``
    are ``(S,)``; expert e owns ``counts[e]`` consecutive slots, and sorted slot p is token-major
    slot ``order[p]``. The compiled CPU kernel reads the token-major slots only, so a forward that
    runs it never sorts, and has no data-dependent size (``torch.compile`` traces it whole)."""

    def __init__(self, T: int, E: int, index: Tensor, weights: Tensor):
        self.T, self.E, self.index, self.weights = T, E, index, weights

    @functools.cached_property
    def order(self) -> Tensor:
        return torch.argsort(self.index.reshape(-1), stable=True)  # (S,)

    @functools.cached_property
    def token(self) -> Tensor:
        return torch.div(self.order, self.index.shape[1], rounding_mode="floor")  # (S,)

    @functools.cached_property
    def expert(self) -> Tensor:
        return self.index.reshape(-1).index_select(0, self.order)  # (S,)

    @functools.cached_property
    def gate(self) -> Tensor:
        return self.weights.reshape(-1).index_select(0, self.order)  # (S,)

    @functools.cached_property
    def counts(self) -> list[int]:
        return torch.bincount(self.index.reshape(-1), minlength=self.E).tolist()


def slot_plan(gates: Tensor, index: Tensor | None) -> SlotPlan:
    """The slots of a routing ``gates (T, E)``, ``index (T, k)``; ``index=None`` (dense router)
    makes every expert a slot."""
    T, E = gates.shape
    if index is None:
        index = torch.arange(E, device=gates.device).expand(T, E)
    return SlotPlan(T, E, index, gates.gather(1, index))  # weights (T, k)


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


def _slot_linear(x: Tensor, plan: SlotPlan, lin: LinearArgs, base: Tensor | None,
                 keep: Tensor | None = None, c: Tensor | None = None) -> Tensor:
    """``base[t] + s (x_t A_eᵀ) B_eᵀ`` per slot ``(t, e)`` (plain autograd ops); with ``keep (T, k, d)``
    the LoRA reads each slot's dropped ``x_t ⊙ keep_tj``; with DoRA's ``c (E, out)`` the slot's sum is
    scaled by ``c_e`` (``ops_block_dora``)."""
    W, bias, A, B, scale = lin
    # without a precomputed base the frozen GEMM runs per slot (the unshared form)
    if base is None:
        out = F.linear(x.index_select(0, plan.token), W, bias)  # (S, out)
    else:
        out = base.index_select(0, plan.token)  # (S, out)
    if A is None:
        return out
    z = _expert_z(x, plan, A) if keep is None else sorted_rows(slot_z(x, plan.index, A, keep), plan.order)
    out = out + _segments(z, B, plan.counts) * scale  # (S, out)
    return out if c is None else out * c.index_select(0, plan.expert)


def _keeps(like: Tensor, plan: SlotPlan, widths: dict[str, int | None], drop: Drop | None) -> dict[str, Tensor]:
    """``{role: (T, k, width)}`` keep factors of the LoRAs in ``widths`` (``None``: no LoRA), drawn
    in its order (gate, up, down) in training with dropout; ``{}`` otherwise (nothing drawn)."""
    if not dropping(drop):
        return {}
    drawn = draw_keeps(like, plan.T, plan.index.shape[1], list(widths.values()), drop)  # type: ignore[arg-type]
    return {role: keep for role, keep in zip(widths, drawn) if keep is not None}


def _lora_width(lin: LinearArgs | None, width: int) -> int | None:
    return None if lin is None or lin[2] is None else width


def expert_hidden(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor | None,
                  gate_base: Tensor | None, activation: str, drop: Drop | None = None, dora: Dora | None = None,
                  cache: PackCache | None = None) -> Tensor:
    """``h = act(G_e(x_t)) ⊙ U_e(x_t)`` (or ``act(U_e(x_t))``) per slot: ``(S, d_ff)``; with ``drop``
    in training the gate and up LoRAs read dropped inputs (``ops_block_dropout``); with ``dora`` (the
    magnitudes of up, gate, down) DoRA experts (``ops_block_dora``, their norms kept by ``cache``
    without autograd)."""
    act = ACTIVATIONS[activation]
    d = x.shape[1]
    keeps = _keeps(x, plan, {"gate": _lora_width(gate, d), "up": _lora_width(up, d)}, drop)
    c = block_scales({"up": up, "gate": gate, "down": None}, dora, cache)
    u = _slot_linear(x, plan, up, up_base, keeps.get("up"), c.get("up"))
    if gate is None:
        return act(u)
    return act(_slot_linear(x, plan, gate, gate_base, keeps.get("gate"), c.get("gate"))) * u


def routed_ffn(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor,
               gate_base: Tensor | None, activation: str, down_a: Tensor | None = None, down_b: Tensor | None = None,
               down_scale: float = 1.0, chunk: int = CHUNK, policy: KernelPolicy = TORCH_OPS,
               cache: PackCache | None = None, drop: Drop | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`expert_hidden`, :func:`expert_sum` of it and (with ``down_a (E, r, d_ff)``, ``down_b
    (E, d_out, r)``) :func:`expert_lora` of it: ``((T, d_ff), (T, d_out) or None)``. Needs the shared
    frozen projections. Where the module's kernel ``policy`` chooses it (``routed_ffn_kernel``: CPU
    float32/float64 tensors, the kernel built at lowering) the compiled kernel runs it token by
    token (``backends.cpu``); otherwise ``RoutedFFN`` runs it expert by expert in cache, in runs of
    ``chunk`` values. Without autograd the CPU kernel's packed factors are kept by ``cache``
    (``packed.py``). With ``drop`` in training every LoRA reads its dropped input
    (``ops_block_dropout``), the down LoRA's mask applied to ``h`` inside the fused op or kernel."""
    d = x.shape[1]
    widths = {"gate": _lora_width(gate, d), "up": _lora_width(up, d),
              "down": None if down_a is None else up_base.shape[1]}
    keeps = _keeps(x, plan, widths, drop)
    if keeps:
        return _dropped_routed_ffn(x, plan, up, gate, up_base, gate_base, activation, (down_a, down_b, down_scale),
                                   keeps, chunk, policy)
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


def _dropped_routed_ffn(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, up_base: Tensor,
                        gate_base: Tensor | None, activation: str, down: tuple, keeps: dict[str, Tensor], chunk: int,
                        policy: KernelPolicy) -> tuple[Tensor, Tensor | None]:
    """:func:`routed_ffn` in training with dropout: the gate and up LoRAs' ``z`` of the dropped inputs
    per slot (``slot_z``), the down mask ``keeps["down"] (T, k, d_ff)`` handed to the kernel or
    (sorted) to ``RoutedFFN``."""
    down_a, down_b, down_scale = down
    ga, gb, gs = (None, None, 1.0) if gate is None else gate[2:]
    z = {role: None if a is None else slot_z(x, plan.index, a, keeps[role])
         for role, a in (("up", up[2]), ("gate", ga))}  # (T, k, r) each
    if policy.routed_ffn_kernel(up_base.device, up_base.dtype) == "cpu":
        zu, zg = (None if t is None else token_z(t, plan.index, plan.E) for t in (z["up"], z["gate"]))
        return token_routed_ffn(plan.index, plan.weights, activation, up_base, zu, up[3], up[4], gate_base, zg, gb,
                                gs, down_a, down_b, down_scale, down_keep=keeps.get("down"))
    zu, zg = (None if t is None else sorted_rows(t, plan.order) for t in (z["up"], z["gate"]))
    keep = None if "down" not in keeps else sorted_rows(keeps["down"], plan.order)  # (S, d_ff)
    y, zd = RoutedFFN.apply(plan.token, plan.gate, plan.counts, plan.T, activation, up_base, zu, up[3], up[4],
                            gate_base, zg, gb, gs, down_a, chunk, keep)
    return y, (None if down_a is None else expert_lora_up(zd, plan, down_b, down_scale))


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


def expert_lora_down(h: Tensor, plan: SlotPlan, a: Tensor, drop: Drop | None = None) -> Tensor:
    """Each slot's own expert's down-projection ``h_s A_eᵀ``: ``(S, r)``; with ``drop`` in training of
    the dropped ``h_s`` (one ``(T, k, d_ff)`` mask drawn, ``ops_block_dropout``)."""
    keep = _keeps(h, plan, {"down": h.shape[1]}, drop).get("down")
    if keep is not None:
        h = h * sorted_rows(keep, plan.order)  # (S, d_ff)
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


def _expert_linear(u: Tensor, lin: LinearArgs, e: int, base: Tensor | None, keep: Tensor | None = None,
                   c: Tensor | None = None) -> Tensor:
    W, bias, A, B, scale = lin
    y = F.linear(u, W, bias) if base is None else base
    if A is None:
        return y
    y = y + F.linear(F.linear(u if keep is None else u * keep, A[e]), B[e]) * scale
    return y if c is None else y * c[e]


def expert_ffn(x: Tensor, plan: SlotPlan, up: LinearArgs, gate: LinearArgs | None, down: LinearArgs,
               up_base: Tensor | None, gate_base: Tensor | None, activation: str, drop: Drop | None = None,
               dora: Dora | None = None, cache: PackCache | None = None) -> Tensor:
    """The plain form: every expert runs its whole FFN (frozen GEMMs included) on its own
    tokens, weighted and scattered back: ``(T, d_out)``; with ``drop`` in training every LoRA reads its
    dropped input (``ops_block_dropout``); with ``dora`` (the magnitudes of up, gate, down) DoRA
    experts (``ops_block_dora``, their norms kept by ``cache`` without autograd)."""
    act = ACTIVATIONS[activation]
    d, d_ff = x.shape[1], up[0].shape[0]
    widths = {"gate": _lora_width(gate, d), "up": _lora_width(up, d), "down": _lora_width(down, d_ff)}
    keeps = {role: sorted_rows(t, plan.order).split(plan.counts)
             for role, t in _keeps(x, plan, widths, drop).items()}  # per expert: (n, width)
    c = block_scales({"up": up, "gate": gate, "down": down}, dora, cache)  # {role: (E, out)}
    out = x.new_zeros(plan.T, down[0].shape[0])  # (T, d_out)
    slots = zip(plan.token.split(plan.counts), plan.gate.split(plan.counts), strict=True)
    for e, (tok, g) in enumerate(slots):
        if tok.numel() == 0:
            continue
        keep = {role: parts[e] for role, parts in keeps.items()}
        xe = x.index_select(0, tok)  # (n, d_in)
        u_base = None if up_base is None else up_base.index_select(0, tok)
        u = _expert_linear(xe, up, e, u_base, keep.get("up"), c.get("up"))
        if gate is None:
            h = act(u)
        else:
            g_base = None if gate_base is None else gate_base.index_select(0, tok)
            h = act(_expert_linear(xe, gate, e, g_base, keep.get("gate"), c.get("gate"))) * u
        y = _expert_linear(h, down, e, None, keep.get("down"), c.get("down"))
        out = out.index_add(0, tok, y * g[:, None])  # (T, d_out)
    return out
