"""LoRA-Mixer's ``L_preserve`` (``specs/preserve.py``): a scalar aux loss on stored tensors alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kinds import NodeKind
from .params import ParamRef
from .types import ScalarType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Preserve"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Preserve(NodeKind):
    """``weight · Σ_j ‖θ_j − θ_j⁰‖²`` (squared Frobenius norms) over ``pairs = ((θ_1, θ_1⁰), …)``:
    trainable tensors and the buffers that keep their starting values. It reads no node (nor the
    tokens): the same scalar for every forward until an optimizer step moves ``θ``."""

    id: str
    pairs: tuple[tuple[ParamRef, ParamRef], ...]
    weight: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return ScalarType()
