"""Compute the frozen gate and up projections of an FFN block once for all experts.

Identity (MixLoRA's own optimisation, METHODS.md §20.10a): every expert of an
:class:`~moleforge.ir.ExpertFFN` (or :class:`~moleforge.ir.ExpertHidden`) applies the same
frozen ``x W_gᵀ + b_g`` and ``x W_uᵀ + b_u`` to the same input, so

    G_i(x) = x W_gᵀ + b_g + s (x A_iᵀ) B_iᵀ = P_g + s (x A_iᵀ) B_iᵀ,   P_g = x W_gᵀ + b_g,

with ``P_g`` (and ``P_u``) computed once by a frozen :class:`~moleforge.ir.Linear`. Exact for
every routing; no precondition. Each expert then adds only its low-rank delta. With DoRA (a
``magnitude`` on the linear) expert i computes ``c_i ⊙ (P_g + s (x A_iᵀ) B_iᵀ)``: ``c_i`` reads the
weights alone, so the shared ``P_g`` is still exact.

Post: the block node reads ``gate_base`` / ``up_base``. Idempotent: a node that already reads
them is kept as it is.
"""

from __future__ import annotations

from dataclasses import replace

from ..ir import ExpertFFN, ExpertHidden, ExpertLinear, Graph, Linear
from ._rewrite import Ids

__all__ = ["share_frozen_projections"]


def _frozen_linear(ids: Ids, n, role: str, lin: ExpertLinear) -> Linear:
    return Linear(id=ids.new(f"{n.id}_{role}_base"), src=n.src, weight=lin.weight, bias=lin.bias,
                  origin=f"{n.origin}.{role}.frozen")


def share_frozen_projections(graph: Graph) -> Graph:
    """Give every block node precomputed frozen gate/up projections (see the module docstring)."""
    ids = Ids(graph)
    nodes: list = []
    changed = False
    for n in graph.nodes:
        if isinstance(n, (ExpertFFN, ExpertHidden)):
            bases = {}
            if n.gate is not None and n.gate_base is None:
                lin = _frozen_linear(ids, n, "gate", n.gate)
                nodes.append(lin)
                bases["gate_base"] = lin.id
            if n.up_base is None:
                lin = _frozen_linear(ids, n, "up", n.up)
                nodes.append(lin)
                bases["up_base"] = lin.id
            if bases:
                n = replace(n, **bases)
                changed = True
        nodes.append(n)
    return graph.replace(nodes=tuple(nodes)) if changed else graph
