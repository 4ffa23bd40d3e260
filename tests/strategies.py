"""Hypothesis strategies: random adapter specs, their IR graphs, non-trivial parameters
(every up-projection and bias drawn non-zero) and inputs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from moleforge.backends.torch_fx.init import ParamStore, init_tensor
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import Graph
from moleforge.specs import (
    CorePool,
    CV2ImportanceLoad,
    DenseRouter,
    DenseTrainTopKRouter,
    ExpertPool,
    ImplicitTopKRouter,
    KroneckerPool,
    LocalizedBalance,
    LoRA,
    LoRASource,
    PerExpert,
    PreserveLoss,
    RankPartition,
    RankTasks,
    ResidualTree,
    RouterZLoss,
    RSLLoss,
    Shared,
    SharedExperts,
    SigmoidTopKRouter,
    SoftLoadBalance,
    SparseRandom,
    StaticRouter,
    SwitchLoadBalance,
    TaskContrastiveLoss,
    TopKRouter,
    TopPRouter,
    TreeLevel,
    TreeRouter,
    TsallisEntropy,
)

small = st.integers(1, 6)

SCALINGS = ["alpha_over_rank", "rslora", "alpha_over_active_rank", "alpha_over_total_rank"]


DROPOUTS = (0.0, 0.0, 0.3)


@st.composite
def loras(draw, dropouts: tuple[float, ...] = DROPOUTS, magnitude: bool = True):
    """LoRA over every option: rank, alpha, rsLoRA, dropout, DoRA magnitudes (not for a pool's
    shared expert: ``magnitude=False``)."""
    return LoRA(rank=draw(small), alpha=draw(st.sampled_from([None, 4.0, 16.0])),
                scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])), dropout=draw(st.sampled_from(dropouts)),
                magnitude=magnitude and draw(st.booleans()))


@st.composite
def shared_experts(draw):
    """None, one LoRA (without its own dropout: it reads the pool's input) or DeepSeek-style groups."""
    return draw(st.one_of(st.none(), loras(dropouts=(0.0,), magnitude=False),
                          st.builds(SharedExperts, count=st.integers(1, 3), rank=st.integers(1, 3),
                                    alpha=st.sampled_from([None, 4.0]),
                                    scaling=st.sampled_from(["alpha_over_rank", "rslora"]))))


FLAT_ROUTERS = ("topk", "dense", "sigmoid_topk", "static", "dense_train_topk")
"""The flat routers :func:`routers` draws (``implicit_topk`` needs a FlyLoRA pool: :func:`pools`)."""

LINEAR_ROUTERS = (*FLAT_ROUTERS, "top_p")
"""The flat routers of pools and rank partitions at linear sites (FFN-block experts take no
``top_p``: its number of experts per token varies)."""

JITTERS = (0.0, 0.1, 0.5)


@st.composite
def routers(draw, experts: int, kinds: tuple[str, ...] = FLAT_ROUTERS, jitters: tuple[float, ...] = JITTERS):
    """A flat router of one of ``kinds``: top-k (renormalised or not, temperature, a jitter from
    ``jitters``), dense, sigmoid top-k (balancing rate), static (trainable or fixed weights),
    DynMoLE's top-p (p, least k, Tsallis index and threshold)."""
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(1, experts))
    if kind == "topk":
        return TopKRouter(k=k, renormalize=draw(st.booleans()), temperature=draw(st.sampled_from([1.0, 0.5])),
                          jitter=draw(st.sampled_from(jitters)))
    if kind == "dense":
        return DenseRouter(temperature=draw(st.sampled_from([1.0, 2.0])))
    if kind == "static":
        return StaticRouter(trainable=draw(st.booleans()))
    if kind == "top_p":
        return TopPRouter(k=k, p=draw(st.sampled_from([0.3, 0.6, 0.8, 1.0])),
                          entropy_index=draw(st.sampled_from([0.5, 1.0, 1.1, 2.0])),
                          entropy_threshold=draw(st.sampled_from([0.5, 0.9, 1.0])))
    if kind == "dense_train_topk":
        return DenseTrainTopKRouter(k=k, renormalize=draw(st.booleans()), temperature=draw(st.sampled_from([1.0, 0.5])))
    return SigmoidTopKRouter(k=k, bias_update_rate=draw(st.sampled_from([0.0, 1e-3, 0.1])))


@st.composite
def aux_losses(draw, router) -> list:
    """Up to one loss of each kind the router takes: ``switch_lb`` on softmax top-k only,
    ``tsallis_entropy`` on top-p only, none on a static router; weights, LoRAMoE's delta and its
    groups drawn."""
    if isinstance(router, StaticRouter):
        return []
    weight = st.sampled_from([0.1, 0.5])
    kinds = ["cv2_importance_load", "localized_balance", "soft_lb"] + (
        ["switch_lb"] if isinstance(router, TopKRouter) else []) + (
        ["tsallis_entropy"] if isinstance(router, TopPRouter) else [])
    kinds += ["rsl"] if isinstance(router, (TopKRouter, DenseRouter, DenseTrainTopKRouter)) else []
    kinds += [] if isinstance(router, ImplicitTopKRouter) else ["z_loss"]
    out = []
    chosen = draw(st.lists(st.sampled_from(kinds), max_size=2, unique=True))
    own = "tsallis_entropy" if isinstance(router, TopPRouter) else "rsl" if isinstance(router, DenseTrainTopKRouter) \
        else None
    if own is not None and own not in chosen and draw(st.booleans()):
        chosen = [own, *chosen[:1]]  # the loss DynMoLE's or LoRA-Mixer's router is made for, often
    for kind in chosen:
        if kind == "switch_lb":
            out.append(SwitchLoadBalance(weight=draw(weight)))
        elif kind == "rsl":
            out.append(RSLLoss(weight=draw(weight), entropy=draw(st.sampled_from([-0.3, 0.0, 0.4]))))
        elif kind == "cv2_importance_load":
            out.append(CV2ImportanceLoad(weight=draw(weight)))
        elif kind == "soft_lb":
            out.append(SoftLoadBalance(weight=draw(weight)))
        elif kind == "tsallis_entropy":
            out.append(TsallisEntropy(weight=draw(weight)))
        elif kind == "z_loss":
            out.append(RouterZLoss(weight=draw(weight)))
        else:
            out.append(LocalizedBalance(weight=draw(weight), delta=draw(st.sampled_from([0.0, 0.2, 0.6])),
                                        groups=draw(st.integers(1, 3))))
    return out


@st.composite
def pools(draw, kinds: tuple[str, ...] = (*LINEAR_ROUTERS, "implicit_topk"), jitters: tuple[float, ...] = JITTERS,
          magnitudes: bool = True):
    """Expert pools over every option: per-expert or shared factors, a router of ``kinds``
    (FlyLoRA's ``implicit_topk`` over a sparse random down-projection of any density, one pool
    in six when other kinds are allowed), every scaling, aux losses, a shared expert, frozen
    experts, DoRA magnitudes on experts of their own factors or sharing one (``magnitudes``: a
    frozen input ``W``)."""
    E = draw(st.integers(1, 5))
    common = dict(shared_expert=draw(shared_experts()), frozen_experts=draw(st.booleans()))
    flat = tuple(k for k in kinds if k != "implicit_topk")
    if "implicit_topk" in kinds and (not flat or draw(st.integers(0, 5)) == 0):  # FlyLoRA-style
        router = ImplicitTopKRouter(k=draw(st.integers(1, E)), bias_update_rate=draw(st.sampled_from([0.0, 1e-3])))
        common["frozen_experts"] &= E > 1  # one frozen expert under a token router: nothing trains (a SpecError)
        return ExpertPool(experts=E, rank=1, down=SparseRandom(density=draw(st.sampled_from([0.25, 0.5, 1.0]))),
                          router=router, alpha=draw(st.sampled_from([None, 2.0])),
                          scaling=draw(st.sampled_from(SCALINGS)),
                          aux_losses=draw(aux_losses(router)), capacity_factor=draw(capacities()), **common)
    router = draw(routers(E, flat, jitters))
    common["frozen_experts"] &= E > 1 or isinstance(router, StaticRouter)
    down, up = draw(st.sampled_from([(PerExpert(), "per_expert"), (Shared(), "per_expert"),
                                     (PerExpert(), "shared")]))
    ranks = None
    if isinstance(down, PerExpert) and up == "per_expert" and draw(st.booleans()):  # FlexMoRE
        ranks = draw(st.lists(st.integers(1, 4), min_size=E, max_size=E))
    scaling = draw(st.sampled_from([s for s in SCALINGS if ranks is None or s != "alpha_over_active_rank"]))
    common["magnitude"] = magnitudes and ranks is None and draw(st.integers(0, 3)) == 0  # DoRA experts, 1 pool in 4
    return ExpertPool(experts=E, rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([None, 8.0])),
                      down=down, up=up, router=router, aux_losses=draw(aux_losses(router)), ranks=ranks,
                      scaling=scaling, dropout=draw(st.sampled_from(DROPOUTS)),
                      capacity_factor=draw(capacities()) if takes_capacity(router) else None, **common)


@st.composite
def mixed_pools(draw, kinds: tuple[str, ...] = LINEAR_ROUTERS):
    """Pools of experts read from PEFT LoRA folders (named, never read: the graph is built from the
    spec alone; not in :func:`adapters`, whose specs are also compiled into models) whose
    ``trainable`` flags differ, in any interleaving: their factors are runs of
    trainable parameters and frozen buffers (``compiler/build_mixed.py``); LoRA-Mixer's ``preserve``
    loss on the trainable ones in one pool of two."""
    E = draw(st.integers(2, 5))
    flags = draw(st.lists(st.booleans(), min_size=E, max_size=E))
    if len(set(flags)) == 1:
        i = draw(st.integers(0, E - 1))
        flags[i] = not flags[i]
    router = draw(routers(E, kinds))
    aux = draw(aux_losses(router))
    if draw(st.booleans()):  # LoRA-Mixer's L_preserve on the trainable experts
        aux.append(PreserveLoss(weight=draw(st.sampled_from([0.1, 0.5]))))
    return ExpertPool(experts=E, rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([None, 8.0])),
                      scaling=draw(st.sampled_from(SCALINGS)), router=router, aux_losses=aux,
                      dropout=draw(st.sampled_from(DROPOUTS)),
                      capacity_factor=draw(capacities()) if takes_capacity(router) else None,
                      experts_from=[LoRASource(path=f"expert{i}", trainable=f) for i, f in enumerate(flags)])


def takes_capacity(router) -> bool:
    """Whether a pool with ``router`` may set ``capacity_factor``: a fixed number of experts per token."""
    return router.k is not None and router.kind not in ("top_p", "dense_train_topk")


def capacities():
    """No capacity, or a factor small enough that some slots overflow."""
    return st.sampled_from([None, None, 0.5, 1.0])


@st.composite
def rank_partitions(draw, kinds: tuple[str, ...] = LINEAR_ROUTERS, jitters: tuple[float, ...] = JITTERS):
    """SMoRA rank partitions: blocks of 1-2 ranks under a flat router of ``kinds``."""
    block = draw(st.integers(1, 2))
    blocks = draw(st.integers(1, 5))
    router = draw(routers(blocks, kinds, jitters))
    return RankPartition(rank=block * blocks, block=block, alpha=draw(st.sampled_from([None, 4.0])),
                         scaling=draw(st.sampled_from(SCALINGS)), router=router, aux_losses=draw(aux_losses(router)),
                         dropout=draw(st.sampled_from(DROPOUTS)))


@st.composite
def trees(draw, max_leaves: int = 8, gates: tuple[str, ...] = ("switch", "dense", "noisy_topk"),
          dropouts: tuple[float, ...] = (0.0,)):
    """Residual trees over every option: a gate of ``gates``, conventions (the official dense
    gate with any fanout, which it ignores), 1-3 levels of unequal pools with at most
    ``max_leaves`` leaves, per-level alpha and key widths, the router's down-projection (or none:
    ``d_in``), query activations, activations and their position, biases, aux losses, an input
    dropout of ``dropouts``."""
    gate = draw(st.sampled_from(gates))
    conventions = draw(st.sampled_from(["paper", "official"]))
    levels, leaves = [], 1
    for _ in range(draw(st.integers(1, 3))):
        room = max_leaves // leaves
        if gate == "dense":
            s = draw(st.integers(1, min(4, room)))
            f = draw(st.sampled_from([None, 1, s, s + 1])) if conventions == "official" else draw(
                st.sampled_from([None, s]))
            leaves *= s
        else:
            s = draw(st.integers(1, 4))
            f = draw(st.integers(1, min(s, room)))
            leaves *= f
        levels.append(TreeLevel(experts=s, rank=draw(st.integers(1, 3)), fanout=f,
                                alpha=draw(st.sampled_from([None, 2.0])),
                                scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])),
                                key_dim=draw(st.sampled_from([None, 2, 3]))))
    aux = []
    if gate != "dense" and draw(st.booleans()):
        aux.append(draw(st.sampled_from([SwitchLoadBalance(weight=0.1), CV2ImportanceLoad(weight=0.1)])))
    return ResidualTree(levels=levels, activation=draw(st.sampled_from(["tanh", "relu", "identity"])),
                        activation_position=draw(st.sampled_from(["all", "child", "child_v2"])),
                        router=TreeRouter(gate=gate, down_dim=draw(st.sampled_from([None, 2, 3, 5])),
                                          key_dim=draw(st.integers(2, 4)),
                                          query_activation=draw(st.sampled_from(["relu", "tanh", "identity"])),
                                          temperature=1.0 if conventions == "official"
                                          else draw(st.sampled_from([1.0, 0.5]))),
                        bias=draw(st.booleans()), conventions=conventions, aux_losses=aux,
                        dropout=draw(st.sampled_from(dropouts)))


@st.composite
def core_pools(draw):
    """CoMoL core-space pools: 1-5 experts, rank 1-4, a dense or top-k softmax router (any
    temperature, jitter), aux losses, both scalings."""
    E = draw(st.integers(1, 5))
    router = draw(routers(E, ("topk", "dense")))
    return CorePool(experts=E, rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([None, 4.0])),
                    scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])), router=router,
                    aux_losses=draw(aux_losses(router)))


@st.composite
def rank_tasks(draw):
    """MoRA-CL: 1-3 tasks of 1-3 rank-1 experts (the earlier frozen), budget, temperature, threshold."""
    r = draw(st.integers(1, 3))
    return RankTasks(ranks_per_task=r, tasks=draw(st.integers(1, 3)), k=draw(st.integers(1, r)),
                     temperature=draw(st.sampled_from([1.0, 0.5])), threshold=draw(st.sampled_from([0.0, 0.2, 0.5])),
                     alpha=draw(st.sampled_from([None, 3.0])))


@st.composite
def kronecker_pools(draw, tasks: bool = False):
    """EPT's Kronecker experts: 1-4 kernels of sizes 1-4 (the widths are drawn apart, mostly not multiples
    of them), meta-seed rank 1-3, a top-k, dense or static router, both scalings, aux losses; with ``tasks``, task
    embeddings, per-task factors and the contrastive loss (the model is then called with task ids)."""
    kernels = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    E = len(kernels)
    router = draw(routers(E, ("topk", "dense") if tasks else ("topk", "dense", "static")))
    aux = [] if isinstance(router, StaticRouter) else draw(st.lists(st.sampled_from(
        [CV2ImportanceLoad(weight=0.1), RouterZLoss(weight=0.1)]
        + ([SwitchLoadBalance(weight=0.1)] if isinstance(router, TopKRouter) else [])), max_size=1))
    n_tasks = draw(st.integers(1, 3)) if tasks else None
    frequencies = draw(st.one_of(st.none(), st.lists(st.sampled_from([0.25, 1.0, 3.0]), min_size=n_tasks,
                                                     max_size=n_tasks))) if tasks else None
    if tasks and draw(st.booleans()):
        aux = [TaskContrastiveLoss(weight=draw(st.sampled_from([0.1, 1.0])),
                                   temperature=draw(st.sampled_from([0.05, 1.0]))), *aux]
    return KroneckerPool(kernels=kernels, rank=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([None, 4.0])),
                         scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])), router=router, tasks=n_tasks,
                         task_frequencies=frequencies, aux_losses=aux)


def adapters():
    return st.one_of(loras(), pools(), rank_partitions(), trees(dropouts=DROPOUTS), core_pools(), rank_tasks(),
                     kronecker_pools())


def training_adapters():
    """Adapters that train differently from how they evaluate: a top-k router with jitter, a
    balancing router (sigmoid or implicit top-k: selection counts) or a noisy tree gate."""
    jittered = dict(kinds=("topk",), jitters=(0.1, 0.5))
    balancing = ("sigmoid_topk", "implicit_topk")
    return st.one_of(pools(**jittered), rank_partitions(**jittered), pools(kinds=balancing),
                     rank_partitions(kinds=("sigmoid_topk",)), trees(gates=("noisy_topk",)))


@st.composite
def graphs(draw, adapter_strategy=None) -> Graph:
    adapter = draw(adapter_strategy if adapter_strategy is not None else adapters())
    d_in, d_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return build_graph(adapter, SiteShape(label="site", d_in=d_in, d_out=d_out))


def make_params(graph: Graph, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Non-trivial parameters: every tensor random (no zero-initialised up-projections), and the
    frozen inputs (a DoRA site's ``W``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for d in (*graph.params, *graph.frozen):
        if d.init == "sparse_random":
            out[d.name] = init_tensor(d, "normal", 0.5, gen, dtype)
        else:
            out[d.name] = (torch.randn(d.shape, generator=gen, dtype=dtype) * 0.6)
    return out


@st.composite
def params_for(draw, graph: Graph, dtype=torch.float64):
    return make_params(graph, draw(st.integers(0, 2**16)), dtype)


@st.composite
def inputs_for(draw, graph: Graph, dtype=torch.float64):
    T = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(T, graph.d_in, generator=gen, dtype=dtype)


@st.composite
def samples_for(draw, T: int):
    """``None`` or ``(sample (T,), type (T,) or None)``: each token's sample (batch row, 1-3
    samples in order) and each sample's type label (LoRAMoE's localized balancing), as
    ``interpret`` and the lowered module's ``samples`` take them."""
    if not draw(st.booleans()):
        return None
    B = draw(st.integers(1, 3))
    sample = torch.tensor(sorted(draw(st.lists(st.integers(0, B - 1), min_size=T, max_size=T))))
    if not draw(st.booleans()):
        return sample, None
    return sample, torch.tensor(draw(st.lists(st.integers(0, 2), min_size=B, max_size=B)))[sample]


def lowered(graph: Graph, params: dict[str, torch.Tensor], groups=None, policy=None):
    """``graph`` lowered to a GraphModule (float64, evaluation mode) holding ``params``, under the
    kernel ``policy`` (default: the environment's)."""
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for d in graph.params:
            getattr(store, d.name).copy_(params[d.name])
    return lower(graph, store, groups, policy).eval()


def frozen_inputs(graph: Graph, params: dict[str, torch.Tensor]) -> dict:
    """The lowered module's ``frozen`` keyword for ``graph`` (its frozen inputs from ``params``)."""
    return {"frozen": {d.name: params[d.name] for d in graph.frozen}} if graph.frozen else {}


def xlora_scalings(graph: Graph, x: torch.Tensor) -> torch.Tensor | None:
    """The X-LoRA scalings ``(T, E)`` a site of ``graph`` reads (softmaxed, drawn from ``x``'s
    values), or ``None`` when it reads none."""
    node = next((n for n in graph.nodes if type(n).__name__ == "LayerScalings"), None)
    if node is None:
        return None
    gen = torch.Generator().manual_seed(int(x.shape[0]) * 7 + node.experts)
    return torch.softmax(torch.randn(x.shape[0], node.experts, generator=gen, dtype=x.dtype) * 2, 1)
