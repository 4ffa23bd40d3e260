"""X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148): a model-scope router. A first pass of the
base model, a classifier on its last hidden state, and per adapted linear (a "layer" of PEFT's
classifier) one scaling per token and expert. The site reads its layer's scalings as an input of
the graph, given per call (:class:`LayerScalings`); its gate (:class:`~moleforge.ir.gates.XLoRAScale`)
applies PEFT's per-layer top-k, its softmax over the kept scalings and the global weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kinds import NodeKind, operand
from .types import TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["LayerScalings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerScalings(NodeKind):
    """``s (T, E)``: this site's X-LoRA scalings, an input of the graph for the call (the
    model-scope classifier's output at the site's layer, after its softmax); ``src`` is the site
    input, read for ``T`` only."""

    id: str
    src: str = operand()
    experts: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.experts)
