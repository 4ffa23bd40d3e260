"""FFN-block expert node kinds (MixLoRA, METHODS.md §5): routed experts that share the frozen
block. The frozen weights of a block are frozen inputs of the graph (``Graph.frozen``): the IR
references the model's own tensors and never copies them.

Dropout. In training a block node with ``dropout = p > 0`` drops the input of each expert LoRA
it computes, as the ``mixlora`` package does (a ``torch.nn.Dropout`` in every ``LoraLinear``, called
once per expert on that expert's tokens): the LoRA of linear L of expert e reads
``u ⊙ [ν >= p] / (1 - p)`` where ``u`` is L's input (``x`` for gate and up, the expert's hidden state
``h_e`` for down) and ``ν`` is uniform on ``[0, 1)``, drawn anew for every routed slot ``(t, j)``
(token t's j-th expert; for a routing without indices, a dense one, slot j is expert j) and every
linear: ``ν (T, k, width)`` per LoRA, drawn in the order gate, up, down (the linears that carry
LoRAs) from the site's noise generator. The frozen projections and the router read the undropped
values; evaluation drops nothing.

DoRA. An :class:`ExpertLinear` with a ``magnitude`` ``M (E, out)`` computes, as the ``mixlora``
package's ``LoraLinear.apply_dora`` does on every expert LoRA,

    L_i(u) = c_i ⊙ (u Wᵀ + b + s (u' A_iᵀ) B_iᵀ),   c_i = (‖W‖ + M_i) / ‖W + s B_i A_i‖

(``u'`` the LoRA's input, dropped in training; row norms over the input dim, the denominator
without gradient). The stored magnitude is an offset from ``‖W‖`` (moleforge's DoRA convention,
``specs/pool_magnitude.py``), so a fresh expert (``B = 0``, ``M = 0``) has ``c_i = 1``. The bias is
scaled too, as in the package; PEFT's DoRA on a linear site does not scale it."""

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
    magnitude: ParamRef | None = None
    """DoRA (MixLoRA's ``use_dora``, see the module docstring): the offsets ``M (E, out)`` of the
    experts' magnitudes; ``None``: plain LoRA experts. Needs ``a`` and ``b``."""


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
    dropout: float = 0.0
    """MixLoRA's ``lora_dropout`` p (see the module docstring): on the inputs of the experts' LoRAs
    only, in training only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertFFN(_ExpertBlock):
    """Routed FFN-block experts sharing the frozen block (MixLoRA, METHODS.md §5):
    ``h_i = act(G_i(x)) ⊙ U_i(x)`` (gated block) or ``act(U_i(x))`` (``gate=None``),
    ``y = Σ_i g_i(x) · D_i(h_i)``: ``(T, d_in) -> (T, d_out)``; the block's output, not a delta.

    ``gate_base`` / ``up_base`` (optional) name nodes holding the frozen projections
    ``x W_gᵀ + b_g`` / ``x W_uᵀ + b_u``; then ``G_i(x) = gate_base + s (x A_iᵀ) B_iᵀ``.

    With ``dropout`` the LoRAs of gate, up and down read dropped inputs in training
    (the module docstring; the interpreter's ``noise[id]`` holds their ``ν``)."""

    down: ExpertLinear

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.down.weight.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertHidden(_ExpertBlock):
    """The experts' hidden states ``h_i (T, d_ff)`` of an :class:`ExpertFFN` without its down
    projection: a per-expert value, read only through the routing's gates (consumers weight
    ``h_i`` by ``g_i``, so backends may compute it only where ``g_i ≠ 0``). With ``dropout`` the gate
    and up LoRAs read dropped inputs in training (the module docstring); ``h_i`` itself is undropped."""

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
    hidden state, ``A (E, r, d_ff)``, ``B (E, d_out, r)`` -> ``(T, d_out)``. With ``dropout`` it reads
    ``h_i`` dropped per slot in training (the module docstring, one ``ν (T, k, d_ff)``)."""

    id: str
    src: str = operand()
    routing: str = operand()
    a: ParamRef
    b: ParamRef
    scale: float
    origin: str = ""
    dropout: float = 0.0
    """The down LoRA's input dropout p (see the module docstring)."""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.b.shape[1])
