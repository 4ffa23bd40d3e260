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
    CV2ImportanceLoad,
    DenseRouter,
    ExpertPool,
    ImplicitTopKRouter,
    LocalizedBalance,
    LoRA,
    PerExpert,
    RankPartition,
    ResidualTree,
    Shared,
    SigmoidTopKRouter,
    SparseRandom,
    SwitchLoadBalance,
    TopKRouter,
    TreeLevel,
    TreeRouter,
)

small = st.integers(1, 6)


@st.composite
def loras(draw):
    return LoRA(rank=draw(small), alpha=draw(st.sampled_from([None, 4.0, 16.0])),
                scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])))


@st.composite
def routers(draw, experts: int):
    kind = draw(st.sampled_from(["topk", "dense", "sigmoid_topk"]))
    k = draw(st.integers(1, experts))
    if kind == "topk":
        return TopKRouter(k=k, renormalize=draw(st.booleans()), temperature=draw(st.sampled_from([1.0, 0.5])))
    if kind == "dense":
        return DenseRouter(temperature=draw(st.sampled_from([1.0, 2.0])))
    return SigmoidTopKRouter(k=k)


@st.composite
def pools(draw):
    E = draw(st.integers(1, 5))
    if draw(st.integers(0, 5)) == 0:  # FlyLoRA-style
        return ExpertPool(experts=E, rank=1, down=SparseRandom(density=0.5),
                          router=ImplicitTopKRouter(k=draw(st.integers(1, E))), alpha=2.0,
                          scaling="alpha_over_total_rank")
    router = draw(routers(E))
    down, up = draw(st.sampled_from([(PerExpert(), "per_expert"), (Shared(), "per_expert"),
                                     (PerExpert(), "shared")]))
    aux = []
    if isinstance(router, TopKRouter) and draw(st.booleans()):
        aux.append(SwitchLoadBalance(weight=0.1))
    if not isinstance(router, SigmoidTopKRouter) and draw(st.booleans()):
        aux.append(draw(st.sampled_from([CV2ImportanceLoad(weight=0.1), LocalizedBalance(weight=0.1, delta=0.2)])))
    return ExpertPool(experts=E, rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([None, 8.0])),
                      down=down, up=up, router=router, aux_losses=aux,
                      shared_expert=draw(st.one_of(st.none(), loras())))


@st.composite
def rank_partitions(draw):
    block = draw(st.integers(1, 2))
    blocks = draw(st.integers(1, 5))
    return RankPartition(rank=block * blocks, block=block, router=SigmoidTopKRouter(k=draw(st.integers(1, blocks))))


@st.composite
def trees(draw, max_leaves: int = 8):
    gate = draw(st.sampled_from(["switch", "dense", "noisy_topk"]))
    conventions = draw(st.sampled_from(["paper", "official"]))
    L = draw(st.integers(1, 3))
    levels, leaves = [], 1
    for _ in range(L):
        s = draw(st.integers(1, 4))
        f = s if gate == "dense" else draw(st.integers(1, s))
        if leaves * f > max_leaves:
            f = 1 if gate != "dense" else s
            s = s if gate != "dense" else 1
            f = s if gate == "dense" else f
        leaves *= f
        levels.append(TreeLevel(experts=s, rank=draw(st.integers(1, 3)), fanout=f,
                                alpha=draw(st.sampled_from([None, 2.0]))))
    aux = []
    if gate != "dense" and draw(st.booleans()):
        aux.append(draw(st.sampled_from([SwitchLoadBalance(weight=0.1), CV2ImportanceLoad(weight=0.1)])))
    return ResidualTree(levels=levels, activation=draw(st.sampled_from(["tanh", "relu", "identity"])),
                        router=TreeRouter(gate=gate, down_dim=draw(st.integers(2, 5)), key_dim=draw(st.integers(2, 4)),
                                          query_activation=draw(st.sampled_from(["relu", "tanh", "identity"])),
                                          temperature=1.0 if conventions == "official"
                                          else draw(st.sampled_from([1.0, 0.5]))),
                        bias=draw(st.booleans()), conventions=conventions, aux_losses=aux)


def adapters():
    return st.one_of(loras(), pools(), rank_partitions(), trees())


@st.composite
def graphs(draw, adapter_strategy=None) -> Graph:
    adapter = draw(adapter_strategy if adapter_strategy is not None else adapters())
    d_in, d_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return build_graph(adapter, SiteShape(label="site", d_in=d_in, d_out=d_out))


def make_params(graph: Graph, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Non-trivial parameters: every tensor random (no zero-initialised up-projections)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for d in graph.params:
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


def lowered(graph: Graph, params: dict[str, torch.Tensor], groups=None, policy=None):
    """``graph`` lowered to a GraphModule (float64, evaluation mode) holding ``params``, under the
    kernel ``policy`` (default: the environment's)."""
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for name, value in params.items():
            getattr(store, name).copy_(value)
    return lower(graph, store, groups, policy).eval()
