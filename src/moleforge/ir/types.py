"""The result types of IR nodes: a small closed set of frozen records, one per kind of value a
node yields (``T`` is the symbolic token dimension).

- :class:`TensorType` ``(T, width)``: every node whose value flows into GEMMs;
- :class:`RoutingType`: a flat routing over ``experts`` (gates and probabilities ``(T, E)``, and
  with ``k`` the selected indices ``(T, k)``; ``k = None`` for dense gates, which carry no
  indices);
- :class:`TreeRoutingType`: the routing of a residual tree, per pool (leaves first) its experts
  and its fanout;
- :class:`ScalarType`: an aux loss;
- :class:`PerExpertType`: one ``(T, width)`` tensor per expert, read only through the gates of a
  routing over the same experts.

A node's type is ``node.result_type(graph)``; :meth:`moleforge.ir.Graph.type` caches it per id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["TensorType", "RoutingType", "TreeRoutingType", "ScalarType", "PerExpertType", "ValueType"]


@dataclass(frozen=True, slots=True)
class TensorType:
    """``(T, width)``."""

    width: int

    def __str__(self) -> str:
        return f"tensor (T, {self.width})"


@dataclass(frozen=True, slots=True)
class RoutingType:
    """A flat routing over ``experts``; ``k`` experts selected per token (``None``: dense)."""

    experts: int
    k: int | None = None
    variable: bool = False
    """Whether tokens use different numbers of experts (``k`` the least of them)."""

    @property
    def sparse(self) -> bool:
        return self.k is not None

    def __str__(self) -> str:
        if self.variable:
            return f"routing over {self.experts} experts, {self.k} to {self.experts} per token"
        return f"routing over {self.experts} experts" + (f", top-{self.k}" if self.k is not None else ", dense")


@dataclass(frozen=True, slots=True)
class TreeRoutingType:
    """The routing of a residual tree: ``experts[l]`` and ``fanouts[l]`` of pool l (l = 0 the leaves)."""

    experts: tuple[int, ...]
    fanouts: tuple[int, ...]

    @property
    def pools(self) -> int:
        return len(self.experts)

    def __str__(self) -> str:
        return "tree routing [" + ", ".join(f"{s}/{f}" for s, f in zip(self.experts, self.fanouts)) + "]"


@dataclass(frozen=True, slots=True)
class ScalarType:
    """A scalar (an aux loss)."""

    def __str__(self) -> str:
        return "scalar"


@dataclass(frozen=True, slots=True)
class PerExpertType:
    """``(E, T, width)``: one tensor per expert of a routing over ``experts``."""

    experts: int
    width: int

    def __str__(self) -> str:
        return f"per-expert tensor ({self.experts}, T, {self.width})"


ValueType = Union[TensorType, RoutingType, TreeRoutingType, ScalarType, PerExpertType]
