"""The runtime values of routers, shared by the reference interpreter and the ops that lowered
code calls (``backends/runtime``): plain named tuples, so that ``torch.fx`` and
``torch.compile`` trace them and lowered code reads their fields by position at the cost of a
tuple.

Shapes: ``T`` tokens, ``E`` experts; pool l of a tree routes ``C_l = Π_{j>l} f_j`` contexts per
token, each picking ``f_l`` of its ``s_l`` experts (context ``c`` with position ``p`` becomes
context ``c·f_l + p`` of pool l-1).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["Routing", "TreeRouting"]


class Routing(NamedTuple):
    """A flat routing (the value of a :class:`~moleforge.ir.nodes.Route` or
    :class:`~moleforge.ir.nodes.TreePathGates`)."""

    gates: Tensor
    """``(T, E)``, zero outside each token's active experts."""
    probs: Tensor
    """``(T, E)``: the router probabilities (for aux losses and statistics)."""
    index: Optional[Tensor] = None
    """``(T, k)``: the selected experts of a top-k gate; ``None`` for a dense one."""
    dropped: Optional[Tensor] = None
    """``(T, k)`` bool: the selected slots over their expert's capacity (gate 0), of a
    :class:`~moleforge.ir.nodes.CapacityLimit`; ``None`` otherwise."""


class TreeRouting(NamedTuple):
    """The routing of a residual tree (the value of a :class:`~moleforge.ir.nodes.TreeRoute`):
    tuples over pools, l = 0 the leaves."""

    indices: tuple
    """Per pool ``(T, C_l, f_l)``: the selected experts of every context."""
    weights: tuple
    """Per pool ``(T, C_l, f_l)``: their weights."""
    probs: tuple
    """Per pool ``(T, C_l, s_l)``: the probabilities over the pool's experts."""
    gate: str = "switch"
    """The tree's gate (``switch``, ``dense``, ``noisy_topk``)."""
    smooth_load: tuple = ()
    """Per pool, the training-mode smooth load of the noisy gate per routed context,
    ``(s_l, T·C_l)`` (summed over contexts by the tree aux losses), or ``None``; ``()``: none."""
