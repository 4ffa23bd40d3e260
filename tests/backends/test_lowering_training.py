"""The lowered module in training mode equals the float64 interpreter given the same noise.

The module draws the noisy tree gate's ``ε`` and router jitter's ``u`` from its
``noise_generator`` (what ``handle.seed_noise`` sets), never from torch's global generator
(seeded here to something else); the interpreter gets the same draws from a generator seeded
alike. Compared:
outputs, aux losses (with per-token samples), the gradients of the input and of every
trainable tensor (the noise projections included), and the selection counts the balancing
routers (``sigmoid_topk``, ``implicit_topk``) accumulate, against the counts of the
interpreter's selected indices. On random specs of every kind (``strategies.py``), plain and
after the default pipeline, and on random FFN blocks with their rewrites; FFN blocks with LoRA
dropout (MixLoRA's ``lora_dropout``: a mask per routed slot and LoRA, ``ir/block_nodes.py``) through
every block rewrite and the default pipeline, on the torch ops and on the compiled CPU kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ffn_block_helpers import REWRITES, block_graphs, block_noise, block_params, cpu_policy
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import counts_name, lower
from moleforge.compiler.build import SiteShape, build_block_graph, build_graph
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import Dropout, Graph, Jitter, Route, TreeRoute, interpret
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import (
    CorePool,
    DenseRouter,
    ExpertPool,
    ImplicitTopKRouter,
    LocalizedBalance,
    RankTasks,
    ResidualTree,
    SigmoidTopKRouter,
    StaticRouter,
    TopKRouter,
    TopPRouter,
    TreeLevel,
    TreeRouter,
    TsallisEntropy,
)
from strategies import adapters, graphs, inputs_for, make_params, samples_for, training_adapters
from tolerances import assert_close

F64 = torch.float64
MARGIN = 1e-7
PIPELINES = {"plain": (), "default": DEFAULT_PIPELINE}


def contexts(route: TreeRoute) -> list[int]:
    """``C_l = Π_{j>l} f_j``: the contexts pool l routes per token."""
    fan = [lv.fanout for lv in route.levels]
    return [math.prod(fan[l + 1:]) for l in range(len(fan))]


def draw_noise(graph: Graph, T: int, tree_seed: int, jitter_seed: int) -> dict:
    """The interpreter's ``noise``: what the lowered module draws in training, in node order, from
    its ``noise_generator`` (seeded with ``tree_seed``): each jitter's ``u (T, width)``, and each
    noisy tree gate's ``ε_l (T, C_l, s_l)``, pool by pool from the top; ``()`` for each
    mode-dependent gate (it selects as in training). Torch's global generator
    (seeded with ``jitter_seed``) must play no part."""
    jitter = tree = torch.Generator().manual_seed(tree_seed)  # dropout draws from it too
    noise = {}
    for n in graph.nodes:
        if isinstance(n, (Jitter, Dropout)):
            noise[n.id] = (torch.rand(T, graph.width(n.src), generator=jitter, dtype=F64),)
        elif isinstance(n, TreeRoute) and n.gate == "noisy_topk":
            C, eps = contexts(n), [None] * len(n.levels)
            for l in reversed(range(len(n.levels))):
                eps[l] = torch.randn((T, C[l], n.levels[l].experts), generator=tree, dtype=F64)
            noise[n.id] = tuple(eps)
        elif isinstance(n, Route) and n.gate.mode_dependent:
            noise[n.id] = ()  # training selection (MoRA-CL's top-k instead of its threshold)
        elif (nus := block_noise(graph, n, T, jitter)) is not None:
            noise[n.id] = nus  # FFN-block experts' LoRA dropout
    return noise


def _probe(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)


def _reference(graph: Graph, params: dict, x, samples, noise):
    """The interpreter's result and the gradients of ``Σ y ⊙ probe + aux`` (x, trainable tensors)."""
    trainable = [d.name for d in graph.params if d.trainable]
    leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
    xl = x.clone().requires_grad_(True)
    res = interpret(graph, {**params, **leaves}, xl, samples=samples, noise=noise, training=True)
    loss = (res.output * _probe(res.output)).sum() + res.aux_total
    grads = torch.autograd.grad(loss, [xl, *leaves.values()], allow_unused=True)
    return res, dict(zip(["x", *leaves], grads))


def _module(graph: Graph, params: dict, policy=None):
    store = ParamStore(graph.params, dtype=F64)
    with torch.no_grad():
        for d in graph.params:
            getattr(store, d.name).copy_(params[d.name])
    return lower(graph, store, policy=policy)


def _counts(gm, graph: Graph) -> dict[str, torch.Tensor]:
    return {n.id: getattr(gm, counts_name(n.gate.balance.name)).clone() for n in graph.nodes
            if isinstance(n, Route) and n.balances}


def check_training(graph: Graph, lowered_graph: Graph, params: dict, x, samples, tree_seed: int,
                   jitter_seed: int, policy=None) -> None:
    """``lowered_graph`` (``graph`` or a rewrite of it) lowered (under the kernel ``policy``, default:
    the environment's) and run once in training mode equals the interpreter on ``graph`` with the
    same noise: output, aux loss, gradients and selection counts (of every balancing router with more
    than one expert: a one-expert router may be folded away). An evaluation forward first counts
    nothing."""
    T = x.shape[0]
    res, want = _reference(graph, params, x, samples, draw_noise(graph, T, tree_seed, jitter_seed))
    assume(all(m > MARGIN for m in res.margins.values()))
    gm = _module(lowered_graph, params, policy)
    frozen = {"frozen": {d.name: params[d.name] for d in graph.frozen}} if graph.frozen else {}
    balancing = [n.id for n in graph.nodes if isinstance(n, Route) and n.balances and n.experts > 1]
    assert set(balancing) <= set(_counts(gm, lowered_graph)), "a router with choices keeps its counts"
    gm.eval()(x, samples, **frozen)
    assert all(c.sum() == 0 for c in _counts(gm, lowered_graph).values()), "evaluation counts no selection"
    gm.train()
    gm.noise_generator = torch.Generator().manual_seed(tree_seed)
    xl = x.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(jitter_seed)
        y, aux, _ = gm(xl, samples, **frozen)
    loss = (y * _probe(y)).sum() + (aux if aux is not None else 0.0)
    names = [d.name for d in graph.params if d.trainable]
    got = dict(zip(["x", *names], torch.autograd.grad(loss, [xl, *(getattr(gm, k) for k in names)],
                                                         allow_unused=True)))
    assert_close(y.detach(), res.output, msg="output")
    if graph.aux:
        assert_close(aux.detach(), res.aux_total.detach(), msg="aux loss")
    else:
        assert aux is None
    for k, w in want.items():
        zeros = torch.zeros_like(x if k == "x" else params[k])
        assert_close(zeros if got[k] is None else got[k], zeros if w is None else w, msg=f"gradient of {k}")
    for rid, counts in _counts(gm, lowered_graph).items():
        index = res.routes[rid]
        expected = torch.bincount(index.reshape(-1), minlength=graph.node(rid).experts)
        assert torch.equal(counts, expected.to(counts.dtype)), f"selection counts of %{rid}"


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@given(graph=graphs(st.one_of(training_adapters(), adapters())), data=st.data())
def test_training_mode_matches_interpreter(pipeline, graph, data):
    params = make_params(graph, data.draw(st.integers(0, 2**16), label="param seed"))
    x = data.draw(inputs_for(graph), label="x")
    samples = data.draw(samples_for(x.shape[0]), label="samples")
    seeds = data.draw(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)), label="tree, jitter seeds")
    check_training(graph, run_pipeline(graph, PIPELINES[pipeline]), params, x, samples, *seeds)


@given(graph=block_graphs(kinds=("topk", "sigmoid_topk"), jitters=(0.1, 0.5)),
       rewrite=st.sampled_from(["none", *sorted(REWRITES)]), data=st.data())
def test_training_mode_of_blocks_matches_interpreter(graph, rewrite, data):
    """FFN blocks: router jitter (MixLoRA), sigmoid top-k counts, through every block rewrite."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = data.draw(inputs_for(graph), label="x")
    samples = data.draw(samples_for(x.shape[0]), label="samples")
    lowered_graph = graph if rewrite == "none" else REWRITES[rewrite](graph)
    check_training(graph, lowered_graph, block_params(graph, seed), x, samples, seed + 1, seed + 2)


BLOCK_FORMS = {"plain": lambda g: g, **REWRITES, "default pipeline": lambda g: run_pipeline(g, DEFAULT_PIPELINE)}
"""The forms a block is lowered in: as built, each block rewrite, the whole default pipeline."""


@given(graph=block_graphs(dropouts=st.floats(0.05, 0.85)), form=st.sampled_from(sorted(BLOCK_FORMS)),
       kernel=st.sampled_from(["0", "1"]), data=st.data())
def test_block_lora_dropout_in_training_matches_interpreter(graph, form, kernel, data):
    """Dropout p in (0, 0.9) on the experts' LoRAs: outputs and the gradients of x and every trainable
    tensor equal the interpreter's on the same masks, whichever kernel the policy picks (``"1"``:
    the compiled CPU kernel; ``"0"``: the torch ops) and whatever form the block is lowered in."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = data.draw(inputs_for(graph), label="x")
    samples = data.draw(samples_for(x.shape[0]), label="samples")
    check_training(graph, BLOCK_FORMS[form](graph), block_params(graph, seed), x, samples, seed + 1, seed + 2,
                   cpu_policy(kernel))


def _gated_block(router, dropout: float = 0.5, roles=("down", "gate", "up")) -> Graph:
    lin = {"up": BlockLinear("up", "up", 4, 5, True, False), "down": BlockLinear("down", "down", 5, 3, True, False),
           "gate": BlockLinear("gate", "gate", 4, 5, False, False)}
    pool = ExpertPool(experts=3, rank=2, router=router, dropout=dropout)
    return build_block_graph(pool, lin, "silu", list(roles), SiteShape(label="block", d_in=4, d_out=3))


@pytest.mark.parametrize("kernel", ["0", "1"])
@pytest.mark.parametrize("form", sorted(BLOCK_FORMS))
@pytest.mark.parametrize("router", [TopKRouter(k=2), DenseRouter()], ids=["top2", "dense"])
@given(seed=st.integers(0, 2**16), T=st.integers(1, 9))
def test_each_lora_of_a_gated_block_reads_its_own_mask(router, form, kernel, seed, T):
    """Gate, up and down LoRAs all present (the random blocks above hold all three in few examples): a
    mask read by the wrong LoRA, or drawn in another order, changes the output."""
    graph = _gated_block(router)
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    check_training(graph, BLOCK_FORMS[form](graph), block_params(graph, seed), x, None, seed + 1, seed + 2,
                   cpu_policy(kernel))


@pytest.mark.parametrize("kernel", ["0", "1"])
def test_block_dropout_acts_in_training_only_and_evaluation_draws_nothing(kernel):
    """Evaluation: the output of the same block without dropout, bit for bit, and the noise generator
    untouched (no mask drawn). Training: another output, the same for the same seed."""
    graph = run_pipeline(_gated_block(TopKRouter(k=2)), DEFAULT_PIPELINE)
    clean = run_pipeline(_gated_block(TopKRouter(k=2), dropout=0.0), DEFAULT_PIPELINE)
    params = block_params(graph, 1)
    frozen = {"frozen": {d.name: params[d.name] for d in graph.frozen}}
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gm, ref = _module(graph, params, cpu_policy(kernel)), _module(clean, params, cpu_policy(kernel)).eval()
    gm.noise_generator = torch.Generator().manual_seed(5)
    state = gm.noise_generator.get_state()
    y_eval = gm.eval()(x, **frozen)[0]
    assert torch.equal(gm.noise_generator.get_state(), state), "evaluation drew dropout masks"
    assert torch.equal(y_eval, ref(x, **frozen)[0])
    runs = []
    for seed in (5, 5, 6):
        gm.train().noise_generator = torch.Generator().manual_seed(seed)
        runs.append(gm(x, **frozen)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], y_eval)


# ---- the properties are not vacuous ----------------------------------------------------------

def _has(adapter, predicate) -> bool:
    router = getattr(adapter, "router", adapter if isinstance(adapter, RankTasks) else None)  # MoRA-CL routes itself
    return router is not None and predicate(adapter, router)


FEATURES = {
    "static router, trainable": lambda a, r: isinstance(r, StaticRouter) and r.trainable,
    "static router, fixed": lambda a, r: isinstance(r, StaticRouter) and not r.trainable,
    "top-k jitter": lambda a, r: isinstance(r, TopKRouter) and r.jitter > 0,
    "dense in training, top-k in evaluation, RSL": lambda a, r: type(r).__name__ == "DenseTrainTopKRouter"
    and any(x.kind == "rsl" for x in a.aux_losses),
    "frozen experts": lambda a, r: getattr(a, "frozen_experts", False),
    "frozen experts with a shared expert": lambda a, r: getattr(a, "frozen_experts", False)
    and a.shared_expert is not None,
    "sigmoid top-k with an aux loss": lambda a, r: isinstance(r, SigmoidTopKRouter) and bool(a.aux_losses),
    "implicit top-k": lambda a, r: isinstance(r, ImplicitTopKRouter),
    "localized balance in groups": lambda a, r: any(isinstance(x, LocalizedBalance) and x.groups > 2
                                                    for x in getattr(a, "aux_losses", ())),
    "input dropout": lambda a, r: getattr(a, "dropout", 0) > 0,
    "expert capacity": lambda a, r: getattr(a, "capacity_factor", None) is not None,
    "router z-loss": lambda a, r: any(x.kind == "z_loss" for x in getattr(a, "aux_losses", ())),
    "a rank per expert": lambda a, r: getattr(a, "ranks", None) is not None,
    "a rank per expert, top-k": lambda a, r: getattr(a, "ranks", None) is not None and r.k is not None,
    "shared expert groups": lambda a, r: getattr(getattr(a, "shared_expert", None), "kind", "") == "shared_experts",
    "rsLoRA tree level": lambda a, r: any(lv.scaling == "rslora" and lv.alpha for lv in getattr(a, "levels", [])),
    "noisy tree gate": lambda a, r: isinstance(r, TreeRouter) and r.gate == "noisy_topk",
    "tree, child_v2 position": lambda a, r: getattr(a, "activation_position", "") == "child_v2",
    "tree, own key width": lambda a, r: any(getattr(lv, "key_dim", None) for lv in getattr(a, "levels", [])),
    "tree, no down-projection": lambda a, r: isinstance(r, TreeRouter) and r.down_dim is None,
    "official dense tree, fanout ignored": lambda a, r: isinstance(r, TreeRouter) and r.gate == "dense"
    and a.conventions == "official" and any(lv.fanout not in (None, lv.experts) for lv in a.levels),
    "top-p router with the entropy loss": lambda a, r: isinstance(r, TopPRouter) and any(
        isinstance(x, TsallisEntropy) for x in a.aux_losses),
    "core-space experts": lambda a, r: isinstance(a, CorePool),
    "rank-1 experts of several tasks": lambda a, r: isinstance(a, RankTasks) and a.tasks > 1,
}


ROUTERLESS = {
    "DoRA magnitudes": lambda a: getattr(a, "magnitude", False),
    "LoRA dropout": lambda a: a.kind == "lora" and a.dropout > 0,
}
"""Features of adapters without a router (plain LoRA)."""


def test_strategies_draw_every_feature():
    """Each option the properties are meant to cover is drawn by ``strategies.adapters`` (in 600
    derandomized draws)."""
    seen: set[str] = set()

    @settings(max_examples=600, derandomize=True, database=None)
    @given(adapter=adapters())
    def draw(adapter):
        seen.update(name for name, feature in FEATURES.items() if _has(adapter, feature))
        seen.update(name for name, feature in ROUTERLESS.items() if feature(adapter))

    draw()
    assert seen == set(FEATURES) | set(ROUTERLESS), f"never drawn: {sorted((set(FEATURES) | set(ROUTERLESS)) - seen)}"


def _run(gm, x, seeds=None):
    if seeds is None:
        return gm.eval()(x)[0]
    gm.train()
    gm.noise_generator = torch.Generator().manual_seed(seeds[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[1])
        return gm(x)[0]


@pytest.mark.parametrize("adapter", [
    ExpertPool(experts=4, rank=2, router=TopKRouter(k=2, jitter=0.5)),
    ResidualTree(levels=[TreeLevel(experts=3, rank=2, fanout=2)] * 2, router=TreeRouter(gate="noisy_topk")),
], ids=["jitter", "noisy_tree"])
def test_training_noise_changes_the_output_and_follows_the_seeds(adapter):
    graph = build_graph(adapter, SiteShape("site", 6, 5))
    params = make_params(graph, 1)
    x = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    gm = _module(graph, params)
    clean, a, b, c = _run(gm, x), _run(gm, x, (3, 4)), _run(gm, x, (3, 4)), _run(gm, x, (5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, clean)
