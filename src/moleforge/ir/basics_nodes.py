"""Node kinds of the options every LoRA user expects: input dropout, expert capacity, the router
z-loss, and pools whose experts have different ranks (FlexMoRE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kinds import NodeKind, RouterNode, operand
from .params import ParamRef
from .types import ScalarType, TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Dropout", "CapacityLimit", "ZLoss", "RaggedMix", "Magnitude"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropout(NodeKind):
    """PEFT's ``lora_dropout``: in training ``src ⊙ [u >= p] / (1 - p)``, ``u (T, width)`` uniform
    on ``[0, 1)`` drawn as :class:`Jitter` draws (the site's noise generator, else torch's);
    identity in evaluation."""

    id: str
    src: str = operand()
    p: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.src)


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityLimit(RouterNode):
    """Expert capacity of a top-k ``routing``: every expert keeps at most
    ``C = ceil(factor · T · k / E)`` of its slots, taken slot by slot (every token's first choice,
    then every token's second, ...) and within a slot in token order; a dropped slot keeps its
    index and gets gate 0 (the token passes the expert by). Yields the routing with ``dropped
    (T, k)`` set."""

    id: str
    routing: str = operand()
    factor: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.routing(self.routing)

    @property
    def sparse(self) -> bool:
        return True

    @property
    def balances(self) -> bool:
        return False

    @property
    def input_independent(self) -> bool:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class ZLoss(NodeKind):
    """ST-MoE's router z-loss on the logits ``src (T, E)``: ``weight · mean_t (logsumexp_i z_ti)²``."""

    id: str
    src: str = operand()
    weight: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return ScalarType()


@dataclass(frozen=True, slots=True, kw_only=True)
class RaggedMix(NodeKind):
    """A pool whose experts have their own ranks (FlexMoRE):
    ``y = Σ_i g_i · s_i · (x A_iᵀ) B_iᵀ`` with the experts' factors concatenated,
    ``a (Σ r_i, d_in)`` (expert i: rows ``o_i : o_i + r_i``, ``o_i = Σ_{j<i} r_j``) and
    ``b (d_out, Σ r_i)`` (the same columns). Computed as two GEMMs of rank ``Σ r_i`` with the gates
    repeated over each expert's ranks; ``grouped`` (a top-k routing): for the selected experts only,
    one pair of GEMMs of its own rank per expert (``choose_pool_kernels`` picks the form)."""

    id: str
    src: str = operand()
    routing: str = operand()
    a: ParamRef
    b: ParamRef
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    grouped: bool = False
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.b.shape[0])

    def offsets(self) -> tuple[int, ...]:
        """``o_i``: where each expert's rows of ``a`` start (and ``Σ r_i`` last)."""
        out = [0]
        for r in self.ranks:
            out.append(out[-1] + r)
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class _DoRAFields(NodeKind):
    """The fields of :class:`Magnitude` and of DoRA pool experts (``dora_nodes.PoolMagnitude``): the
    frozen ``weight`` ``W (d_out, d_in)`` (a frozen input of the graph), the factors ``a``, ``b``, their
    ``scale`` and the ``magnitude`` vector(s); the result has ``W``'s ``d_out`` columns."""

    id: str
    src: str = operand()
    weight: ParamRef
    a: ParamRef
    b: ParamRef
    scale: float
    magnitude: ParamRef
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.weight.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class Magnitude(_DoRAFields):
    """DoRA (Liu et al. 2024): the adapted layer is ``x W'ᵀ`` with ``W' = m ⊙ V / ‖V‖``, ``V = W +
    s·B A`` and ``‖V‖ (d_out,)`` its row norms over ``d_in``. With ``lora = s (x Aᵀ) Bᵀ`` of ``src =
    x`` (the dropped input in training, as PEFT) the node yields the change of the frozen layer's output,
    ``Δy = (c - 1) ⊙ (x Wᵀ) + c ⊙ lora``, ``c = m / ‖V‖``, ``m = ‖W‖ + magnitude`` (the vector starts at
    0, so ``m`` starts at the frozen row norms). As in PEFT, ``‖V‖`` passes no gradient.
    ``weight`` is the frozen ``W (d_out, d_in)`` (a frozen input of the graph)."""

    lora: str = operand()
