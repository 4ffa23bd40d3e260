"""The closed set of IR node kinds. Every node has a readable ``id``, the ids of the nodes it
reads (its operand fields, declared with :func:`operand`; ``inputs()`` lists them in order), a
result type (``result_type(graph)``, one of :mod:`.types`) and its spec path (``origin``) for
messages. Values: ``T`` tokens; a tensor node yields ``(T, width)``; a router yields a routing
(gates ``(T, E)`` zero outside the active set, router probabilities ``(T, E)``); a tree router
yields a tree routing; an aux-loss node yields a scalar.

Gates and routers carry the facts their consumers ask: ``sparse``, ``k`` (``None`` when dense),
``balances`` (a balancing bias updated from selection counts) and ``input_independent``.

Semantics are given per node as formulas; ``interpret.py`` is their executable form. The jobs
that treat kinds differently keep one rule per kind in a :class:`~moleforge.ir.rules.Rules`
table over :data:`NODE_KINDS` or :data:`GATE_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Union, get_args

from .basics_nodes import CapacityLimit, Dropout, Magnitude, RaggedMix, ZLoss
from .block_nodes import BlockActivation, ExpertFFN, ExpertHidden, ExpertLinear, ExpertLoRA, ExpertSum
from .core_nodes import CoreExperts, CoreMerge
from .dora_nodes import PoolMagnitude
from .gates import (
    GATE_KINDS,
    AbsTopK,
    DenseSoftmax,
    DenseTrainTopK,
    Gate,
    GateKind,
    SelfActivated,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TopPTsallis,
    XLoRAScale,
)
from .kinds import NodeKind, RouterNode, operand
from .kronecker_nodes import KroneckerMix, TaskContrastive, TaskEmbed, TaskScale
from .params import ParamExpr, ParamRef, expr_shape
from .preserve_nodes import Preserve
from .task_nodes import TaskScores
from .types import RoutingType, ScalarType, TensorType, TreeRoutingType, ValueType
from .xlora_nodes import LayerScalings

if TYPE_CHECKING:
    from .graph import Graph

__all__ = [
    "operand", "NodeKind", "RouterNode", "GateKind", "NODE_KINDS", "GATE_KINDS",
    "SoftmaxTopK", "DenseSoftmax", "SigmoidTopK", "AbsTopK", "StaticGate", "TopPTsallis", "SelfActivated",
    "DenseTrainTopK", "Gate",
    "Input", "Linear", "Columns", "Add", "Jitter", "Route", "PoolMix", "GroupedMix",
    "BlockGate", "OuterGate", "TreeGateLevel", "TreeRoute", "TreeLevelParams", "TreeMix",
    "TreePropagate", "TreePathGates", "GateBias", "SiblingLinear", "AuxLoss", "BlockActivation", "ExpertLinear",
    "ExpertFFN", "ExpertHidden", "ExpertSum", "ExpertLoRA", "CoreExperts", "CoreMerge", "Node", "TaskScores",
    "Dropout", "CapacityLimit", "ZLoss", "RaggedMix", "Magnitude", "XLoRAScale", "LayerScalings",
    "KroneckerMix", "TaskEmbed", "TaskScale", "TaskContrastive", "PoolMagnitude", "Preserve",
]

Activation = Literal["tanh", "relu", "identity"]


# ---- tensor nodes -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Input(NodeKind):
    """The site's input ``x``: ``(T, width)``."""

    id: str
    width: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.width)


@dataclass(frozen=True, slots=True, kw_only=True)
class Linear(NodeKind):
    """``y = scale · (src · Wᵀ) + b``; ``W`` is ``[out, in]``: ``(T, in) -> (T, out)``."""

    id: str
    src: str = operand()
    weight: ParamExpr
    bias: ParamExpr | None = None
    scale: float = 1.0
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.weight)[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class Columns(NodeKind):
    """``y = src[:, start:stop]``: a slice of a fused GEMM's output."""

    id: str
    src: str = operand()
    start: int
    stop: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.stop - self.start)


@dataclass(frozen=True, slots=True, kw_only=True)
class Add(NodeKind):
    """``y = Σ srcs`` (equal widths)."""

    id: str
    srcs: tuple[str, ...] = operand()
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.srcs[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class Jitter(NodeKind):
    """Training-time multiplicative noise ``src · (1 - ε + 2ε·u)``, ``u (T, width)`` uniform on
    ``[0, 1)`` from torch's global generator (which activation checkpointing replays in
    recomputation); identity in evaluation."""

    id: str
    src: str = operand()
    eps: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.src)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route(RouterNode):
    """A flat router: scores ``src (T, E)`` -> routing (gates, probabilities)."""

    id: str
    src: str = operand()
    gate: Gate
    experts: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return RoutingType(self.experts, self.gate.k, self.gate.variable)

    @property
    def k(self) -> int | None:
        return self.gate.k

    @property
    def sparse(self) -> bool:
        return self.gate.sparse

    @property
    def balances(self) -> bool:
        return self.gate.balances

    @property
    def input_independent(self) -> bool:
        return self.gate.input_independent


@dataclass(frozen=True, slots=True, kw_only=True)
class _LowRankMix(NodeKind):
    """The fields of :class:`PoolMix` and :class:`GroupedMix` (two ways to compute one value)."""

    id: str
    src: str = operand()
    routing: str = operand()
    a: ParamExpr
    b: ParamExpr
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.b)[1])


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolMix(_LowRankMix):
    """``y = Σ_i g_i · scale · (x A_iᵀ) B_iᵀ`` with ``A: (E_a, r, d_in)``, ``B: (E_b, d_out, r)``;
    ``E_a = 1`` (or ``E_b = 1``) means the factor is shared by all E experts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupedMix(_LowRankMix):
    """Same value as :class:`PoolMix`, computed only for each token's selected experts
    (gather / grouped GEMM); for sparse top-k routing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockGate(NodeKind):
    """``y = h ⊙ repeat(scale · g, rank)``: ``h (T, E·r)`` gated block by block (SMoRA identity)."""

    id: str
    src: str = operand()
    routing: str = operand()
    rank: int
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return graph.type(self.src)


@dataclass(frozen=True, slots=True, kw_only=True)
class OuterGate(NodeKind):
    """``y = scale · (g ⊗ h)`` flattened: ``h (T, r)``, ``g (T, E)`` -> ``(T, E·r)`` (HydraLoRA)."""

    id: str
    src: str = operand()
    routing: str = operand()
    scale: float
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(graph.width(self.src) * graph.routing(self.routing).experts)


# ---- S'MoRE residual trees --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TreeGateLevel:
    """Router parameters of one pool: keys ``(s, g)``, query MLP ``w1 (g, in_l)``, ``b1``,
    ``w2 (g, g)``, ``b2``; ``noise (s, in_l)`` for the noisy gate (training only)."""

    experts: int
    fanout: int
    keys: ParamRef
    w1: ParamRef
    b1: ParamRef
    w2: ParamRef
    b2: ParamRef
    noise: ParamRef | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeRoute(RouterNode):
    """Top-down routing of a residual tree from ``src = x_down (T, m)``.

    Pool l (``levels[l]``, l = 0 the leaves) routes every context (a path of chosen
    positions from the top; context ``c`` of pool l+1 with position ``p`` is context
    ``c·f_{l+1} + p`` of pool l) with ``q = w2·act(w1·z + b1) + b2``, ``z = [x_down, keys of
    the ancestors, top first]`` (noisy_topk: L2-normalised keys); logits ``q·k_i``, or for
    ``noisy_topk`` the cosine ``q̂·k̂_i``, divided by τ. Gates (``official``: see ResidualTree):

    - switch: ``p = softmax(logits)``; the top-f of p; ``w = p_top / Σ p_top`` (official,
      f = 1: ``w = p_top``);
    - dense: every expert in index order, ``w = softmax(logits)``;
    - noisy_topk: the top-f logits; ``w = softmax(top)`` (official, f = 1: the logit). In
      training, first ``logits += ε ⊙ (softplus(noise·z) + 0.01)`` with ``ε (T, C_l, s_l)``
      standard normal, drawn pool by pool from the top from the site's noise generator.

    Yields per pool indices and weights ``(T, C_l, f_l)`` and probabilities
    ``softmax(logits) (T, C_l, s_l)``, ``C_l = Π_{j>l} f_j``."""

    id: str
    src: str = operand()
    levels: tuple[TreeGateLevel, ...]
    gate: Literal["switch", "dense", "noisy_topk"]
    conventions: Literal["paper", "official"]
    query_activation: Activation
    temperature: float
    origin: str = ""

    balances: ClassVar[bool] = False
    input_independent: ClassVar[bool] = False

    def result_type(self, graph: "Graph") -> ValueType:
        return TreeRoutingType(tuple(lv.experts for lv in self.levels), tuple(lv.fanout for lv in self.levels))

    @property
    def sparse(self) -> bool:
        """Every gate but ``dense`` keeps its top-f experts per context."""
        return self.gate != "dense"


@dataclass(frozen=True, slots=True)
class TreeLevelParams:
    """Expert parameters of pool l: ``a (s, r, d_in)``, ``a_bias (s, r)``, ``b (s, d_{l+1}, r)``,
    ``b_bias (s, d_{l+1})``, transform ``w (d_{l+1}, d_l)`` and ``w_bias`` (none at l = 0),
    and the level scale ``c_l``."""

    a: ParamRef
    b: ParamRef
    scale: float
    a_bias: ParamRef | None = None
    b_bias: ParamRef | None = None
    w: ParamRef | None = None
    w_bias: ParamRef | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _TreeLevels(NodeKind):
    """The fields of :class:`TreeMix` and :class:`TreePropagate`."""

    id: str
    src: str = operand()
    routing: str = operand()
    levels: tuple[TreeLevelParams, ...]
    activation: Activation
    position: Literal["all", "child", "child_v2"] = "all"
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.levels[-1].b.shape[1])


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeMix(_TreeLevels):
    """Bottom-up propagation of a residual tree (METHODS.md §1.3):
    ``u_{l,n} = c_l (B_{l,n}(A_{l,n} x + a) + b)``; with ``position = "all"`` a leaf node is
    ``Σ_p w_p σ(u_{0,e_p})`` and a node of level l+1 is ``Σ_p w_p σ(u_{l,e_p} + W_l h_child(p) + w_l)``;
    ``"child"``: ``Σ_p (w_p u_{l,e_p} + W_l σ(h_child(p)) + w_l)``; ``"child_v2"``:
    ``Σ_p w_p (u_{l,e_p} + W_l σ(h_child(p)) + w_l)`` (both: leaves ``Σ_p w_p u_{0,e_p}``).
    Yields the root hidden ``(T, d_L)``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TreePropagate(_TreeLevels):
    """:class:`TreeMix` after its down-projections were computed for all experts at once:
    ``src (T, Σ_l s_l r_l)`` holds ``A_{l,n} x + a_{l,n}`` for every pool and expert
    (pool-major, expert-major); the level params' ``a``/``a_bias`` are not read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TreePathGates(NodeKind):
    """The path-aggregated gates of pool ``level`` of a tree routing, as a flat routing:
    ``ĝ_e = Σ_{tree nodes of expert e in pool l} Π (weights on the path from the root)``,
    ``(T, s_l)``. With an identity activation the tree is a flat pool under these gates
    (METHODS.md §20.6)."""

    id: str
    routing: str = operand()
    level: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return RoutingType(graph.tree_routing(self.routing).experts[self.level])


@dataclass(frozen=True, slots=True, kw_only=True)
class GateBias(NodeKind):
    """A gated bias: ``y = scale · Σ_e g_e · bias_e`` = ``scale · g @ bias`` for a per-expert
    ``bias (E, d)``; a shared ``bias (d,)`` gives ``scale · (Σ_e g_e) · bias``. ``(T, d)``."""

    id: str
    routing: str = operand()
    bias: ParamExpr
    scale: float = 1.0
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.bias)[-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class SiblingLinear(NodeKind):
    """The value of :class:`Linear` (``y = src · Wᵀ + b``), computed as columns ``[start:stop]``
    of one GEMM shared by the sibling sites of ``group`` that read the same tensor:
    ``src · [W_1; …; W_n]ᵀ``. Lowered without its group it is a plain linear."""

    id: str
    src: str = operand()
    weight: ParamExpr
    bias: ParamExpr | None = None
    group: str
    start: int
    stop: int
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(expr_shape(self.weight)[0])


# ---- aux losses ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class AuxLoss(NodeKind):
    """A weighted scalar loss on a routing (see ``specs.routing`` for each kind's formula).
    Over a tree routing it is summed over pools."""

    id: str
    routing: str = operand()
    kind: Literal["switch_lb", "cv2_importance_load", "localized_balance", "tsallis_entropy", "soft_lb", "task_routing",
                  "rsl"]
    weight: float
    delta: float = 0.0
    groups: int = 1
    q: float = 1.0
    """The Tsallis index of ``tsallis_entropy``."""
    origin: str = ""
    temperature: float = 1.0
    """``task_routing``: the cross-entropy's temperature (``log p / τ`` are its logits)."""
    entropy: float = 0.0
    """``rsl``: λ of its ``- λ · mean_t H(p_t)`` term."""
    top_k: int = 1
    """``rsl``: the k of its top-k load shares."""

    def result_type(self, graph: "Graph") -> ValueType:
        return ScalarType()


Node = Union[Input, Linear, Columns, Add, Jitter, Route, PoolMix, GroupedMix, BlockGate, OuterGate,
             TreeRoute, TreeMix, TreePropagate, TreePathGates, GateBias, SiblingLinear, AuxLoss, ExpertFFN,
             ExpertHidden, ExpertSum, ExpertLoRA, CoreExperts, CoreMerge, TaskScores, Dropout, CapacityLimit, ZLoss,
             RaggedMix, Magnitude, LayerScalings, KroneckerMix, TaskEmbed, TaskScale, TaskContrastive,
             PoolMagnitude, Preserve]

NODE_KINDS: tuple[type, ...] = get_args(Node)
"""Every node kind."""
