"""Spec -> IR: the graph of one adapter site, in its plain (unoptimised) form.

Parameter names are stable and short (``A``, ``B``, ``router_w``, ``tree.A0`` ...): they are
the keys of saved adapters, after the module path.
"""

from __future__ import annotations

from typing import Sequence

from ..integrations.block_module import frozen_names
from ..integrations.ffn_trace import BlockLinear
from ..integrations.inject import FROZEN_WEIGHT
from ..integrations.sites import SiteShape
from ..ir import (
    AbsTopK,
    Add,
    AuxLoss,
    BlockColumns,
    BlockGate,
    BlockRows,
    CapacityLimit,
    Concat,
    CoreExperts,
    DenseSoftmax,
    DenseTrainTopK,
    Dropout,
    ExpertFFN,
    ExpertLinear,
    Graph,
    Input,
    Jitter,
    KroneckerMix,
    LayerScalings,
    Linear,
    Magnitude,
    ParamDecl,
    ParamRef,
    PoolMagnitude,
    PoolMix,
    RaggedMix,
    Route,
    SelfActivated,
    SigmoidTopK,
    SoftmaxTopK,
    StaticGate,
    TaskContrastive,
    TaskEmbed,
    TaskScale,
    TaskScores,
    TopPTsallis,
    TreeGateLevel,
    TreeLevelParams,
    TreeMix,
    TreeRoute,
    XLoRAScale,
    ZLoss,
)
from ..specs import (
    CorePool,
    DenseRouter,
    DenseTrainTopKRouter,
    ExpertPool,
    ImplicitTopKRouter,
    KroneckerPool,
    LoRA,
    PreserveLoss,
    RankPartition,
    RankTasks,
    ResidualTree,
    RouterZLoss,
    Shared,
    SharedExperts,
    SigmoidTopKRouter,
    SparseRandom,
    StaticRouter,
    TaskContrastiveLoss,
    TaskEmbeddingRouter,
    TaskRouter,
    TopKRouter,
    TopPRouter,
    XLoRARouter,
    lora_scale,
)
from ..specs.sources import expert_runs
from .build_mixed import mixed_factors, preserve_node

__all__ = ["SiteShape", "build_graph", "build_block_graph"]


class _Builder:
    def __init__(self, shape: SiteShape):
        self.shape = shape
        self.nodes: list = [Input(id="x", width=shape.d_in, origin="input")]
        self.params: list[ParamDecl] = []
        self.frozen: list[ParamDecl] = []
        self.aux: list[str] = []

    def param(self, name: str, shape: tuple[int, ...], init: str, **kw) -> ParamRef:
        self.params.append(ParamDecl(name=name, shape=tuple(shape), init=init, **kw))  # type: ignore[arg-type]
        return ParamRef(name, tuple(shape))

    def add(self, node) -> str:
        self.nodes.append(node)
        return node.id

    def graph(self, output: str) -> Graph:
        s = self.shape
        return Graph(nodes=tuple(self.nodes), output=output, aux=tuple(self.aux), params=tuple(self.params),
                     d_in=s.d_in, d_out=s.d_out, label=s.label, frozen=tuple(self.frozen))


def build_graph(adapter, shape: SiteShape, origin: str = "adapter") -> Graph:
    """The plain IR of ``adapter`` on a linear of ``shape``."""
    b = _Builder(shape)
    match adapter:
        case LoRA():
            out = _lora(b, adapter, "", origin)
        case RankPartition():
            out = _pool(b, adapter.as_pool(), origin)
        case ExpertPool():
            out = _pool(b, adapter, origin)
        case ResidualTree():
            out = _tree(b, adapter, origin)
        case CorePool():
            out = _core_pool(b, adapter, origin)
        case RankTasks():
            out = _rank_tasks(b, adapter, origin)
        case KroneckerPool():
            out = _kronecker_pool(b, adapter, origin)
        case _:
            raise TypeError(f"no IR for adapter kind {type(adapter).__name__}")
    return b.graph(out)


def _dropped(b: _Builder, p: float, nid: str, origin: str) -> str:
    """``x``, or ``x`` through PEFT's ``lora_dropout`` when ``p > 0``."""
    return "x" if p == 0 else b.add(Dropout(id=nid, src="x", p=p, origin=f"{origin}.dropout"))


def _lora(b: _Builder, spec: LoRA | SharedExperts, prefix: str, origin: str, src: str | None = None) -> str:
    d_in, d_out, r = b.shape.d_in, b.shape.d_out, b.shape.rank or spec.rank
    if src is None:  # a LoRA site of its own: its dropout
        src = _dropped(b, spec.dropout, f"{prefix}drop", origin)  # type: ignore[union-attr]
    A = b.param(f"{prefix}A", (r, d_in), "kaiming", fan_in=d_in)
    B = b.param(f"{prefix}B", (d_out, r), "up")
    h = b.add(Linear(id=f"{prefix}h", src=src, weight=A, origin=f"{origin}.down"))
    s = lora_scale(spec.alpha, r, spec.scaling)
    up = b.add(Linear(id=f"{prefix}up", src=h, weight=B, scale=s, origin=f"{origin}.up"))
    if not getattr(spec, "magnitude", False):
        return up
    # DoRA: the frozen weight is an input of the graph (the model's own tensor, read in place); its
    # product reads the dropped input, as PEFT's DoRA does in training
    b.frozen.append(ParamDecl(name=FROZEN_WEIGHT, shape=(d_out, d_in), init="frozen", trainable=False))
    m = b.param(f"{prefix}magnitude", (d_out,), "zero")
    return b.add(Magnitude(id=f"{prefix}dora", src=src, lora=up, weight=ParamRef(FROZEN_WEIGHT, (d_out, d_in)),
                           a=A, b=B, scale=s, magnitude=m, origin=f"{origin}.magnitude"))


def _pool(b: _Builder, spec: ExpertPool, origin: str) -> str:
    d_in, d_out = b.shape.d_in, b.shape.d_out
    E = b.shape.experts or spec.experts
    r = b.shape.rank or spec.rank
    router = spec.router
    k = router.k
    active = (k or E) * r
    scale = lora_scale(spec.alpha, r, spec.scaling, active=active, total=E * r)
    Ea = 1 if isinstance(spec.down, Shared) else E
    Eb = 1 if spec.up == "shared" else E
    learn = not spec.frozen_experts
    src = _dropped(b, spec.dropout, "drop", origin)
    if spec.ranks is not None:
        return _ragged_pool(b, spec, src, origin)
    runs = expert_runs(spec)
    if runs:  # experts that train beside frozen ones: runs of parameters and buffers (build_mixed.py)
        A, B = mixed_factors(b, runs, r, d_in, d_out)
    elif isinstance(spec.down, SparseRandom):
        A = b.param("A", (E, r, d_in), "sparse_random", trainable=False, buffer=True, density=spec.down.density)
    else:
        A = b.param("A", (Ea, r, d_in), "kaiming", fan_in=d_in, trainable=learn, buffer=not learn)
    if not runs:
        B = b.param("B", (Eb, d_out, r), "up", trainable=learn, buffer=not learn)
    if isinstance(router, ImplicitTopKRouter):
        # FlyLoRA: the down-projection output is the router input: no router GEMM.
        bal = b.param("balance", (E,), "zero", trainable=False, buffer=True)
        h = b.add(Linear(id="h", src="x", weight=BlockRows(A), origin=f"{origin}.down"))
        route = b.add(Route(id="route", src=h, gate=AbsTopK(k=router.k, balance=bal), experts=E,
                            origin=f"{origin}.router"))
        g = b.add(BlockGate(id="gated", src=h, routing=_capacity(b, spec, route, origin), rank=r, scale=scale,
                            origin=origin))
        out = b.add(Linear(id="mix", src=g, weight=BlockColumns(B), origin=f"{origin}.up"))
    else:
        route = _flat_router(b, router, E, origin)
        mixed = _capacity(b, spec, route, origin)
        if spec.magnitude:
            out = _dora_experts(b, src, mixed, A, B, scale, origin)
        else:
            out = b.add(PoolMix(id="mix", src=src, routing=mixed, a=A, b=B, scale=scale, origin=origin))
    _aux_losses(b, spec.aux_losses, route, origin, spec.router)
    return _with_shared(b, spec, src, out, origin)


def _dora_experts(b: _Builder, src: str, routing: str, A: ParamRef, B: ParamRef, scale: float, origin: str) -> str:
    """Every expert DoRA-adapted (``specs/pool_magnitude.py``): a magnitude ``(E, d_out)`` per expert over
    the frozen weight, read in place (a frozen input of the graph)."""
    d_in, d_out, E = b.shape.d_in, b.shape.d_out, max(A.shape[0], B.shape[0])
    b.frozen.append(ParamDecl(name=FROZEN_WEIGHT, shape=(d_out, d_in), init="frozen", trainable=False))
    m = b.param("magnitude", (E, d_out), "zero")
    return b.add(PoolMagnitude(id="mix", src=src, routing=routing, weight=ParamRef(FROZEN_WEIGHT, (d_out, d_in)),
                               a=A, b=B, scale=scale, magnitude=m, origin=f"{origin}.magnitude"))


def _capacity(b: _Builder, spec: ExpertPool, route: str, origin: str) -> str:
    """The routing the experts read: ``route``, limited to the experts' capacity if the spec sets one."""
    if spec.capacity_factor is None:
        return route
    return b.add(CapacityLimit(id="capacity", routing=route, factor=spec.capacity_factor,
                               origin=f"{origin}.capacity_factor"))


def _aux_losses(b: _Builder, losses: list, route: str, origin: str, router, first: int = 0) -> None:
    """The aux-loss nodes (``aux{first}``, ...): ``z_loss`` reads the router logits, the others the routing."""
    for i, aux in enumerate(losses, first):
        where = f"{origin}.aux_losses[{i}]"
        if isinstance(aux, PreserveLoss):  # LoRA-Mixer's: on the experts' tensors, not on the routing
            b.aux.append(b.add(preserve_node(b, aux, f"aux{i}", where)))
            continue
        if isinstance(aux, RouterZLoss):
            b.aux.append(b.add(ZLoss(id=f"aux{i}", src="logits", weight=aux.weight, origin=where)))
            continue
        b.aux.append(b.add(AuxLoss(id=f"aux{i}", routing=route, kind=aux.kind, weight=aux.weight,
                                   delta=getattr(aux, "delta", 0.0), groups=getattr(aux, "groups", 1),
                                   q=getattr(router, "entropy_index", 1.0),
                                   temperature=getattr(aux, "temperature", 1.0), entropy=getattr(aux, "entropy", 0.0),
                                   top_k=router.k or 1, origin=where)))


def _with_shared(b: _Builder, spec: ExpertPool, src: str, out: str, origin: str) -> str:
    """``out`` plus the always-on shared expert(s), which read ``src`` (the pool's input)."""
    shared = spec.shared_expert
    if shared is None:
        return out
    where = f"{origin}.shared_expert"
    if isinstance(shared, LoRA):
        terms = [_lora(b, shared, "shared_", where, src)]
    else:
        terms = [_lora(b, shared, f"shared{j}_", f"{where}[{j}]", src) for j in range(shared.count)]
    return b.add(Add(id="with_shared", srcs=(out, *terms), origin=origin))


def _ragged_pool(b: _Builder, spec: ExpertPool, src: str, origin: str) -> str:
    """FlexMoRE: experts of their own ranks, stored concatenated (``A (Σ r_i, d_in)``, ``B (d_out, Σ r_i)``)."""
    d_in, d_out, ranks = b.shape.d_in, b.shape.d_out, tuple(spec.expert_ranks())
    learn = not spec.frozen_experts
    R = sum(ranks)
    A = b.param("A", (R, d_in), "kaiming", fan_in=d_in, trainable=learn, buffer=not learn)
    B = b.param("B", (d_out, R), "up", trainable=learn, buffer=not learn)
    scales = tuple(lora_scale(spec.alpha, r, spec.scaling, total=R) for r in ranks)
    route = _flat_router(b, spec.router, len(ranks), origin)
    mixed = _capacity(b, spec, route, origin)
    out = b.add(RaggedMix(id="mix", src=src, routing=mixed, a=A, b=B, ranks=ranks, scales=scales, origin=origin))
    _aux_losses(b, spec.aux_losses, route, origin, spec.router)
    return _with_shared(b, spec, src, out, origin)


def _core_pool(b: _Builder, spec: CorePool, origin: str) -> str:
    """CoMoL: ``h = A x`` (the core space), a router on h, the mixture of full experts
    ``B M_i h`` (the ``merge_cores`` pass makes it one soft-merged core per token)."""
    d_in, d_out, r = b.shape.d_in, b.shape.d_out, b.shape.rank or spec.rank
    E = b.shape.experts or spec.experts
    A = b.param("A", (r, d_in), "kaiming", fan_in=d_in)
    M = b.param("cores", (E, r, r), "kaiming", fan_in=r)
    B = b.param("B", (d_out, r), "up")
    h = b.add(Linear(id="h", src="x", weight=A, origin=f"{origin}.down"))
    route = _flat_router(b, spec.router, E, origin, src=h, width=r)
    out = b.add(CoreExperts(id="mix", src=h, routing=route, cores=M, b=B,
                            scale=lora_scale(spec.alpha, r, spec.scaling), origin=origin))
    for i, aux in enumerate(spec.aux_losses):
        b.aux.append(b.add(AuxLoss(id=f"aux{i}", routing=route, kind=aux.kind, weight=aux.weight,
                                   delta=getattr(aux, "delta", 0.0), groups=getattr(aux, "groups", 1),
                                   origin=f"{origin}.aux_losses[{i}]")))
    return out


def _rank_tasks(b: _Builder, spec: RankTasks, origin: str) -> str:
    """MoRA-CL: per task t, ``A_t{t} (r, d_in)`` and ``B_t{t} (d_out, r)``, buffers for every task but
    the last; ``h = A x`` over every task's experts routes itself (no router GEMM)."""
    d_in, d_out, r = b.shape.d_in, b.shape.d_out, spec.ranks_per_task
    As, Bs = [], []
    for t in range(spec.tasks):
        learn = t == spec.tasks - 1
        As.append(b.param(f"A_t{t}", (r, d_in), "kaiming", fan_in=d_in, trainable=learn, buffer=not learn))
        Bs.append(b.param(f"B_t{t}", (d_out, r), "up", trainable=learn, buffer=not learn))
    A = As[0] if len(As) == 1 else Concat(tuple(As), 0)
    B = Bs[0] if len(Bs) == 1 else Concat(tuple(Bs), 1)
    h = b.add(Linear(id="h", src="x", weight=A, origin=f"{origin}.down"))
    gate = SelfActivated(k=spec.k, temperature=spec.temperature, threshold=spec.threshold)
    route = b.add(Route(id="route", src=h, gate=gate, experts=spec.experts, origin=f"{origin}.router"))
    g = b.add(BlockGate(id="gated", src=h, routing=route, rank=1, scale=lora_scale(spec.alpha, r, "alpha_over_rank"),
                        origin=origin))
    return b.add(Linear(id="mix", src=g, weight=B, origin=f"{origin}.up"))


def _kronecker_pool(b: _Builder, spec: KroneckerPool, origin: str) -> str:
    """EPT: the shared meta-seed ``meta_B (⌈d_out/s_min⌉, R)``, ``meta_A (R, ⌈d_in/s_min⌉)``, one kernel
    ``K{i} (s_i, s_i)`` per expert; a router on the token (plus its task's embedding); the mixture
    of Kronecker experts, times the task's frequency compensation; the aux losses. Any widths: a
    kernel that does not divide one cuts its expert's product (:class:`KroneckerMix`)."""
    d_in, d_out, R = b.shape.d_in, b.shape.d_out, b.shape.rank or spec.rank
    s0 = min(spec.kernels)
    w, h = -(-d_in // s0), -(-d_out // s0)  # the largest slices, of the smallest kernel
    A = b.param("meta_A", (R, w), "gaussian", fan_in=w)
    B = b.param("meta_B", (h, R), "gaussian", fan_in=R)
    kernels = tuple(b.param(f"K{i}", (s, s), "up") for i, s in enumerate(spec.kernels))
    src, table = "x", None
    if spec.tasks is not None:
        table = b.param("task_embedding", (spec.tasks, d_in), "gaussian", fan_in=d_in)
        src = b.add(TaskEmbed(id="x_task", src="x", table=table, origin=f"{origin}.tasks"))
    route = _flat_router(b, spec.router, spec.experts, origin, src=src)
    out = b.add(KroneckerMix(id="mix", src="x", routing=route, a=A, b=B, kernels=kernels, d_out=d_out,
                             scale=lora_scale(spec.alpha, R, spec.scaling), origin=origin))
    if spec.task_frequencies is not None:
        out = b.add(TaskScale(id="per_task", src=out, factors=tuple(spec.task_frequencies),
                              origin=f"{origin}.task_frequencies"))
    for i, aux in enumerate(spec.aux_losses):
        if not isinstance(aux, TaskContrastiveLoss):
            _aux_losses(b, [aux], route, origin, spec.router, first=i)
        elif table is not None:
            b.aux.append(b.add(TaskContrastive(id=f"aux{i}", src="x", table=table, weight=aux.weight,
                                               temperature=aux.temperature, origin=f"{origin}.aux_losses[{i}]")))
    return out


def _flat_router(b: _Builder, router, E: int, origin: str, src: str = "x", width: int | None = None) -> str:
    """The router of E experts reading ``src`` of ``width`` (the site input, or CoMoL's core space)."""
    d_in = width or b.shape.d_in
    if isinstance(router, StaticRouter):
        w = b.param("router_w", (E,), "one" if router.start == "sum" else "mean", trainable=router.trainable,
                    buffer=not router.trainable)
        return b.add(Route(id="route", src="x", gate=StaticGate(weights=w), experts=E, origin=f"{origin}.router"))
    if isinstance(router, (TaskRouter, TaskEmbeddingRouter)):
        return _task_router(b, router, E, origin)
    if isinstance(router, XLoRARouter):
        where = f"{origin}.router"
        s = b.add(LayerScalings(id="scalings", src="x", experts=E, origin=where))
        gate = XLoRAScale(top_k=router.top_k, softmax_topk=router.softmax_topk, weight=router.global_scaling_weight)
        return b.add(Route(id="route", src=s, gate=gate, experts=E, origin=where))
    W = b.param("router_w", (E, d_in), "kaiming", fan_in=d_in)
    if isinstance(router, TopKRouter) and router.jitter > 0:
        src = b.add(Jitter(id="jitter", src=src, eps=router.jitter, origin=f"{origin}.router.jitter"))
    logits = b.add(Linear(id="logits", src=src, weight=W, origin=f"{origin}.router"))
    match router:
        case TopKRouter():
            gate = SoftmaxTopK(k=router.k, renormalize=router.renormalize, temperature=router.temperature)
        case DenseRouter():
            gate = DenseSoftmax(temperature=router.temperature)
        case DenseTrainTopKRouter():
            gate = DenseTrainTopK(infer_k=router.k, renormalize=router.renormalize, temperature=router.temperature)
        case SigmoidTopKRouter():
            gate = SigmoidTopK(k=router.k, balance=b.param("balance", (E,), "zero", trainable=False, buffer=True))
        case TopPRouter():
            gate = TopPTsallis(k=router.k, top_p=router.p, q=router.entropy_index, threshold=router.entropy_threshold)
        case _:
            raise TypeError(router)
    return b.add(Route(id="route", src=logits, gate=gate, experts=E, origin=f"{origin}.router"))


def _task_router(b: _Builder, router, E: int, origin: str) -> str:
    """Scores from the task id (one-hot for hard routing, a learned table for task embeddings),
    plus the token logits when the router reads both; a softmax gate on them."""
    where = f"{origin}.router"
    if isinstance(router, TaskRouter):
        z = b.add(TaskScores(id="task_scores", src="x", experts=E, tasks=E, origin=where))
        return b.add(Route(id="route", src=z, gate=SoftmaxTopK(k=1), experts=E, origin=where))
    tasks = router.tasks or E
    table = b.param("task_table", (tasks, E), "zero")
    src, token = "x", router.reads == "token_and_task"
    if token:
        W = b.param("router_w", (E, b.shape.d_in), "kaiming", fan_in=b.shape.d_in)
        src = b.add(Linear(id="logits", src="x", weight=W, origin=where))
    z = b.add(TaskScores(id="task_scores", src=src, experts=E, tasks=tasks, table=table, token_scores=token,
                         origin=where))
    gate = (DenseSoftmax(temperature=router.temperature) if router.k is None else
            SoftmaxTopK(k=router.k, renormalize=router.renormalize, temperature=router.temperature))
    return b.add(Route(id="route", src=z, gate=gate, experts=E, origin=where))


def _tree(b: _Builder, spec: ResidualTree, origin: str) -> str:
    """S'MoRE: router down-projection, top-down tree router, bottom-up propagation, final
    projection. Parameter names (official names in docs/smore_conventions.md): ``down_w/b``,
    ``keys{l}``, ``query{l}_w1/b1/w2/b2``, ``noise{l}``, ``A{l}``, ``A{l}_bias``, ``B{l}``,
    ``B{l}_bias``, ``W{l}``, ``W{l}_bias`` (l >= 1), ``proj_w``, ``proj_b``; all ``[out, in]``."""
    d_in, d_out = b.shape.d_in, b.shape.d_out
    rt = spec.router
    m = rt.down_dim or d_in
    widths, fanouts, keys = spec.widths(), spec.fanouts(), spec.key_dims()
    bias = spec.bias
    Wd = b.param("down_w", (m, d_in), "kaiming", fan_in=d_in)
    bd = b.param("down_b", (m,), "bias") if bias else None
    xd = b.add(Linear(id="x_down", src="x", weight=Wd, bias=bd, origin=f"{origin}.router.down_dim"))
    gate_levels = []
    for l, lv in enumerate(spec.levels):
        g = keys[l]
        in_l = m + sum(keys[l + 1:])
        gate_levels.append(TreeGateLevel(
            experts=lv.experts, fanout=fanouts[l],
            keys=b.param(f"keys{l}", (lv.experts, g), "keys", fan_in=g),
            w1=b.param(f"query{l}_w1", (g, in_l), "kaiming", fan_in=in_l),
            b1=b.param(f"query{l}_b1", (g,), "bias"),
            w2=b.param(f"query{l}_w2", (g, g), "kaiming", fan_in=g),
            b2=b.param(f"query{l}_b2", (g,), "bias"),
            noise=b.param(f"noise{l}", (lv.experts, in_l), "zero") if rt.gate == "noisy_topk" else None))
    route = b.add(TreeRoute(id="route", src=xd, levels=tuple(gate_levels), gate=rt.gate,
                            conventions=spec.conventions, query_activation=rt.query_activation,
                            temperature=rt.temperature, origin=f"{origin}.router"))
    level_params = []
    b_init, proj_init = ("kaiming", "up") if spec.start == "w_final_zero" else ("up", "kaiming")
    for l, lv in enumerate(spec.levels):
        s, r, dn, dp = lv.experts, lv.rank, widths[l + 1], widths[l]
        level_params.append(TreeLevelParams(
            a=b.param(f"A{l}", (s, r, d_in), "kaiming", fan_in=d_in),
            b=b.param(f"B{l}", (s, dn, r), b_init, fan_in=r),
            scale=lora_scale(lv.alpha, r, lv.scaling) if lv.alpha is not None else 1.0,
            a_bias=b.param(f"A{l}_bias", (s, r), "bias") if bias else None,
            b_bias=b.param(f"B{l}_bias", (s, dn), "bias") if bias else None,
            w=b.param(f"W{l}", (dn, dp), "kaiming", fan_in=dp) if l > 0 else None,
            w_bias=b.param(f"W{l}_bias", (dn,), "bias") if (l > 0 and bias) else None))
    src = _dropped(b, spec.dropout, "drop", origin)
    hroot = b.add(TreeMix(id="tree", src=src, routing=route, levels=tuple(level_params),
                          activation=spec.activation, position=spec.activation_position,
                          origin=f"{origin}.levels"))
    Wp = b.param("proj_w", (d_out, widths[-1]), proj_init, fan_in=widths[-1])
    bp = b.param("proj_b", (d_out,), "bias") if bias else None
    out = b.add(Linear(id="proj", src=hroot, weight=Wp, bias=bp, origin=f"{origin}.final_projection"))
    for i, aux in enumerate(spec.aux_losses):
        b.aux.append(b.add(AuxLoss(id=f"aux{i}", routing=route, kind=aux.kind, weight=aux.weight,
                                   origin=f"{origin}.aux_losses[{i}]")))
    return out


def build_block_graph(pool: ExpertPool, linears: dict[str, BlockLinear], activation: str,
                      roles: Sequence[str], shape: SiteShape, origin: str = "adapter") -> Graph:
    """The plain IR of ``pool`` as experts over an FFN block with ``linears`` (``gate``, ``up``,
    ``down``) and ``activation``: a router, one :class:`~moleforge.ir.ExpertFFN` and the pool's
    aux losses. ``A_<role> (E, r, d_in)`` and ``B_<role> (E, d_out, r)`` on the linears in
    ``roles`` (buffers with ``frozen_experts``), with ``magnitude: true`` DoRA's ``magnitude_<role>
    (E, d_out)`` beside them; frozen inputs ``W_<role>`` and ``b_<role>``."""
    b = _Builder(shape)
    E, r = shape.experts or pool.experts, shape.rank or pool.rank
    route = _flat_router(b, pool.router, E, origin)
    k = pool.router.k
    scale = lora_scale(pool.alpha, r, pool.scaling, active=(k or E) * r, total=E * r)
    learn = not pool.frozen_experts
    frozen: list[ParamDecl] = []
    experts: dict[str, ExpertLinear] = {}
    for role, info in linears.items():
        w_name, b_name = frozen_names(role)
        frozen.append(ParamDecl(name=w_name, shape=(info.d_out, info.d_in), init="frozen", trainable=False))
        bias = None
        if info.bias:
            frozen.append(ParamDecl(name=b_name, shape=(info.d_out,), init="frozen", trainable=False))
            bias = ParamRef(b_name, (info.d_out,))
        a = up = m = None
        if role in roles:
            a = b.param(f"A_{role}", (E, r, info.d_in), "kaiming", fan_in=info.d_in, trainable=learn,
                        buffer=not learn)
            up = b.param(f"B_{role}", (E, info.d_out, r), "up", trainable=learn, buffer=not learn)
            if pool.magnitude:  # DoRA: offsets of the experts' magnitudes, 0 at the start (block_nodes)
                m = b.param(f"magnitude_{role}", (E, info.d_out), "zero", trainable=learn, buffer=not learn)
        experts[role] = ExpertLinear(weight=ParamRef(w_name, (info.d_out, info.d_in)), bias=bias, a=a, b=up,
                                     scale=scale, magnitude=m)
    out = b.add(ExpertFFN(id="experts", src="x", routing=_capacity(b, pool, route, origin), up=experts["up"],
                          gate=experts.get("gate"), down=experts["down"], activation=activation,
                          origin=origin, dropout=pool.dropout))  # type: ignore[arg-type]
    _aux_losses(b, pool.aux_losses, route, origin, pool.router)
    return b.graph(out).replace(frozen=tuple(frozen))
