"""A residual tree's routing and propagation for the few tokens of a decoding step, in the
compiled CPU kernel (``tree_decode.cpp``, ops ``moleforge_cpu::tree_route`` and
``moleforge_cpu::tree_propagate``): two calls per site instead of some hundred small torch
kernels. No autograd: the runtime ops (``ops_tree_route.route_switch_dense``,
``ops_tree_prop.propagate_all``) call them only without gradients and outside ``torch.compile``,
where the kernel policy chooses them (``KernelPolicy.decode_kernel``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACTIVATION_CODES", "route", "propagate"]

ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2}
"""The kernel's codes for the tree's activations and query activations."""


def route(xd: Tensor, tables: tuple, fanouts: tuple[int, ...], gate: str, official: bool, query_activation: str,
          temperature: float) -> list[Tensor]:
    """Indices, then weights, then probabilities per pool (as ``ops_tree_route._route``), from the
    weight ``tables`` of ``ops_tree_route._tables``."""
    w_tok, b_tok, ancestors, kw2, kb2 = tables
    flat = [t for per_pool in ancestors for t in per_pool]
    return torch.ops.moleforge_cpu.tree_route(xd, w_tok, b_tok, kw2, kb2, flat, list(fanouts), gate == "dense",
                                              official, ACTIVATION_CODES[query_activation], float(temperature))


def propagate(h_all: Tensor, indices: tuple, weights: tuple, levels: list, activation: str) -> Tensor:
    """The root hidden ``(T, d_L)`` of the ``all``-position propagation (as
    ``ops_tree_prop._propagate_forward``); ``levels`` per pool ``(B, b, W, w, scale)``."""
    empty = h_all.new_empty(0)
    return torch.ops.moleforge_cpu.tree_propagate(
        h_all, list(indices), list(weights), [lv[0] for lv in levels],
        [empty if lv[1] is None else lv[1] for lv in levels], [empty if lv[2] is None else lv[2] for lv in levels],
        [empty if lv[3] is None else lv[3] for lv in levels], [float(lv[4]) for lv in levels],
        ACTIVATION_CODES[activation])
