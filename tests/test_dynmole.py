"""DynMoLE (METHODS.md §10): the top-p ∪ top-k router with its Tsallis-entropy broadcast, its two
aux losses, a variable number of experts per token in the sparse pool (torch grouped GEMMs and
the Triton kernels: only the kept (token, expert) pairs run), and the preset on every decoder
family: parameters and Γ by their formulas, training with aux losses, save/load."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny
from moleforge.backends.runtime import ops
from moleforge.backends.runtime.ops_top_p import route_top_p
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import SpecError
from moleforge.ir import GroupedMix, interpret, nodes
from moleforge.ir.interpret_top_p import top_p_gate
from moleforge.passes import group_pools
from moleforge.specs import ExpertPool, TopPRouter
from strategies import make_params
from tolerances import assert_close

F64 = torch.float64


def _gate(**kw) -> nodes.TopPTsallis:
    return nodes.TopPTsallis(**{"k": 1, "top_p": 0.5, "q": 2.0, "threshold": 1.0, **kw})


def _hand_logits() -> torch.Tensor:
    """Scores whose softmax is ``p = (0.4, 0.3, 0.2, 0.1)``: ``Σ p² = 0.30``, so the normalised
    Tsallis entropy at q = 2 is ``(1 - 0.30) / (1 - 4⁻¹) = 0.9333``."""
    return torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=F64).log()


# ---- the semantics, worked by hand -----------------------------------------------------------

@pytest.mark.parametrize("kw, kept", [
    (dict(top_p=0.5), [0, 1]),                    # 0.4 < 0.5 <= 0.7
    (dict(top_p=0.8), [0, 1, 2]),                 # 0.7 < 0.8 <= 0.9
    (dict(top_p=0.3), [0]),                       # the most probable already reaches 0.3
    (dict(top_p=0.3, k=3), [0, 1, 2]),            # top-3 is the larger set
    (dict(top_p=0.5, threshold=0.9), [0, 1, 2, 3]),  # H = 0.933 > 0.9: broadcast
    (dict(top_p=0.5, threshold=0.95), [0, 1]),    # H = 0.933 <= 0.95
])
def test_interpreter_selection_by_hand(kw, kept):
    routing, margin = top_p_gate(_gate(**kw), _hand_logits(), {}, 4, None)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    want = torch.zeros(4, dtype=F64)
    want[kept] = p[kept]  # the kept probabilities, not renormalised
    assert_close(routing.gates[0], want)
    assert_close(routing.probs[0], p)
    assert routing.index is None and margin > 0.01


def test_interpreter_losses_by_hand():
    graph = build_graph(ExpertPool(experts=4, rank=1, router=TopPRouter(p=0.5, k=1, entropy_index=2.0,
                                                                        entropy_threshold=1.0),
                                   aux_losses=[mf.TsallisEntropy(weight=0.5), mf.SoftLoadBalance(weight=0.25)]),
                        SiteShape("s", 4, 3))
    params = make_params(graph, 0)
    params["router_w"] = torch.eye(4, dtype=F64)  # logits = x
    res = interpret(graph, params, _hand_logits())
    assert_close(res.aux["aux0"], torch.tensor(0.5 * 0.7 / 0.75, dtype=F64))
    # soft counts f̃ = g = (0.4, 0.3, 0, 0), P = p: 4 · (0.16 + 0.09) = 1
    assert_close(res.aux["aux1"], torch.tensor(0.25 * 1.0, dtype=F64))


def test_shannon_index_and_a_single_expert():
    from moleforge.ir.interpret_top_p import normalised_tsallis
    p = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0]], dtype=F64)
    assert_close(normalised_tsallis(p, 1.0), torch.tensor([1.0, 0.0], dtype=F64))
    assert_close(normalised_tsallis(p, 1.1), torch.tensor([1.0, 0.0], dtype=F64))
    assert_close(normalised_tsallis(torch.ones(3, 1, dtype=F64), 1.1), torch.zeros(3, dtype=F64))


@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 9), E=st.integers(1, 7), k=st.integers(1, 7),
       top_p=st.sampled_from([0.2, 0.6, 0.9, 1.0]), q=st.sampled_from([0.5, 1.0, 1.1, 3.0]),
       threshold=st.sampled_from([0.3, 0.9, 1.0]))
def test_runtime_router_matches_interpreter(seed, T, E, k, top_p, q, threshold):
    k = min(k, E)
    z = torch.randn(T, E, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2
    want, margin = top_p_gate(_gate(k=k, top_p=top_p, q=q, threshold=threshold), z, {}, E, None)
    if margin <= 1e-9:
        return  # a near-tie: either side is right
    got = route_top_p(z, k, top_p, q, threshold)
    assert torch.equal(got.gates != 0, want.gates != 0)
    assert_close(got.gates, want.gates)
    counts = (got.gates != 0).sum(1)
    assert bool((counts >= k).all())


# ---- variable k in the sparse pool -----------------------------------------------------------

def _varied_routing(T: int = 9, E: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top-p sets have 1 to E experts (sharp, flat and in-between tokens)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=gen, dtype=F64) * torch.linspace(0.01, 6, T, dtype=F64)[:, None]
    return z, route_top_p(z, 1, 0.9, 1.1, 1.0).gates


def test_the_routing_varies_per_token():
    _, gates = _varied_routing()
    counts = (gates != 0).sum(1)
    assert counts.min() == 1 and counts.max() == gates.shape[1] and len(set(counts.tolist())) >= 3, counts


@pytest.mark.parametrize("d_in, d_out, r", [(15, 13, 3), (16, 12, 4)])
def test_grouped_pool_runs_only_the_kept_pairs(d_in, d_out, r, monkeypatch):
    """Under a variable routing ``grouped_mix`` runs the kept (token, expert) pairs only, far
    fewer than the dense ``T·E``: the GEMMs see ``P`` rows (FLOPs ``P · 2r(d_in + d_out)`` where
    torch's counter sees them, the per-expert loop of unaligned widths; the grouped GEMMs'
    offsets end at ``P`` otherwise); values equal the dense loop's."""
    _, gates = _varied_routing()
    gates = gates.float()
    T, E = gates.shape
    gen = torch.Generator().manual_seed(1)
    x, a, b = torch.randn(T, d_in, generator=gen), torch.randn(E, r, d_in, generator=gen), torch.randn(
        E, d_out, r, generator=gen)
    rows = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda u, w, offs: rows.append(int(offs[-1])) or real(
        u, w, offs=offs))
    with FlopCounterMode(display=False) as counter:
        y = ops.grouped_mix(x, gates, None, a, b, 0.5)
    P = int((gates != 0).sum())
    assert P < T * E
    if d_in % 4:
        assert counter.get_total_flops() == P * 2 * r * (d_in + d_out) and not rows
    else:
        assert rows == [P, P]
    assert_close(y, ops.pool_mix_loop(x, gates, a, b, 0.5), "float32")


def test_grouped_top_p_pool_matches_interpreter_outputs_and_gradients():
    """A top-p pool rewritten by ``group_pools`` (a :class:`GroupedMix` over a variable routing)
    and lowered, in float64, against the interpreter of the plain graph: output, aux losses and
    the gradients of x and every parameter."""
    from backends.test_lowering import _grads, _lowered
    adapter = ExpertPool(experts=5, rank=3, alpha=4.0, router=TopPRouter(p=0.8, k=1, entropy_threshold=1.0),
                         aux_losses=[mf.TsallisEntropy(weight=0.3), mf.SoftLoadBalance(weight=0.2)])
    graph = build_graph(adapter, SiteShape("s", 5, 6))
    grouped = group_pools(graph)
    assert any(isinstance(n, GroupedMix) for n in grouped.nodes)
    params = make_params(graph, 2)
    x = torch.randn(9, 5, dtype=F64, generator=torch.Generator().manual_seed(5)) * torch.linspace(
        0.1, 8, 9, dtype=F64)[:, None]
    ref = interpret(graph, params, x)
    assert ref.margins["route"] > 1e-6
    counts = (ref.values["route"].gates != 0).sum(1)
    assert counts.min() < counts.max(), "the example must route tokens to different numbers of experts"
    gm = _lowered(grouped, params)
    trainable = [d.name for d in graph.params if d.trainable]

    def run_ref(leaves):
        r = interpret(graph, {**params, **{k: v for k, v in leaves.items() if k != "x"}}, leaves["x"])
        return r.output, r.aux_total

    want_y, want_aux, want_g = _grads(run_ref, {"x": x, **{k: params[k] for k in trainable}})
    x_leaf = x.clone().requires_grad_(True)
    y, aux, _ = gm(x_leaf)
    probe = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    ((y * probe).sum() + aux).backward()
    assert_close(y.detach(), want_y)
    assert_close(aux.detach(), want_aux.detach())
    assert_close(x_leaf.grad, want_g["x"], msg="grad of x")
    for k in trainable:
        assert_close(getattr(gm, k).grad, want_g[k], msg=f"grad of {k}")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run in its interpreter")
def test_triton_grouped_pool_under_a_variable_routing(monkeypatch):
    """The Triton op takes the variable routing's pairs: outputs and gradients of x, gates and
    both factors equal the torch grouped path's; the kernels ran."""
    from moleforge.backends.triton import grouped
    launched = []
    real = grouped.launch_forward
    monkeypatch.setattr(grouped, "launch_forward", lambda *a: launched.append(1) or real(*a))
    _, gates = _varied_routing(T=7, E=4)
    gates = gates.float()
    gen = torch.Generator().manual_seed(3)
    x, a, b = torch.randn(7, 6, generator=gen), torch.randn(4, 3, 6, generator=gen), torch.randn(4, 5, 3,
                                                                                                  generator=gen)

    def run(policy):
        leaves = [t.clone().requires_grad_(True) for t in (x, gates, a, b)]
        y = ops.grouped_mix(leaves[0], leaves[1], None, leaves[2], leaves[3], 0.5, policy)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return [y.detach()] + [t.grad for t in leaves]

    want = run(TORCH_OPS)
    got = run(KernelPolicy(triton="on", cpu="off", interpret=True, decode_tokens=0))  # 7 tokens: not the decode form
    assert launched
    for name, g, w in zip(["y", "x", "gates", "a", "b"], got, want):
        assert_close(g, w, "float32", msg=name)


# ---- the preset ------------------------------------------------------------------------------

def _linears(model) -> dict[str, torch.nn.Module]:
    handle_free = mf.plan("dynmole", model, passes=())
    return {s.name: s for s in handle_free.sites}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_preset_parameters_and_gamma_follow_the_formula(arch):
    """Per adapted linear ``E·r·(d_in + d_out) + d_in·E`` (experts and router, METHODS.md
    §20.14) with E = 6, r = 24; Γ = Σ_{j=2}^{6} C(6, j) = 57 expert sets per token."""
    model = tiny(arch)
    E, r = 6, 24
    want = sum(E * r * (s.plain.d_in + s.plain.d_out) + s.plain.d_in * E for s in _linears(model).values())
    assert mf.count_parameters("dynmole", model) == want
    assert mf.structural_flexibility("dynmole") == sum(math.comb(6, j) for j in range(2, 7)) == 57


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_preset_trains_with_its_aux_losses_and_reloads(arch, tmp_path):
    model = tiny(arch)
    handle = mf.compile(mf.presets.load("dynmole").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids = batch()
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    router = next(p for n, p in model.named_parameters() if n.endswith("router_w"))
    before = router.detach().clone()
    for _ in range(3):
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and out.aux_loss > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(router, before), "the router trains"
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a")


def test_preset_is_listed_with_its_paper():
    assert "arXiv 2504.00661" in mf.presets.describe()["dynmole"]


# ---- bad specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter, words", [
    ({"kind": "pool", "router": {"kind": "topk"}, "aux_losses": [{"kind": "tsallis_entropy"}]},
     "aux_losses[0].kind = 'tsallis_entropy' reads the entropy index of a 'top_p' router"),
    ({"kind": "pool", "router": {"kind": "top_p", "p": 0}}, "router.top_p.p"),
    ({"kind": "pool", "router": {"kind": "top_p", "entropy_threshold": 1.5}}, "entropy_threshold"),
    ({"kind": "pool", "experts": 3, "router": {"kind": "top_p", "k": 4}}, "router.k = 4 exceeds experts = 3"),
    ({"kind": "residual_tree", "aux_losses": [{"kind": "soft_lb"}]}, "not defined for residual trees"),
])
def test_bad_specs_name_the_field(adapter, words):
    with pytest.raises(SpecError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{"target": {"roles": ["up"]}, "adapter": adapter}]})


def test_top_p_is_refused_for_ffn_blocks():
    with pytest.raises(SpecError, match="scope 'linear' for DynMoLE"):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{
            "target": {"roles": ["gate", "up", "down"]}, "scope": "ffn_block",
            "adapter": {"kind": "pool", "router": {"kind": "top_p"}}}]})
