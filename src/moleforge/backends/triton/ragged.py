"""Experts of their own ranks (FlexMoRE's ``pool.ranks``) in Triton: the grouped low-rank op
(``moleforge::grouped_lowrank``, :mod:`.grouped`) on the experts' factors zero-padded to the
largest rank.

``a (Σ r_i, d_in)`` and ``b (d_out, Σ r_i)`` hold the experts' factors side by side; expert i's
``A_i (r_i, d_in)`` becomes rows ``[0, r_i)`` of ``a_pad[i] (r_max, d_in)`` and ``B_i`` columns
``[0, r_i)`` of ``b_pad[i] (d_out, r_max)``, the rest zero. Exact: a zero row of ``A_i`` gives a
zero hidden unit, which a zero column of ``B_i`` reads; and their gradients are zero too (the
padding's backward drops them). The kernel's rank block is at least 16 wide (``tl.dot``), so ranks
up to 16 cost the same padded or not. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moleforge.backends.triton.grouped import grouped_lowrank

__all__ = ["pad_ragged", "ragged_lowrank"]


def pad_ragged(a: Tensor, b: Tensor, ranks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(a_pad (E, r_max, d_in), b_pad (E, d_out, r_max))`` of the concatenated factors (differentiable)."""
    r_max, off = max(ranks), 0
    a_parts, b_parts = [], []
    for r in ranks:
        a_parts.append(F.pad(a[off:off + r], (0, 0, 0, r_max - r)))  # (r_max, d_in)
        b_parts.append(F.pad(b[:, off:off + r], (0, r_max - r)))  # (d_out, r_max)
        off += r
    return torch.stack(a_parts), torch.stack(b_parts)


def ragged_lowrank(x: Tensor, tokens: Tensor, w: Tensor, offs: Tensor, a: Tensor, b: Tensor,
                   ranks: tuple[int, ...]) -> Tensor:
    """``y[t] = Σ_{p: tokens[p] = t} w[p] · B_e A_e x_t`` ``(T, d_out)`` over the pairs sorted by
    expert (``offs (E,)`` the end of each expert's pairs), expert ``e`` of rank ``ranks[e]``."""
    a_pad, b_pad = pad_ragged(a, b, ranks)
    return grouped_lowrank(x, tokens, w.to(x.dtype), offs, a_pad.to(x.dtype), b_pad.to(x.dtype))
