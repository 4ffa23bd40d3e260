"""CoMoL's core-space expert kinds (METHODS.md §9, §20.4): experts that share A and B and
differ by an r × r core. ``h = A x`` is the token in the core space (``(T, r)``); ``cores`` is
``(E, r, r)``, ``M_i`` stored ``[out, in]``; ``g`` the routing's gates ``(T, E)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kinds import NodeKind, operand
from .params import ParamExpr, expr_shape
from .types import TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["CoreExperts", "CoreMerge"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreExperts(NodeKind):
    """The mixture of full experts: ``y = Σ_i g_i · scale · B (M_i h)``, expert i the up-projection
    ``B M_i`` ``(d_out, r)`` of the shared ``h``: ``(T, r) -> (T, d_out)``."""

    id: str
    src: str = operand()
    routing: str = operand()
    cores: ParamExpr
    b: ParamExpr
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.b)[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreMerge(NodeKind):
    """The soft-merged core per token: ``y = (Σ_i g_i M_i) h = Σ_i g_i (M_i h)``: ``(T, r) -> (T, r)``."""

    id: str
    src: str = operand()
    routing: str = operand()
    cores: ParamExpr
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.cores)[1])
