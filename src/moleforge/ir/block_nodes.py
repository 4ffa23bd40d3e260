"""FFN-block expert node kinds (MixLoRA, METHODS.md §5): routed experts that share the frozen
block. The frozen weights of a block are frozen inputs of the graph (``Graph.frozen``): the IR
references the model's own tensors and never copies them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .kinds import NodeKind, operand
from .params import ParamRef
from .types import PerExpertType, TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["BlockActivation", "ExpertLinear", "ExpertFFN", "ExpertHidden", "ExpertSum", "ExpertLoRA"]

BlockActivation = Literal["silu", "gelu", "gelu_tanh", "relu", "quick_gelu"]
"""Activations of FFN blocks: ``silu(v) = v·σ(v)``, ``gelu`` (erf form), ``gelu_tanh`` (the tanh
approximation, GPT-2's ``gelu_new``), ``relu``, ``quick_gelu(v) = v·σ(1.702 v)``."""



@dataclass(frozen=True, slots=True)
class ExpertLinear:
    """One linear of an FFN block with a LoRA per expert: expert i computes
    ``L_i(u) = u Wᵀ + b + scale · (u A_iᵀ) B_iᵀ``. ``W [out, in]`` and ``b`` are frozen
    inputs; ``A (E, r, in)`` and ``B (E, out, r)`` the experts' factors, ``None`` when this
    linear carries no adapter (then ``L_i(u) = u Wᵀ + b``)."""

    weight: ParamRef
    bias: ParamRef | None = None
    a: ParamRef | None = None
    b: ParamRef | None = None
    scale: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _ExpertBlock(NodeKind):
    """The fields of :class:`ExpertFFN` and :class:`ExpertHidden`: the routed experts' gate and
    up projections over the shared frozen block, and where the frozen projections come from."""

    id: str
    src: str = operand()
    routing: str = operand()
    up: ExpertLinear
    gate: ExpertLinear | None = None
    activation: BlockActivation = "silu"
    gate_base: str | None = operand(default=None)
    up_base: str | None = operand(default=None)
    origin: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertFFN(_ExpertBlock):
    """Routed FFN-block experts sharing the frozen block (MixLoRA, METHODS.md §5):
    ``h_i = act(G_i(x)) ⊙ U_i(x)`` (gated block) or ``act(U_i(x))`` (``gate=None``),
    ``y = Σ_i g_i(x) · D_i(h_i)``: ``(T, d_in) -> (T, d_out)``; the block's output, not a delta.

    ``gate_base`` / ``up_base`` (optional) name nodes holding the frozen projections
    ``x W_gᵀ + b_g`` / ``x W_uᵀ + b_u``; then ``G_i(x) = gate_base + s (x A_iᵀ) B_iᵀ``."""

    down: ExpertLinear

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.down.weight.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertHidden(_ExpertBlock):
    """The experts' hidden states ``h_i (T, d_ff)`` of an :class:`ExpertFFN` without its down
    projection: a per-expert value, read only through the routing's gates (consumers weight
    ``h_i`` by ``g_i``, so backends may compute it only where ``g_i ≠ 0``)."""

    def result_type(self, graph: "Graph") -> ValueType:
        return PerExpertType(graph.routing(self.routing).experts, self.up.weight.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertSum(NodeKind):
    """``y = Σ_i g_i h_i``: ``h`` an :class:`ExpertHidden` over the same routing -> ``(T, d_ff)``."""

    id: str
    src: str = operand()
    routing: str = operand()
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(graph.per_expert(self.src).width)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertLoRA(NodeKind):
    """``y = Σ_i g_i · scale · (h_i A_iᵀ) B_iᵀ``: each expert's low-rank update of its own
    hidden state, ``A (E, r, d_ff)``, ``B (E, d_out, r)`` -> ``(T, d_out)``."""

    id: str
    src: str = operand()
    routing: str = operand()
    a: ParamRef
    b: ParamRef
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.b.shape[1])
