"""Shared by the FFN-block tests: a small routed expert pool, a spec putting it on every FFN
block, the routed blocks of a model; random plain block graphs with their tensors, and the
interpreter's outputs and gradients on them."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

import moleforge as mf
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy
from moleforge.compiler.build import SiteShape, build_block_graph
from moleforge.integrations.block_module import MoleforgeBlock
from moleforge.integrations.ffn_trace import ACTIVATION_NAMES, BlockLinear
from moleforge.ir import ExpertFFN, ExpertHidden, ExpertLoRA, Graph, interpret, print_graph, verify
from moleforge.passes.hoist_frozen_down import hoist_frozen_down
from moleforge.passes.share_frozen_projections import share_frozen_projections
from moleforge.specs import ExpertPool, StaticRouter, SwitchLoadBalance, TopKRouter
from strategies import FLAT_ROUTERS, JITTERS, SCALINGS, aux_losses, capacities, make_params, routers, takes_capacity
from tolerances import assert_close

__all__ = ["POOL", "block_spec", "routed_blocks", "block_graphs", "block_params", "block_inputs",
           "interpret_grads", "fixed_routing", "F64", "REWRITES", "check_block_rewrite", "DROPOUTS", "block_noise",
           "dropout_noise"]

F64 = torch.float64

POOL = ExpertPool(experts=3, rank=2, alpha=4.0, router=TopKRouter(k=2),
                  aux_losses=[SwitchLoadBalance(weight=0.1)])
"""Three rank-2 experts, top-2 softmax router, Switch load balance."""


def block_spec(init: mf.Init | None = None) -> mf.AdapterSpec:
    """:data:`POOL` as experts around every FFN block (gate, up and down carry LoRAs)."""
    init = init or mf.Init()
    return mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL, init=init)])


def routed_blocks(model: nn.Module) -> dict[str, MoleforgeBlock]:
    """``{module name: routed block}`` of every FFN block the model now runs as experts."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoleforgeBlock)}


DROPOUTS = st.one_of(st.just(0.0), st.floats(0.05, 0.85))
"""The experts' LoRA dropout p: none, or in (0, 0.9)."""

MAGNITUDES = st.booleans()
"""Whether the experts are DoRA experts (``magnitude: true``)."""


@st.composite
def block_graphs(draw, kinds: tuple[str, ...] = FLAT_ROUTERS, jitters: tuple[float, ...] = JITTERS,
                 dropouts: st.SearchStrategy[float] = DROPOUTS, magnitudes: st.SearchStrategy[bool] = MAGNITUDES
                 ) -> Graph:
    """Plain IR of random FFN blocks: gated or not, any activation, biases, a router of ``kinds``
    (top-k with or without renormalisation and with a jitter of ``jitters``, dense, sigmoid
    top-k, static) with its aux losses (the z-loss too), expert capacity, experts on a random non-empty
    subset of linears, trained or frozen, the LoRAs' dropout of ``dropouts``, DoRA experts or not
    (``magnitudes``; :func:`block_params` draws their magnitudes non-zero)."""
    d, d_ff, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 6))
    E = draw(st.integers(1, 4))
    linears = {"up": BlockLinear("up", "up", d, d_ff, draw(st.booleans()), False),
               "down": BlockLinear("down", "down", d_ff, d_out, draw(st.booleans()), False)}
    if draw(st.booleans()):
        linears["gate"] = BlockLinear("gate", "gate", d, d_ff, draw(st.booleans()), False)
    roles = draw(st.sets(st.sampled_from(sorted(linears)), min_size=1))
    router = draw(routers(E, kinds, jitters))
    pool = ExpertPool(experts=E, rank=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([None, 4.0])),
                      scaling=draw(st.sampled_from(SCALINGS)), router=router,
                      aux_losses=draw(aux_losses(router)),
                      frozen_experts=draw(st.booleans()) and (E > 1 or isinstance(router, StaticRouter)),
                      capacity_factor=draw(capacities()) if takes_capacity(router) else None,
                      dropout=draw(dropouts), magnitude=draw(magnitudes))
    graph = build_block_graph(pool, linears, draw(st.sampled_from(ACTIVATION_NAMES)), sorted(roles),
                              SiteShape(label="block", d_in=d, d_out=d_out))
    return verify(graph)


def block_noise(graph: Graph, n, T: int, gen: torch.Generator) -> tuple[torch.Tensor, ...] | None:
    """The interpreter's ``noise[n.id]`` of block node ``n`` with dropout in training: one ``ν (T, k,
    width)`` per LoRA it computes, gate, up, down in turn, drawn from ``gen`` as the lowered module
    draws them from its noise generator (``k``: the routing's experts per token, all of them when
    dense); ``None`` for other nodes."""
    if not isinstance(n, (ExpertFFN, ExpertHidden, ExpertLoRA)) or n.dropout == 0:
        return None
    route = graph.routing(n.routing)
    k = route.k or route.experts
    if isinstance(n, ExpertLoRA):
        widths = [graph.per_expert(n.src).width]
    else:
        d, d_ff = graph.width(n.src), n.up.weight.shape[0]
        lins = [("gate", d), ("up", d)] + ([("down", d_ff)] if isinstance(n, ExpertFFN) else [])
        widths = [w for role, w in lins if getattr(n, role) is not None and getattr(n, role).a is not None]
    return tuple(torch.rand(T, k, w, generator=gen, dtype=F64) for w in widths)


def block_params(graph: Graph, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    """Every stored tensor random (non-zero B) plus random frozen block weights."""
    params = make_params(graph, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    for d in graph.frozen:
        params[d.name] = torch.randn(d.shape, generator=gen, dtype=dtype) * 0.6
    return params


def block_inputs(graph: Graph, seed: int, T: int) -> torch.Tensor:
    return torch.randn(T, graph.d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)


def interpret_grads(graph: Graph, params, x, w, routing=None, noise=None):
    """Output, aux and the gradients of ``Σ out ⊙ w + aux`` wrt x and the stored tensors (in
    training with the block nodes' dropout ``noise``)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    xl = x.clone().requires_grad_(True)
    res = interpret(graph, leaves, xl, routing=routing, noise=noise, training=noise is not None)
    loss = (res.output * w).sum() + res.aux_total
    names = [d.name for d in graph.params]
    grads = torch.autograd.grad(loss, [xl] + [leaves[n] for n in names], allow_unused=True)
    return res, dict(zip(["x"] + names, grads, strict=True))


def fixed_routing(res) -> dict:
    return {rid: idx for rid, idx in res.routes.items() if idx is not None}


REWRITES = {"share_frozen_projections": share_frozen_projections, "hoist_frozen_down": hoist_frozen_down,
            "both": lambda g: hoist_frozen_down(share_frozen_projections(g))}
"""The block rewrites alone and as the block pipeline runs them."""


def dropout_noise(graph: Graph, T: int, seed: int) -> dict:
    """Every block node's dropout draws (:func:`block_noise`), in node order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    return {n.id: nus for n in graph.nodes if (nus := block_noise(graph, n, T, gen)) is not None}


def check_block_rewrite(rewrite, graph: Graph, seed: int, T: int) -> None:
    """The properties of a block rewrite on one graph: the output verifies, the input is not
    mutated, the rewrite is idempotent, and the interpreter gives the same outputs, aux loss and
    gradients (x and every stored tensor) under the original's routing; with dropout, in training
    too, each graph's nodes drawing their masks in node order from generators seeded alike."""
    before = print_graph(graph)
    out = verify(rewrite(graph))
    assert print_graph(graph) == before, "the rewrite mutated its input"
    assert rewrite(out) == out, "the rewrite is not idempotent"
    params, x = block_params(graph, seed), block_inputs(graph, seed, T)
    w = torch.randn(T, graph.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    noises = [(None, None)]
    if any(getattr(n, "dropout", 0) for n in graph.nodes):
        noises.append((dropout_noise(graph, T, seed + 3), dropout_noise(out, T, seed + 3)))
    for before_noise, after_noise in noises:
        ref, ref_grads = interpret_grads(graph, params, x, w, noise=before_noise)
        got, got_grads = interpret_grads(out, params, x, w, routing=fixed_routing(ref), noise=after_noise)
        assert_close(got.output, ref.output)
        assert_close(got.aux_total, ref.aux_total)
        for k, g in ref_grads.items():
            if g is not None:
                assert_close(got_grads[k], g, msg=f"gradient of {k}")


def cpu_policy(flag: str) -> KernelPolicy:
    """The kernel policy with the CPU kernel for routed blocks on (``"1"``: built now, a failed
    build is an error) or off (``"0"``: the torch ops)."""
    return KernelPolicy(triton="off", cpu="on").with_cpu_build() if flag == "1" else TORCH_OPS
