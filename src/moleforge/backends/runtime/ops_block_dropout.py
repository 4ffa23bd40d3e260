"""Dropout of the routed experts' LoRA inputs in training (MixLoRA's ``lora_dropout``; the
semantics are in ``ir/block_nodes.py``'s docstring): the keep factors drawn per routed slot and
LoRA, and the gate and up LoRAs' down-projections of the dropped inputs.

A block op takes ``drop = (p, training, generator)`` (``None``: no dropout). Out of training, or
with ``p = 0``, nothing is drawn and the ops run their evaluation code unchanged.

Masks are token-major, ``(T, k, width)`` per LoRA: slot ``(t, j)`` is token t's j-th routed expert
(the plan's ``index``), the layout the interpreter reads and the compiled CPU kernel walks; the
torch ops reorder them to the plan's sorted slots. The down LoRA's mask is materialised as one
``(T, k, d_ff)`` tensor in training (drawn per slot, as the ``mixlora`` package's one
``nn.Dropout`` call per expert draws a mask per routed token), and applied to ``h`` inside the
fused op or kernel, whose frozen down projection reads ``h`` undropped.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Drop", "dropping", "draw_keeps", "slot_z", "token_z", "sorted_rows"]

Drop = tuple[float, bool, "torch.Generator | None"]
"""``(p, training, generator)``: the block's dropout, the module's mode, the site's noise generator
(``None``: torch's global one)."""


def dropping(drop: Drop | None) -> bool:
    """Whether ``drop`` draws masks: training with ``p > 0``."""
    return drop is not None and bool(drop[1]) and drop[0] > 0


def draw_keeps(like: Tensor, T: int, k: int, widths: Sequence[int | None], drop: Drop) -> list[Tensor | None]:
    """One ``(T, k, width)`` keep factor ``[ν >= p] / (1 - p)`` per entry of ``widths`` (``None``: a
    linear without LoRA, nothing drawn), ``ν`` uniform on ``[0, 1)`` drawn in that order from the
    generator, in ``like``'s dtype and device (as ``torch.rand`` would draw them)."""
    p, _, generator = drop
    out: list[Tensor | None] = []
    for width in widths:
        if width is None:
            out.append(None)
            continue
        nu = like.new_empty(T, k, width).uniform_(0.0, 1.0, generator=generator)  # (T, k, width)
        out.append(nu.ge_(p).mul_(1.0 / (1.0 - p)))  # in place: a third less time than a new tensor per step
    return out


def slot_z(x: Tensor, index: Tensor, a: Tensor, keep: Tensor) -> Tensor:
    """``(T, k, r)``: each slot's ``(x_t ⊙ keep_tj) A_eᵀ``, ``e = index[t, j]``. Every expert's A runs on
    every slot's dropped input in one GEMM and each slot keeps its own expert's columns: k times
    the GEMM evaluation runs, with no sort (no data-dependent sizes)."""
    T, k = index.shape
    E, r, d = a.shape
    xd = (x[:, None, :] * keep).reshape(T * k, d)  # (T·k, d): the dropped input of every slot
    z = F.linear(xd, a.reshape(E * r, d)).view(T, k, E, r)  # (T, k, E, r)
    return z.gather(2, index[:, :, None, None].expand(T, k, 1, r)).squeeze(2)  # (T, k, r)


def token_z(z: Tensor, index: Tensor, experts: int) -> Tensor:
    """``(T, E, r)`` with slot ``(t, j)``'s ``z[t, j]`` at expert ``index[t, j]`` and zeros elsewhere:
    the layout the CPU kernel reads (a token's experts are distinct, so no two slots collide)."""
    T, k, r = z.shape
    return z.new_zeros(T, experts, r).scatter(1, index[:, :, None].expand(T, k, r), z)


def sorted_rows(t: Tensor, order: Tensor) -> Tensor:
    """``(S, width)``: token-major slots ``t (T, k, width)`` in the plan's sorted ``order``."""
    return t.reshape(-1, t.shape[2]).index_select(0, order)
