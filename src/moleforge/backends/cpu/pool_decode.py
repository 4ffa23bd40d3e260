"""A routed LoRA pool's decode step in the compiled CPU kernel (``pool_decode.cpp``, op
``moleforge_cpu::pool_decode``): the router, its gate and each token's selected experts in one
call, reading the selected experts' factors only. No autograd: the decode form of a generated
module (``runtime/ops_decode.PoolDecode``) calls it without gradients and outside
``torch.compile``, where the kernel policy chooses it (``KernelPolicy.decode_kernel``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GATE_CODES", "run"]

GATE_CODES = {"softmax_topk": 0, "dense_softmax": 1}
"""The kernel's codes for the gates it takes."""


def run(x: Tensor, router_w: Tensor, a: Tensor, bt: Tensor, acc: Tensor | None, gate: str, k: int,
        renormalize: bool, temperature: float, scale: float) -> Tensor:
    """``acc + Σ_kept scale·g_e B_e A_e x`` per token (``(T, d_out)``; ``acc`` may be ``None``), with
    ``a (E|1, r, d_in)`` and ``B`` transposed, ``bt (E|1, r, d_out)``."""
    return torch.ops.moleforge_cpu.pool_decode(x, router_w, a, bt, acc, GATE_CODES[gate], k, renormalize,
                                               float(temperature), float(scale))
