"""What sits at one adapted linear: a plain LoRA, a routed expert pool, a rank partition
or an S'MoRE residual tree. Row layout throughout: ``x ∈ R^{d_in}``, ``A_i ∈ R^{d_in×r}``,
``B_i ∈ R^{r×d_out}``; parameters are stored as PyTorch does (``[out, in]``)."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from .base import MAX_ALPHA, MAX_INIT_STD, MIN_TEMPERATURE, SpecModel
from .core_pool import CorePool
from .kronecker_pool import KroneckerPool
from .mixer import RSLLoss
from .pool_magnitude import check_pool_magnitude
from .preserve import PoolAuxLoss, PreserveLoss, check_preserve
from .rank_tasks import RankTasks
from .routing import (
    AuxLoss,
    CV2ImportanceLoad,
    ImplicitTopKRouter,
    Router,
    RouterZLoss,
    SigmoidTopKRouter,
    StaticRouter,
    SwitchLoadBalance,
    TopKRouter,
    check_entropy_loss,
)
from .sources import LoRASource
from .task_routing import TaskRoutingLoss
from .xlora import check_xlora_pool

__all__ = [
    "Scaling",
    "Init",
    "LoRA",
    "SharedExperts",
    "PerExpert",
    "Shared",
    "SparseRandom",
    "ExpertPool",
    "RankPartition",
    "TreeLevel",
    "TreeRouter",
    "ResidualTree",
    "CorePool",
    "KroneckerPool",
    "RankTasks",
    "Adapter",
    "lora_scale",
]

Scaling = Literal["alpha_over_rank", "rslora", "alpha_over_active_rank", "alpha_over_total_rank"]
"""``alpha/r`` (LoRA; r the rank of one expert), ``alpha/sqrt(r)`` (rsLoRA), ``alpha/k_active``
(SMoRA: the number of ranks a token activates), ``alpha/(E·r)`` (FlyLoRA: the pool's total rank)."""


def lora_scale(alpha: float | None, rank: int, scaling: str, active: int | None = None,
               total: int | None = None) -> float:
    """The scale ``s`` of a low-rank update; ``alpha=None`` means ``alpha = rank`` (s = 1 for
    ``alpha_over_rank``)."""
    a = float(rank) if alpha is None else alpha
    if scaling == "rslora":
        return a / math.sqrt(rank)
    if scaling == "alpha_over_active_rank":
        return a / float(active if active is not None else rank)
    if scaling == "alpha_over_total_rank":
        return a / float(total if total is not None else rank)
    return a / rank


class Init(SpecModel):
    """How new adapter parameters start. ``up="zero"`` (the default) makes a fresh adapter
    a no-op; ``"normal"`` gives every up-projection N(0, std²), for tests and for
    checking that save/load and export carry real values."""

    up: Literal["zero", "normal"] = "zero"
    std: float = Field(0.02, gt=0, le=MAX_INIT_STD)
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Seed of the parameter initialisation (``None``: torch's global generator); a 64-bit
    signed integer, ``0 <= seed < 2**63``, as ``torch.Generator.manual_seed`` takes."""


class LoRA(SpecModel):
    """One always-on low-rank update ``s · (x A) B``."""

    kind: Literal["lora"] = "lora"
    rank: PositiveInt = 8
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """``None``: alpha = rank."""
    scaling: Literal["alpha_over_rank", "rslora"] = "alpha_over_rank"
    dropout: float = Field(0.0, ge=0, lt=1)
    """PEFT's ``lora_dropout``: in training, ``A`` reads ``dropout(x)`` (inverted dropout,
    each feature zeroed with this probability and the rest scaled by ``1 / (1 - p)``); the
    frozen layer reads ``x``. Evaluation: no dropout."""
    magnitude: bool = False
    """DoRA (Liu et al. 2024): a trainable magnitude per output row, ``W' = m ⊙ V / ‖V‖`` with
    ``V = W + s·B A`` (``m`` starts at the frozen rows' norms; ``‖V‖`` passes no gradient, as
    PEFT). Of a LoRA site (not of a pool's shared expert)."""


class SharedExperts(SpecModel):
    """DeepSeekMoE's shared experts: ``count`` always-on LoRA experts of rank ``rank`` beside the
    routed pool, ``Δy_shared = Σ_j s (x A_jᵀ) B_jᵀ`` (gate 1), ``s = alpha / rank`` (or
    ``alpha / sqrt(rank)`` with ``rslora``)."""

    kind: Literal["shared_experts"] = "shared_experts"
    count: PositiveInt = 2
    rank: PositiveInt = 8
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """``None``: alpha = rank."""
    scaling: Literal["alpha_over_rank", "rslora"] = "alpha_over_rank"


SharedExpert = Annotated[Union[LoRA, SharedExperts], Field(discriminator="kind")]


class PerExpert(SpecModel):
    """Every expert has its own factor."""

    kind: Literal["per_expert"] = "per_expert"


class Shared(SpecModel):
    """One factor shared by all experts (HydraLoRA's shared A)."""

    kind: Literal["shared"] = "shared"


class SparseRandom(SpecModel):
    """FlyLoRA's frozen sparse random down-projection: each rank reads ``density · d_in``
    input features with weights N(0, 1/r²); never trained."""

    kind: Literal["sparse_random"] = "sparse_random"
    density: float = Field(0.25, gt=0, le=1)


Factor = Annotated[Union[PerExpert, Shared, SparseRandom], Field(discriminator="kind")]


def _check_switch_router(router, aux_losses: list) -> None:
    """``switch_lb`` multiplies each expert's share of the top-k selections by its mean softmax
    probability: it is defined for the softmax top-k router only."""
    for j, aux in enumerate(aux_losses):
        if isinstance(aux, SwitchLoadBalance) and not isinstance(router, TopKRouter):
            hint = ("its balancing bias already balances the load; remove the loss"
                    if isinstance(router, (SigmoidTopKRouter, ImplicitTopKRouter))
                    else "use cv2_importance_load or localized_balance")
            raise ValueError(f"aux_losses[{j}].kind = 'switch_lb' needs a softmax top-k router (router.kind = "
                             f"'topk'), got router.kind = {router.kind!r}: {hint}, or set router.kind = 'topk'")
        if isinstance(aux, (TaskRoutingLoss, RSLLoss)) and isinstance(router, (SigmoidTopKRouter, ImplicitTopKRouter)):
            raise ValueError(f"aux_losses[{j}].kind = {aux.kind!r} reads softmax probabilities; router.kind = "
                             f"{router.kind!r} has none: use topk, dense, dense_train_topk, task or task_embedding")


def _check_z_loss(router, aux_losses: list) -> None:
    """``z_loss`` reads the router's logits ``x W_g``: the implicit and static routers have none."""
    for j, aux in enumerate(aux_losses):
        if isinstance(aux, RouterZLoss) and isinstance(router, (ImplicitTopKRouter, StaticRouter)):
            raise ValueError(f"aux_losses[{j}].kind = 'z_loss' reads router logits; router.kind = {router.kind!r} "
                             "has none: use a topk, dense or sigmoid_topk router, or remove the loss")


class ExpertPool(SpecModel):
    """``Δy = Σ_i g_i(x) · s_i · (x A_i) B_i`` (+ always-on shared experts).

    Options every LoRA user expects: ``dropout`` (PEFT's ``lora_dropout`` on the experts' input,
    the router reads ``x``; with scope ``ffn_block``, MixLoRA's, on the input of each expert's LoRAs),
    ``capacity_factor`` (tokens over an expert's capacity pass through
    it), ``ranks`` (FlexMoRE: a rank per expert)."""

    kind: Literal["pool"] = "pool"
    experts: PositiveInt = 8
    rank: PositiveInt = 8
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    scaling: Scaling = "alpha_over_rank"
    down: Factor = PerExpert()
    up: Literal["per_expert", "shared"] = "per_expert"
    router: Router = TopKRouter()
    aux_losses: list[PoolAuxLoss] = []
    """The router's aux losses, and ``preserve`` (LoRA-Mixer's, ``specs/preserve.py``)."""
    shared_expert: SharedExpert | None = None
    """An always-on LoRA added to the routed mixture, or several of them (``kind:
    "shared_experts"``, DeepSeekMoE). They read the experts' input (after ``dropout``)."""
    frozen_experts: bool = False
    """Keep the experts' A and B fixed (pre-trained adapters imported with ``mf.from_peft``:
    X-LoRA, MeteoRA, CAT, LoRA-Mixer's plug-and-play mode); only the router (and a shared
    expert) train."""
    experts_from: list[LoRASource] = []
    """The experts' trained PEFT LoRA folders, one per expert in order (``experts`` is their
    number). Their rank and alpha come from the folders; ``frozen_experts`` follows their
    ``trainable`` flags (``false`` when they differ: each expert then trains or stays frozen as
    its folder says, ``specs/sources.py``)."""

    @model_validator(mode="before")
    @classmethod
    def _from_sources(cls, data):
        return sources_defaults(data)
    dropout: float = Field(0.0, ge=0, lt=1)
    """PEFT's ``lora_dropout`` on the input of the experts' down-projections (and of the shared
    experts) in training; the router reads ``x``. With scope ``ffn_block``, MixLoRA's: each expert's
    gate and up LoRAs read ``dropout(x)`` and its down LoRA ``dropout(h)`` (its hidden state), a mask per
    routed token and LoRA, while the frozen projections read the undropped values."""
    capacity_factor: float | None = Field(None, gt=0, le=64)
    """Expert capacity (Switch/GShard): each expert takes at most ``C = ceil(factor · T · k / E)``
    of the forward's ``T`` tokens, slots taken first choices first, then in token order; a
    token over capacity passes the expert by (gate 0), counted by ``record_routing()``.
    Needs a top-k router. ``None``: no capacity."""
    magnitude: bool = False
    """DoRA on every expert (``specs/pool_magnitude.py``): ``Δy = Σ_i g_i [(c_i - 1) ⊙ x Wᵀ + c_i ⊙ s (x A_iᵀ) B_iᵀ]``,
    ``c_i = (‖W‖ + m_i) / ‖W + s B_i A_i‖`` per output row; the experts' own A or B (one factor may be
    shared, as HydraLoRA's A). Scope ``ffn_block``
    (MixLoRA's ``use_dora``): ``c_i ⊙ (u Wᵀ + b + s (u A_iᵀ) B_iᵀ)`` on each adapted linear (``block_nodes``)."""
    ranks: list[PositiveInt] | None = None
    """FlexMoRE: one rank per expert (``len(ranks) == experts``; ``rank`` is then not read).
    Stored concatenated, ``A (Σ r_i, d_in)``, ``B (d_out, Σ r_i)``; scale ``alpha / r_i`` per
    expert (``rslora``: ``alpha / sqrt(r_i)``; ``alpha_over_total_rank``: ``alpha / Σ r_i``)."""

    @model_validator(mode="after")
    def _check(self) -> "ExpertPool":
        r = self.router
        _check_switch_router(r, self.aux_losses)
        check_entropy_loss(r, self.aux_losses)
        _check_z_loss(r, self.aux_losses)
        self._check_options()
        if r.k is not None and r.k > self.experts:
            raise ValueError(
                f"router.k = {r.k} exceeds experts = {self.experts}; use k <= experts or a dense router")
        if isinstance(self.down, SparseRandom) != isinstance(r, ImplicitTopKRouter):
            raise ValueError(
                "down.kind = 'sparse_random' and router.kind = 'implicit_topk' go together (FlyLoRA): "
                "the frozen random down-projection is the router")
        if isinstance(r, ImplicitTopKRouter) and self.rank != 1:
            raise ValueError(f"an implicit_topk router routes single ranks: set rank = 1 (got {self.rank})")
        if isinstance(self.down, Shared) and self.up == "shared":
            raise ValueError("down and up cannot both be shared: the experts would be identical")
        if isinstance(r, StaticRouter) and any(not isinstance(a, PreserveLoss) for a in self.aux_losses):
            raise ValueError("a static router gives every token the same weights: there is no routing to "
                             "balance; remove aux_losses or use a token-level router (topk, dense)")
        one_frozen = self.frozen_experts and self.experts == 1 and self.shared_expert is None
        if one_frozen and not isinstance(r, StaticRouter):
            raise ValueError(f"frozen_experts with experts = 1 and router.kind = {r.kind!r}: a token router's gate "
                             "over one expert is always 1, so nothing would train; use a static router (a learned "
                             "scale), more experts, or trainable experts")
        check_sources(self)
        check_preserve(self)
        check_xlora_pool(self)
        return self

    def _check_options(self) -> None:
        """``capacity_factor``, ``ranks`` and a LoRA shared expert's own ``dropout``."""
        if self.capacity_factor is not None and self.router.k is None:
            raise ValueError(f"capacity_factor = {self.capacity_factor} limits the tokens of top-k experts; "
                             f"router.kind = {self.router.kind!r} sends every token to every expert: use a "
                             "top-k router or remove capacity_factor")
        if self.capacity_factor is not None and self.router.kind in ("top_p", "dense_train_topk"):
            raise ValueError(f"capacity_factor = {self.capacity_factor} limits the tokens of a fixed number of "
                             f"experts per token; router.kind = {self.router.kind!r} routes a varying number "
                             "(top_p) or every expert in training (dense_train_topk): use topk, sigmoid_topk or "
                             "implicit_topk, or remove capacity_factor")
        if self.dropout > 0 and isinstance(self.router, ImplicitTopKRouter):
            raise ValueError(f"dropout = {self.dropout}: an implicit_topk router routes on x A, so dropout on A's "
                             "input would change the routing; remove dropout")
        if isinstance(self.shared_expert, LoRA) and self.shared_expert.magnitude:
            raise ValueError("shared_expert.magnitude: DoRA magnitudes are an option of a LoRA site; a shared "
                             "expert adds to routed experts, not to the frozen weight alone: remove it")
        check_pool_magnitude(self)
        if isinstance(self.shared_expert, LoRA) and self.shared_expert.dropout > 0:
            raise ValueError(f"shared_expert.dropout = {self.shared_expert.dropout}: a shared expert reads the "
                             "pool's input; set the pool's dropout instead")
        if self.ranks is None:
            return
        if len(self.ranks) != self.experts:
            raise ValueError(f"ranks has {len(self.ranks)} entries for experts = {self.experts}: give one rank "
                             "per expert")
        if not isinstance(self.down, PerExpert) or self.up != "per_expert":
            raise ValueError("ranks (one per expert) needs per-expert factors: down.kind = 'per_expert' and "
                             "up = 'per_expert'")
        if self.scaling == "alpha_over_active_rank":
            raise ValueError("scaling = 'alpha_over_active_rank' is not defined with ranks (the active rank "
                             "varies per token); use alpha_over_rank, rslora or alpha_over_total_rank")

    def expert_ranks(self) -> list[int]:
        """The rank of each expert."""
        return list(self.ranks) if self.ranks is not None else [self.rank] * self.experts


def sources_defaults(data):
    """With ``experts_from``: ``experts`` defaults to their number and ``frozen_experts`` to
    none of them being trainable (``False`` for a mixed pool: some experts train)."""
    srcs = data.get("experts_from") if isinstance(data, dict) else None
    if not isinstance(srcs, (list, tuple)) or not srcs:
        return data  # no sources, or not a list of them (the field's validation names the type)
    data = dict(data)
    data.setdefault("experts", len(srcs))
    flags = {s.trainable if isinstance(s, LoRASource) else bool(s.get("trainable", False))
             for s in srcs if isinstance(s, (LoRASource, dict))}
    data.setdefault("frozen_experts", flags == {False})
    return data


def check_sources(pool: "ExpertPool") -> None:
    """The cross-field rules of a pool whose experts come from PEFT LoRA folders."""
    srcs = pool.experts_from
    if not srcs:
        return
    if pool.experts != len(srcs):
        raise ValueError(f"experts = {pool.experts} but experts_from names {len(srcs)} folders; "
                         f"set experts = {len(srcs)} or leave it out")
    flags = [s.trainable for s in srcs]
    if pool.frozen_experts != (not any(flags)):
        got = flags[0] if len(set(flags)) == 1 else flags
        raise ValueError(f"frozen_experts = {pool.frozen_experts} contradicts experts_from[*].trainable = "
                         f"{got}; leave frozen_experts out (it follows the folders' flags)")
    if pool.ranks is not None:
        raise ValueError("ranks: the experts of experts_from take their ranks from their folders (a smaller rank "
                         "is zero-padded); remove ranks")
    if len(set(flags)) > 1 and pool.magnitude:
        raise ValueError(f"magnitude: a pool whose experts_from[*].trainable flags differ ({flags}) stores its "
                         "experts in runs of frozen and trainable ones, which magnitude does not read; remove "
                         "magnitude or give every folder the same flag")
    if not isinstance(pool.down, PerExpert) or pool.up != "per_expert" or pool.shared_expert is not None:
        raise ValueError("experts_from needs each expert's own A and B (down.kind = 'per_expert', up = "
                         "'per_expert') and no shared_expert: a trained LoRA brings both factors")


class RankPartition(SpecModel):
    """SMoRA: a LoRA of total rank ``rank`` whose ranks are experts, grouped in blocks of
    ``block`` ranks; the same as a pool of ``rank / block`` experts of rank ``block``."""

    kind: Literal["rank_partition"] = "rank_partition"
    rank: PositiveInt = 64
    block: PositiveInt = 1
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    scaling: Scaling = "alpha_over_active_rank"
    router: Router = SigmoidTopKRouter()
    aux_losses: list[AuxLoss] = []
    dropout: float = Field(0.0, ge=0, lt=1)
    """PEFT's ``lora_dropout`` on the input of the down-projection (training only)."""

    @model_validator(mode="after")
    def _check(self) -> "RankPartition":
        _check_switch_router(self.router, self.aux_losses)
        check_entropy_loss(self.router, self.aux_losses)
        _check_z_loss(self.router, self.aux_losses)
        if self.rank % self.block:
            raise ValueError(f"rank = {self.rank} is not a multiple of block = {self.block}")
        if isinstance(self.router, ImplicitTopKRouter):
            raise ValueError("an implicit_topk router needs a frozen sparse_random pool; use kind 'pool'")
        if isinstance(self.router, StaticRouter) and self.aux_losses:
            raise ValueError("a static router has no routing to balance; remove aux_losses")
        k = self.router.k
        if k is not None and k > self.rank // self.block:
            raise ValueError(f"router.k = {k} exceeds the {self.rank // self.block} blocks")
        return self

    def as_pool(self) -> ExpertPool:
        return ExpertPool(experts=self.rank // self.block, rank=self.block, alpha=self.alpha,
                          scaling=self.scaling, router=self.router, aux_losses=self.aux_losses,
                          dropout=self.dropout)


class TreeLevel(SpecModel):
    """One S'MoRE pool: ``experts`` residual experts of rank ``rank``; every node of the
    level above picks ``fanout`` children from it (``None``: all, for the dense gate)."""

    experts: PositiveInt = 4
    rank: PositiveInt = 8
    fanout: PositiveInt | None = 2
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """Per-level scale ``c_l = alpha / rank``; ``None``: ``c_l = 1`` (the official default)."""
    scaling: Literal["alpha_over_rank", "rslora"] = "alpha_over_rank"
    """With ``alpha``: ``c_l = alpha / rank`` or (rsLoRA) ``alpha / sqrt(rank)``."""
    key_dim: PositiveInt | None = None
    """Width of this pool's keys and queries (the official ``gate_dims[l]``); ``None``:
    ``router.key_dim``."""


class TreeRouter(SpecModel):
    """S'MoRE's hierarchical key-query router (top-down, ancestor-conditioned)."""

    gate: Literal["switch", "dense", "noisy_topk"] = "switch"
    down_dim: PositiveInt | None = 32
    """Width m of the router's down-projection ``x_down = W_down x + b`` (``None``: the
    site's ``d_in``, as the official code does for ``dim_downproj_x <= 0``)."""
    key_dim: PositiveInt = 32
    """Width of expert keys and queries (the official ``gate_dims``) of every level that
    does not set its own ``key_dim``."""
    query_activation: Literal["relu", "tanh", "identity"] = "relu"
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    """Divides the logits (cosine logits for noisy_topk) before selection and softmax;
    the official code has none (``conventions = "official"`` needs 1.0)."""


class ResidualTree(SpecModel):
    """S'MoRE: residual experts in levels (listed bottom/leaf first), routed top-down and
    propagated bottom-up (METHODS.md §1). Hidden widths ``d_{l+1} = d_l + s_l r_l``.

    Per token, with column vectors and ``[out, in]`` matrices: ``x_down = W_down x + b``;
    pool l routes every context (a path of chosen experts from the top) with the query
    ``q = W2 act(W1 z + b1) + b2``, ``z = [x_down, keys of the ancestors, top first]``;
    the residual of expert n is ``u_{l,n} = c_l (B_{l,n}(A_{l,n} x + a_{l,n}) + b_{l,n})``
    (``c_l`` scales both biases); a leaf node is ``Σ_p w_p σ(u_{0,e_p})``, a node of level
    l+1 is ``Σ_p w_p σ(u_{l,e_p} + W_l h_child(p) + w_l)``; ``Δy = W_proj h_root + b_proj``.

    Where the official code (ZimpleX/SMoRE-LLM) departs from the paper, ``conventions``
    picks the form; everything else is the same in both (docs/smore_conventions.md):

    ==================================  ===============================  ==================================
    aspect                              ``conventions = "paper"``        ``conventions = "official"``
    ==================================  ===============================  ==================================
    switch gate, fanout 1               weight renormalised: ``w = 1``   raw probability ``w = p_top < 1``
    noisy_topk gate, fanout 1           softmax of one logit: ``w = 1``  raw cosine logit (may be < 0)
    dense gate                          fanout must equal experts        fanout ignored: every child
    temperature                         divides (cosine) logits          none (must be 1.0)
    ==================================  ===============================  ==================================

    The same in both: switch ``w = softmax`` of the top-f renormalised (f > 1); noisy_topk:
    cosine logits, ``softmax`` over the top-f (f > 1), in training the noise
    ``ε · (softplus(W_noise z) + 0.01)``, ``ε ~ N(0, 1)`` from the site's noise generator
    (``handle.seed_noise``), and the smooth (normal-CDF) load of its CV² loss; dense:
    ``w = softmax`` over all experts, no aux loss. Noisy-gate keys are L2-normalised
    before they join the router input of the pool below.
    """

    kind: Literal["residual_tree"] = "residual_tree"
    levels: list[TreeLevel] = Field(default_factory=lambda: [TreeLevel(), TreeLevel()], min_length=1)
    activation: Literal["tanh", "relu", "identity"] = "tanh"
    activation_position: Literal["all", "child", "child_v2"] = "all"
    """Where σ acts (the official ``activation_position``). ``all``: on the whole message,
    ``Σ_p w_p σ(u + W h_child + w)`` (the paper; leaves ``Σ_p w_p σ(u)``). ``child``:
    ``Σ_p (w_p u + W σ(h_child) + w)``; ``child_v2``: ``Σ_p w_p (u + W σ(h_child) + w)``
    (the paper's S'MoRE*); in both, leaves are ``Σ_p w_p u`` and the root is not activated."""
    router: TreeRouter = TreeRouter()
    bias: bool = True
    """Biases on A, B, the level transforms W_l and the final projection (as the official layer)."""
    conventions: Literal["paper", "official"] = "paper"
    """Where the official code departs from the paper (see the table above)."""
    start: Literal["b_zero", "w_final_zero"] = "b_zero"
    """Which factor starts at zero (the official ``init_method`` of the same names), so that a
    fresh adapter is a no-op: ``b_zero`` every ``B_l`` (the final projection Kaiming-uniform);
    ``w_final_zero`` the final projection (every ``B_l`` Kaiming-uniform, so the tree's hidden
    state is live from the first step and the final projection learns from zero as LoRA's
    ``B`` does). ``Init(up="normal")`` draws the zero factor instead."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """PEFT's ``lora_dropout`` on the input of the experts' down-projections, in training only (the
    router's down-projection reads the undropped input)."""
    aux_losses: list[AuxLoss] = []
    """``switch_lb`` (official with the switch gate) or ``cv2_importance_load`` (official with
    noisy_topk), summed over pools; the dense gate takes none."""

    @model_validator(mode="after")
    def _check(self) -> "ResidualTree":
        gate, official = self.router.gate, self.conventions == "official"
        for i, lv in enumerate(self.levels):
            f = lv.fanout
            if gate == "dense":
                if f is not None and f != lv.experts and not official:
                    raise ValueError(
                        f"levels[{i}].fanout = {f}: the dense gate uses every child (fanout = experts "
                        f"= {lv.experts}); set fanout to {lv.experts} or null, or conventions = 'official'")
            elif f is None:
                raise ValueError(f"levels[{i}].fanout is required for the {gate} gate")
            elif f > lv.experts:
                raise ValueError(f"levels[{i}].fanout = {f} exceeds experts = {lv.experts}")
        if official and self.router.temperature != 1.0:
            raise ValueError(f"router.temperature = {self.router.temperature}: the official gates have no "
                             "temperature; set it to 1.0 or use conventions = 'paper'")
        for a in self.aux_losses:
            if not isinstance(a, (SwitchLoadBalance, CV2ImportanceLoad)):
                raise ValueError(f"aux loss {a.kind!r} is not defined for residual trees; "
                                 "use switch_lb or cv2_importance_load")
            if gate == "dense":
                raise ValueError(f"aux loss {a.kind!r}: the dense gate selects every child and carries no "
                                 "balance loss; remove it or use the switch or noisy_topk gate")
        return self

    def fanouts(self) -> list[int]:
        """Children per node at each level (``experts`` for the dense gate)."""
        if self.router.gate == "dense":
            return [lv.experts for lv in self.levels]
        return [lv.fanout or lv.experts for lv in self.levels]

    def key_dims(self) -> list[int]:
        """Key/query width ``g_l`` of each level."""
        return [lv.key_dim or self.router.key_dim for lv in self.levels]

    def widths(self) -> list[int]:
        """Hidden widths ``[d_0 = 0, d_1, ..., d_L]``."""
        d = [0]
        for lv in self.levels:
            d.append(d[-1] + lv.experts * lv.rank)
        return d


Adapter = Annotated[Union[LoRA, ExpertPool, RankPartition, ResidualTree, CorePool, RankTasks, KroneckerPool],
                    Field(discriminator="kind")]
