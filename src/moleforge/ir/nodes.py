"""The closed set of IR node kinds. Every node has a readable ``id``, the ids of the
nodes it reads (``inputs()``, in order) and its spec path (``origin``) for messages.
Values: ``T`` tokens; a tensor node yields ``(T, width)``; a router yields a routing
(gates ``(T, E)`` zero outside the active set, router probabilities ``(T, E)``); a tree
router yields a tree routing; an aux-loss node yields a scalar.

Semantics are given per node as formulas; ``interpret.py`` is their executable form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .params import ParamExpr, ParamRef

__all__ = [
    "SoftmaxTopK", "DenseSoftmax", "SigmoidTopK", "AbsTopK", "StaticGate", "Gate",
    "Input", "Linear", "Columns", "Add", "Jitter", "Route", "PoolMix", "GroupedMix",
    "BlockGate", "OuterGate", "TreeGateLevel", "TreeRoute", "TreeLevelParams", "TreeMix",
    "TreePropagate", "TreePathGates", "GateBias", "SiblingLinear", "AuxLoss", "BlockActivation", "ExpertLinear",
    "ExpertFFN", "ExpertHidden", "ExpertSum", "ExpertLoRA", "Node", "TENSOR_NODES", "ROUTING_NODES",
]

Activation = Literal["tanh", "relu", "identity"]

BlockActivation = Literal["silu", "gelu", "gelu_tanh", "relu", "quick_gelu"]
"""Activations of FFN blocks: ``silu(v) = v·σ(v)``, ``gelu`` (erf form), ``gelu_tanh`` (the tanh
approximation, GPT-2's ``gelu_new``), ``relu``, ``quick_gelu(v) = v·σ(1.702 v)``."""


# ---- gates: how a router turns scores into gate values -------------------------------

@dataclass(frozen=True, slots=True)
class SoftmaxTopK:
    """``p = softmax(z/τ)``; keep the k largest p; renormalise them to sum 1 if asked."""

    k: int
    renormalize: bool = True
    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class DenseSoftmax:
    """``g = p = softmax(z/τ)``."""

    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class SigmoidTopK:
    """SMoRA: ``u = σ(z) + b``; keep top-k of u; ``g = k · u_kept / Σ u_kept``."""

    k: int
    balance: ParamRef


@dataclass(frozen=True, slots=True)
class AbsTopK:
    """FlyLoRA: binary mask of the k largest ``|z + d|``; ``g ∈ {0, 1}``."""

    k: int
    balance: ParamRef


@dataclass(frozen=True, slots=True)
class StaticGate:
    """Input-independent gates: ``g_t = w`` for every token t, ``w (E,)`` a stored tensor; the
    router's scores are not read (its ``src`` only gives the token count). Router probabilities
    (for statistics) are ``|w| / Σ|w|``."""

    weights: ParamRef


Gate = Union[SoftmaxTopK, DenseSoftmax, SigmoidTopK, AbsTopK, StaticGate]


# ---- tensor nodes -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    """The site's input ``x``: ``(T, width)``."""

    id: str
    width: int
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Linear:
    """``y = scale · (src · Wᵀ) + b``; ``W`` is ``[out, in]``: ``(T, in) -> (T, out)``."""

    id: str
    src: str
    weight: ParamExpr
    bias: ParamExpr | None = None
    scale: float = 1.0
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Columns:
    """``y = src[:, start:stop]``: a slice of a fused GEMM's output."""

    id: str
    src: str
    start: int
    stop: int
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Add:
    """``y = Σ srcs`` (equal widths)."""

    id: str
    srcs: tuple[str, ...]
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return self.srcs


@dataclass(frozen=True, slots=True, kw_only=True)
class Jitter:
    """Training-time multiplicative noise ``src · U(1-ε, 1+ε)``; identity in evaluation."""

    id: str
    src: str
    eps: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """A flat router: scores ``src (T, E)`` -> routing (gates, probabilities)."""

    id: str
    src: str
    gate: Gate
    experts: int
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolMix:
    """``y = Σ_i g_i · scale · (x A_iᵀ) B_iᵀ`` with ``A: (E_a, r, d_in)``, ``B: (E_b, d_out, r)``;
    ``E_a = 1`` (or ``E_b = 1``) means the factor is shared by all E experts."""

    id: str
    src: str
    routing: str
    a: ParamExpr
    b: ParamExpr
    scale: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupedMix:
    """Same value as :class:`PoolMix`, computed only for each token's selected experts
    (gather / grouped GEMM); for sparse top-k routing."""

    id: str
    src: str
    routing: str
    a: ParamExpr
    b: ParamExpr
    scale: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockGate:
    """``y = h ⊙ repeat(scale · g, rank)``: ``h (T, E·r)`` gated block by block (SMoRA identity)."""

    id: str
    src: str
    routing: str
    rank: int
    scale: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class OuterGate:
    """``y = scale · (g ⊗ h)`` flattened: ``h (T, r)``, ``g (T, E)`` -> ``(T, E·r)`` (HydraLoRA)."""

    id: str
    src: str
    routing: str
    scale: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


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
class TreeRoute:
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
    src: str
    levels: tuple[TreeGateLevel, ...]
    gate: Literal["switch", "dense", "noisy_topk"]
    conventions: Literal["paper", "official"]
    query_activation: Activation
    temperature: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


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
class TreeMix:
    """Bottom-up propagation of a residual tree (METHODS.md §1.3):
    ``u_{l,n} = c_l (B_{l,n}(A_{l,n} x + a) + b)``; with ``position = "all"`` a leaf node is
    ``Σ_p w_p σ(u_{0,e_p})`` and a node of level l+1 is ``Σ_p w_p σ(u_{l,e_p} + W_l h_child(p) + w_l)``;
    ``"child"``: ``Σ_p (w_p u_{l,e_p} + W_l σ(h_child(p)) + w_l)``; ``"child_v2"``:
    ``Σ_p w_p (u_{l,e_p} + W_l σ(h_child(p)) + w_l)`` (both: leaves ``Σ_p w_p u_{0,e_p}``).
    Yields the root hidden ``(T, d_L)``."""

    id: str
    src: str
    routing: str
    levels: tuple[TreeLevelParams, ...]
    activation: Activation
    position: Literal["all", "child", "child_v2"] = "all"
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class TreePropagate:
    """:class:`TreeMix` after its down-projections were computed for all experts at once:
    ``src (T, Σ_l s_l r_l)`` holds ``A_{l,n} x + a_{l,n}`` for every pool and expert
    (pool-major, expert-major); the level params' ``a``/``a_bias`` are not read."""

    id: str
    src: str
    routing: str
    levels: tuple[TreeLevelParams, ...]
    activation: Activation
    position: Literal["all", "child", "child_v2"] = "all"
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class TreePathGates:
    """The path-aggregated gates of pool ``level`` of a tree routing, as a flat routing:
    ``ĝ_e = Σ_{tree nodes of expert e in pool l} Π (weights on the path from the root)``,
    ``(T, s_l)``. With an identity activation the tree is a flat pool under these gates
    (METHODS.md §20.6)."""

    id: str
    routing: str
    level: int
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.routing,)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateBias:
    """A gated bias: ``y = scale · Σ_e g_e · bias_e`` = ``scale · g @ bias`` for a per-expert
    ``bias (E, d)``; a shared ``bias (d,)`` gives ``scale · (Σ_e g_e) · bias``. ``(T, d)``."""

    id: str
    routing: str
    bias: ParamExpr
    scale: float = 1.0
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.routing,)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiblingLinear:
    """The value of :class:`Linear` (``y = src · Wᵀ + b``), computed as columns ``[start:stop]``
    of one GEMM shared by the sibling sites of ``group`` that read the same tensor:
    ``src · [W_1; …; W_n]ᵀ``. Lowered without its group it is a plain linear."""

    id: str
    src: str
    weight: ParamExpr
    bias: ParamExpr | None = None
    group: str
    start: int
    stop: int
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src,)


# ---- aux losses ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class AuxLoss:
    """A weighted scalar loss on a routing (see ``specs.routing`` for each kind's formula).
    Over a tree routing it is summed over pools."""

    id: str
    routing: str
    kind: Literal["switch_lb", "cv2_importance_load", "localized_balance"]
    weight: float
    delta: float = 0.0
    groups: int = 1
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.routing,)


# ---- FFN-block experts (MixLoRA) -------------------------------------------------------
# The frozen weights of a block are frozen inputs of the graph (``Graph.frozen``): the IR
# references the model's own tensors and never copies them.

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
class ExpertFFN:
    """Routed FFN-block experts sharing the frozen block (MixLoRA, METHODS.md §5):
    ``h_i = act(G_i(x)) ⊙ U_i(x)`` (gated block) or ``act(U_i(x))`` (``gate=None``),
    ``y = Σ_i g_i(x) · D_i(h_i)``: ``(T, d_in) -> (T, d_out)``; the block's output, not a delta.

    ``gate_base`` / ``up_base`` (optional) name nodes holding the frozen projections
    ``x W_gᵀ + b_g`` / ``x W_uᵀ + b_u``; then ``G_i(x) = gate_base + s (x A_iᵀ) B_iᵀ``."""

    id: str
    src: str
    routing: str
    up: ExpertLinear
    down: ExpertLinear
    gate: ExpertLinear | None = None
    activation: BlockActivation = "silu"
    gate_base: str | None = None
    up_base: str | None = None
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing) + tuple(b for b in (self.gate_base, self.up_base) if b is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertHidden:
    """The experts' hidden states ``h_i (T, d_ff)`` of an :class:`ExpertFFN` without its down
    projection: a per-expert value, read only through the routing's gates (consumers weight
    ``h_i`` by ``g_i``, so backends may compute it only where ``g_i ≠ 0``)."""

    id: str
    src: str
    routing: str
    up: ExpertLinear
    gate: ExpertLinear | None = None
    activation: BlockActivation = "silu"
    gate_base: str | None = None
    up_base: str | None = None
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing) + tuple(b for b in (self.gate_base, self.up_base) if b is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertSum:
    """``y = Σ_i g_i h_i``: ``h`` an :class:`ExpertHidden` over the same routing -> ``(T, d_ff)``."""

    id: str
    src: str
    routing: str
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpertLoRA:
    """``y = Σ_i g_i · scale · (h_i A_iᵀ) B_iᵀ``: each expert's low-rank update of its own
    hidden state, ``A (E, r, d_ff)``, ``B (E, d_out, r)`` -> ``(T, d_out)``."""

    id: str
    src: str
    routing: str
    a: ParamRef
    b: ParamRef
    scale: float
    origin: str = ""

    def inputs(self) -> tuple[str, ...]:
        return (self.src, self.routing)


Node = Union[Input, Linear, Columns, Add, Jitter, Route, PoolMix, GroupedMix, BlockGate, OuterGate,
             TreeRoute, TreeMix, TreePropagate, TreePathGates, GateBias, SiblingLinear, AuxLoss, ExpertFFN,
             ExpertHidden, ExpertSum, ExpertLoRA]

TENSOR_NODES = (Input, Linear, Columns, Add, Jitter, PoolMix, GroupedMix, BlockGate, OuterGate,
                TreeMix, TreePropagate, GateBias, SiblingLinear, ExpertFFN, ExpertSum, ExpertLoRA)

ROUTING_NODES = (Route, TreePathGates)
"""Nodes whose value is a flat routing (gates ``(T, E)``) that gated mixes can read."""
