"""Autograd for the fused CPU routed FFN-block op (``moleforge_cpu::routed_ffn``).

Token-major layout: token t's k slots are rows ``t·k … t·k + k − 1``. ``index (T, k)`` names each
slot's expert and ``weights (T, k)`` its gate weight. Each gated projection's low-rank part comes
as ``z (T, E, r)``, every expert's ``x_t A_eᵀ`` (one dense GEMM upstream), and ``B (E, r, F)``.
In training with dropout the z of the dropped inputs come the same way (at each slot's expert), and
the down LoRA's keep factors ``(T, k, F)`` are applied to ``h`` in the kernel (``ops_block_dropout``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACTIVATION_CODES", "TokenRoutedFFN", "token_routed_ffn", "register_fakes"]

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "quick_gelu": 4}
"""The kernel's codes for ``moleforge.ir.BlockActivation`` names."""


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t.contiguous()


def _z(t: Tensor | None, like: Tensor) -> Tensor:
    """A ``(T, E, r)`` z as the kernel reads it: rows of contiguous ``(E, r)`` blocks, any row stride."""
    if t is None:
        return like.new_empty(0)
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


class TokenRoutedFFN(torch.autograd.Function):
    """``(y (T, F), yd (T, D))``: the gated sum of the experts' hidden states and the gated sum of
    their down-LoRAs (empty without one); see ``routed_ffn.cpp`` for the math."""

    @staticmethod
    def forward(ctx, index: Tensor, weights: Tensor, activation: int, up_base: Tensor, zu: Tensor, bu: Tensor,
                su: float, gate_base: Tensor, zg: Tensor, bg: Tensor, sg: float, down_a: Tensor, down_b: Tensor,
                sd: float, down_keep: Tensor | None = None):
        y, yd, zd = torch.ops.moleforge_cpu.routed_ffn(index, weights, activation, up_base, zu, bu, su, gate_base, zg,
                                                       bg, sg, down_a, down_b, sd, down_keep)
        ctx.save_for_backward(index, weights, up_base, zu, bu, gate_base, zg, bg, down_a, down_b, zd, down_keep)
        ctx.meta = (activation, su, sg, sd)
        return y, yd

    @staticmethod
    def backward(ctx, gy: Tensor, gyd: Tensor | None):
        index, weights, up_base, zu, bu, gate_base, zg, bg, down_a, down_b, zd, keep = ctx.saved_tensors
        activation, su, sg, sd = ctx.meta
        if down_a.numel() and gyd is None:
            gyd = up_base.new_zeros(index.shape[0], down_b.shape[2])
        gyd = up_base.new_empty(0) if not down_a.numel() else gyd.contiguous()
        grads = torch.ops.moleforge_cpu.routed_ffn_backward(gy.contiguous(), gyd, index, weights, activation, up_base,
                                                            zu, bu, su, gate_base, zg, bg, sg, down_a, down_b, sd, zd,
                                                            keep)
        d_w, d_ub, d_zu, d_bu, d_gb, d_zg, d_bg, d_da, d_bd = grads

        def present(t: Tensor, i: int) -> Tensor | None:
            return t if ctx.needs_input_grad[i] and t.numel() else None

        return (None, present(d_w, 1), None, present(d_ub, 3), present(d_zu, 4), present(d_bu, 5), None,
                present(d_gb, 7), present(d_zg, 8), present(d_bg, 9), None, present(d_da, 11), present(d_bd, 12), None,
                None)


def token_routed_ffn(index: Tensor, weights: Tensor, activation: str, up_base: Tensor, up_z: Tensor | None,
                     up_b: Tensor | None, up_scale: float, gate_base: Tensor | None, gate_z: Tensor | None,
                     gate_b: Tensor | None, gate_scale: float, down_a: Tensor | None, down_b: Tensor | None,
                     down_scale: float, down_keep: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The fused block over token-major slots: ``(y (T, F), yd (T, D) or None)``.

    ``*_z (T, E, r)`` and ``*_b (E, F, r)`` (the IR's layout) give each projection's low-rank
    part, ``None`` for none; ``gate_base=None`` for a block without a gate; ``down_a (E, r, F)`` and
    ``down_b (E, D, r)`` the down projection's LoRA, whose gated sum ``Σ_j w_j s (h_j A_eᵀ) B_eᵀ`` is
    ``yd`` (``None`` without one). ``down_keep (T, k, F)``: the down LoRA's dropout keep factors
    (training), ``h ⊙ keep`` being what the down LoRA reads.
    Needs the kernels loaded (:func:`moleforge.backends.cpu.build`, which lowering runs).
    """
    like = up_base
    bu = None if up_b is None else up_b.transpose(1, 2)  # (E, r, F)
    bg = None if gate_b is None else gate_b.transpose(1, 2)
    bd = None if down_b is None or down_a is None else down_b.transpose(1, 2)  # (E, r, D)
    y, yd = TokenRoutedFFN.apply(index.contiguous(), weights.contiguous(), ACTIVATION_CODES[activation],
                                 up_base.contiguous(), _z(None if bu is None else up_z, like), _or_empty(bu, like),
                                 float(up_scale), _or_empty(gate_base, like),
                                 _z(None if bg is None else gate_z, like), _or_empty(bg, like), float(gate_scale),
                                 _or_empty(None if bd is None else down_a, like), _or_empty(bd, like),
                                 float(down_scale), None if down_keep is None or bd is None else down_keep.contiguous())
    return y, (yd if bd is not None else None)


def register_fakes() -> None:
    """Shape-only implementations of the two ops, so ``torch.compile`` can trace them."""

    @torch.library.register_fake("moleforge_cpu::routed_ffn")
    def _forward(index, weights, activation, up_base, zu, bu, su, gate_base, zg, bg, sg, down_a, down_b, sd,
                 down_keep=None):
        T, k = index.shape
        down = down_a.dim() == 3
        return (up_base.new_empty(T, up_base.shape[1]), up_base.new_empty((T, down_b.shape[2]) if down else (0,)),
                up_base.new_empty(T, k, down_a.shape[1] if down else 0))

    @torch.library.register_fake("moleforge_cpu::routed_ffn_backward")
    def _backward(grad_y, grad_yd, index, weights, activation, up_base, zu, bu, su, gate_base, zg, bg, sg, down_a,
                  down_b, sd, zd, down_keep=None):
        def like(t: Tensor, present: Tensor) -> Tensor:  # absent gradients are (fresh) empty tensors
            return up_base.new_empty(t.shape if present.dim() > 1 else (0,))

        d_zu, d_zg, d_gb = like(zu, bu), like(zg, bg), like(up_base, gate_base)
        return [weights.new_empty(weights.shape), up_base.new_empty(up_base.shape), d_zu, like(bu, bu), d_gb, d_zg,
                like(bg, bg), like(down_a, down_a), like(down_b, down_b)]
