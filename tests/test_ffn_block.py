"""FFN-block experts (``scope: "ffn_block"``, MixLoRA): the block rewrites as identities of the
interpreter, the lowered ops against the interpreter (outputs and gradients), torch.fx
recognition and reversible injection on every supported architecture, presets, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import moleforge as mf
from conftest import assert_close
from models import ARCHS, batch, tiny
from moleforge.backends.torch_fx import ops_block, ops_linear
from moleforge.backends.torch_fx.block_module import BlockInput, MoleforgeBlock
from moleforge.backends.torch_fx.ffn_block import ACTIVATION_NAMES, BlockLinear
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape
from moleforge.compiler.ffn_sites import build_block_graph
from moleforge.ir import ExpertFFN, ExpertHidden, Graph, interpret, print_graph, verify
from moleforge.passes.hoist_frozen_down import hoist_frozen_down
from moleforge.passes.share_frozen_projections import share_frozen_projections
from moleforge.specs import DenseRouter, ExpertPool, SwitchLoadBalance, TopKRouter
from strategies import make_params

F64 = torch.float64


# ---- strategies ---------------------------------------------------------------------------

@st.composite
def block_graphs(draw) -> Graph:
    """Plain IR of random FFN blocks: gated or not, any activation, biases, a router (top-k with
    or without renormalisation, or dense), experts on a random non-empty subset of linears."""
    d, d_ff, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 6))
    E = draw(st.integers(1, 4))
    linears = {"up": BlockLinear("up", "up", d, d_ff, draw(st.booleans()), False),
               "down": BlockLinear("down", "down", d_ff, d_out, draw(st.booleans()), False)}
    if draw(st.booleans()):
        linears["gate"] = BlockLinear("gate", "gate", d, d_ff, draw(st.booleans()), False)
    roles = draw(st.sets(st.sampled_from(sorted(linears)), min_size=1))
    if draw(st.booleans()):
        router = TopKRouter(k=draw(st.integers(1, E)), renormalize=draw(st.booleans()))
        aux = [SwitchLoadBalance(weight=0.1)] if draw(st.booleans()) else []
    else:
        router, aux = DenseRouter(), []
    pool = ExpertPool(experts=E, rank=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([None, 4.0])),
                      scaling=draw(st.sampled_from(["alpha_over_rank", "rslora"])), router=router,
                      aux_losses=aux)
    graph = build_block_graph(pool, linears, draw(st.sampled_from(ACTIVATION_NAMES)), sorted(roles),
                              SiteShape(label="block", d_in=d, d_out=d_out))
    return verify(graph)


def block_params(graph: Graph, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    """Every stored tensor random (non-zero B) plus random frozen block weights."""
    params = make_params(graph, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    for d in graph.frozen:
        params[d.name] = torch.randn(d.shape, generator=gen, dtype=dtype) * 0.6
    return params


def _inputs(graph: Graph, seed: int, T: int) -> torch.Tensor:
    return torch.randn(T, graph.d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _interpret_grads(graph: Graph, params, x, w, routing=None):
    """Output, aux and the gradients of ``Σ out ⊙ w + aux`` wrt x and the stored tensors."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    xl = x.clone().requires_grad_(True)
    res = interpret(graph, leaves, xl, routing=routing)
    loss = (res.output * w).sum() + res.aux_total
    names = [d.name for d in graph.params]
    grads = torch.autograd.grad(loss, [xl] + [leaves[n] for n in names], allow_unused=True)
    return res, dict(zip(["x"] + names, grads, strict=True))


def _fixed(res) -> dict:
    return {rid: idx for rid, idx in res.routes.items() if idx is not None}


# ---- the rewrites are identities ---------------------------------------------------------------

REWRITES = {"share_frozen_projections": share_frozen_projections, "hoist_frozen_down": hoist_frozen_down,
            "both": lambda g: hoist_frozen_down(share_frozen_projections(g))}


@pytest.mark.parametrize("name", sorted(REWRITES))
@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_rewrite_keeps_outputs_and_gradients(name, graph, seed, T):
    rewrite = REWRITES[name]
    before = print_graph(graph)
    out = verify(rewrite(graph))
    assert print_graph(graph) == before, "the rewrite mutated its input"
    assert rewrite(out) == out, "the rewrite is not idempotent"
    params, x = block_params(graph, seed), _inputs(graph, seed, T)
    w = torch.randn(T, graph.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    ref, ref_grads = _interpret_grads(graph, params, x, w)
    got, got_grads = _interpret_grads(out, params, x, w, routing=_fixed(ref))
    assert_close(got.output, ref.output)
    assert_close(got.aux_total, ref.aux_total)
    for k, g in ref_grads.items():
        if g is not None:
            assert_close(got_grads[k], g, msg=f"gradient of {k}")


def test_rewrites_produce_the_hoisted_form():
    graph = build_block_graph(ExpertPool(experts=4, rank=2, router=TopKRouter(k=2)),
                              {"gate": BlockLinear("gate", "g", 3, 5, False, False),
                               "up": BlockLinear("up", "u", 3, 5, False, False),
                               "down": BlockLinear("down", "d", 5, 3, True, False)},
                              "silu", ["gate", "up", "down"], SiteShape(label="block", d_in=3, d_out=3))
    text = print_graph(REWRITES["both"](graph))
    assert "expert_ffn" not in text
    for line in ("%experts_gate_base = linear %x W=W_gate b=- -> 5",
                 "%experts_sum = expert_sum %experts_hidden by %route -> 5",
                 "%experts_down = linear %experts_sum W=W_down b=b_down -> 3",
                 "%experts = add %experts_down %experts_down_lora"):
        assert line in text, text


def test_hoisting_needs_gates_summing_to_one_when_down_has_a_bias():
    linears = {"up": BlockLinear("up", "u", 3, 4, False, False),
               "down": BlockLinear("down", "d", 4, 3, True, False)}
    pool = ExpertPool(experts=3, rank=2, router=TopKRouter(k=2, renormalize=False))
    shape = SiteShape(label="block", d_in=3, d_out=3)
    graph = build_block_graph(pool, linears, "relu", ["up", "down"], shape)
    assert hoist_frozen_down(graph) is graph


# ---- lowering against the interpreter ----------------------------------------------------------

LOWERED_FORMS = ["none", "share_frozen_projections", "hoist_frozen_down", "both"]


@given(graph=block_graphs(), seed=st.integers(0, 2**16), T=st.integers(1, 6),
       rewrite=st.sampled_from(LOWERED_FORMS))
def test_lowered_block_matches_interpreter(graph, seed, T, rewrite):
    g = graph if rewrite == "none" else REWRITES[rewrite](graph)
    params, x = block_params(g, seed), _inputs(g, seed, T)
    w = torch.randn(T, g.d_out, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    ref, ref_grads = _interpret_grads(g, params, x, w)
    assume(all(m > 1e-6 for m in ref.margins.values()))
    store = ParamStore(g.params, dtype=F64)
    with torch.no_grad():
        for d in g.params:
            getattr(store, d.name).copy_(params[d.name])
    gm = lower(g, store)
    xl = x.clone().requires_grad_(True)
    out, aux, _ = gm(xl, None, {d.name: params[d.name] for d in g.frozen})
    assert_close(out, ref.output)
    loss = (out * w).sum() + (aux if aux is not None else 0.0)
    names = [d.name for d in g.params if d.trainable]
    grads = torch.autograd.grad(loss, [xl] + [getattr(gm, n) for n in names], allow_unused=True)
    for name, got in zip(["x"] + names, grads, strict=True):
        want = ref_grads[name]
        assert_close(got if got is not None else torch.zeros_like(want), want, msg=f"gradient of {name}")


@given(T=st.integers(1, 40), d_in=st.integers(1, 40), d_out=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_narrow_linear_matches_linear(T, d_in, d_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(T, d_in, generator=gen, dtype=F64), torch.randn(d_out, d_in, generator=gen, dtype=F64)
    b = torch.randn(d_out, generator=gen, dtype=F64) if bias else None
    gy = torch.randn(T, d_out, generator=gen, dtype=F64)
    results = []
    for fn in (ops_linear.linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
        y = fn(*leaves) if bias else fn(*leaves, None)
        results.append((y, *torch.autograd.grad(y, leaves, gy)))
    for got, want in zip(*results, strict=True):
        assert_close(got, want)


# ---- blocks inside HF models ---------------------------------------------------------------------

POOL = ExpertPool(experts=3, rank=2, alpha=4.0, router=TopKRouter(k=2),
                  aux_losses=[SwitchLoadBalance(weight=0.1)])
ACTIVATION_OF = {"llama": "silu", "qwen2": "silu", "mistral": "silu", "gpt2": "gelu_tanh", "bert": "gelu"}


def block_spec(init: mf.Init | None = None) -> mf.AdapterSpec:
    init = init or mf.Init()
    return mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL, init=init)])


def _blocks(model: nn.Module) -> dict[str, MoleforgeBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoleforgeBlock)}


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_block_computes_the_model_ffn(arch):
    """Zero up-projections: every expert is the frozen FFN and the gates sum to 1."""
    model, ids = tiny(arch), batch()
    base = model(ids).logits
    handle = mf.compile(block_spec(), model)
    blocks = _blocks(model)
    assert len(blocks) == 2
    assert {n.activation for g in handle.graphs.values() for n in g.nodes
            if isinstance(n, (ExpertFFN, ExpertHidden))} == {ACTIVATION_OF[arch]}
    assert_close(model(ids).logits, base, "float32_model")
    if arch == "bert":
        passthrough = [model.get_submodule(f"bert.encoder.layer.{i}.intermediate") for i in (0, 1)]
        assert all(isinstance(m, BlockInput) for m in passthrough)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_in_model_matches_interpreter(arch):
    """Non-zero experts: each block's experts, on the inputs the model feeds them, equal the
    interpreter of the block's plain IR (with the routing the block chose)."""
    model, ids = tiny(arch), batch()
    handle = mf.compile(block_spec(mf.Init(up="normal", std=0.3, seed=3)), model)
    seen = {}
    hooks = [blk.site.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a, o)))
             for n, blk in handle.modules.items()]
    logits = model(ids).logits
    for h in hooks:
        h.remove()
    state = {k: v.detach().to(F64) for k, v in handle.state_dict().items()}
    for name, ((x, _, frozen), (out, _, routes)) in seen.items():
        params = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        params.update({k: v.detach().to(F64) for k, v in frozen.items()})
        fixed = {rid: r[2] for rid, r in routes.items()}
        ref = interpret(handle.plain_graphs[name], params, x.detach().to(F64), routing=fixed)
        assert_close(out.detach(), ref.output, "float32", msg=name)
    plain = tiny(arch)
    mf.compile(block_spec(mf.Init(up="normal", std=0.3, seed=3)), plain, passes=())
    assert_close(plain(ids).logits, logits, "float32_model")


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_the_model_bit_exactly(arch):
    model, ids = tiny(arch), batch()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    base = model(ids).logits
    handle = mf.compile(mf.presets.load("mixlora").with_init(mf.Init(up="normal", seed=1)), model)
    assert not torch.equal(model(ids).logits, base)
    handle.remove()
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_step_save_and_load(arch, tmp_path):
    model, ids = tiny(arch), batch()
    spec = mf.presets.load("mixlora").with_init(mf.Init(up="normal", seed=2))
    handle = mf.compile(spec, model)
    labels = ids if arch != "bert" else ids.clone()
    out = model(input_ids=ids, labels=labels)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    named = dict(handle.named_parameters())
    assert any(k.endswith(".router_w") for k in named) and any(k.endswith(".B_down") for k in named)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert mf.count_parameters(spec, tiny(arch)) == sum(p.numel() for p in named.values())
    mf.save(handle, tmp_path / "adapter")
    fresh = tiny(arch)
    mf.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(fresh(ids).logits, model(ids).logits, "save_load")


def test_presets_compile_with_their_routing():
    model = tiny("llama")
    handle = mf.compile("llava_mole", model)
    routes = [n for g in handle.graphs.values() for n in g.nodes if type(n).__name__ == "Route"]
    assert len(_blocks(model)) == 2 and {r.gate.k for r in routes} == {1}
    assert sum(1 for g in handle.graphs.values() if any(isinstance(n, ExpertHidden) for n in g.nodes)) == 2
    handle.remove()
    handle = mf.compile("mixlora", model)
    assert len(handle.modules) == 2 + 2 * 4
    assert {r.gate.k for g in handle.graphs.values() for r in g.nodes if type(r).__name__ == "Route"} == {2}


GOLDEN_LLAMA_BLOCK = """\
graph model.layers.0.mlp (d_in=32, d_out=32)
  param router_w (8, 32) init=kaiming trainable
  param A_gate (8, 8, 32) init=kaiming trainable
  param B_gate (8, 64, 8) init=up trainable
  param A_up (8, 8, 32) init=kaiming trainable
  param B_up (8, 64, 8) init=up trainable
  param A_down (8, 8, 64) init=kaiming trainable
  param B_down (8, 32, 8) init=up trainable
  frozen W_gate (64, 32)
  frozen W_up (64, 32)
  frozen W_down (32, 64)
  %x = input 32
  %logits = linear %x W=router_w b=- -> 8
  %route = route %logits softmax_topk(k=2, renorm=True, tau=1) E=8
  %experts_gate_base = linear %x W=W_gate b=- -> 64
  %experts_up_base = linear %x W=W_up b=- -> 64
  %experts_hidden = expert_hidden %x by %route act=silu \
gate=[%experts_gate_base + A=A_gate B=B_gate scale=2] up=[%experts_up_base + A=A_up B=B_up scale=2] -> 64
  %experts_sum = expert_sum %experts_hidden by %route -> 64
  %experts_down = linear %experts_sum W=W_down b=- -> 32
  %experts_down_lora = expert_lora %experts_hidden by %route A=A_down B=B_down scale=2 -> 32
  %experts = add %experts_down %experts_down_lora
  %aux0 = aux_loss switch_lb %route weight=0.01
  return %experts ; aux %aux0"""


def test_mixlora_block_ir_golden():
    handle = mf.compile("mixlora", tiny("llama"))
    assert print_graph(handle.graphs["model.layers.0.mlp"]) == GOLDEN_LLAMA_BLOCK


# ---- errors ---------------------------------------------------------------------------------------

class _Layer(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp


class _Model(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(mlp)])

    def forward(self, x):
        return self.layers[0].mlp(x)


class _BranchyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.up_proj(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = torch.relu(h)
        return self.down_proj(h)


class _SineMLP(_BranchyMLP):
    def forward(self, x):
        return self.down_proj(torch.sin(self.up_proj(x)))


@pytest.mark.parametrize("mlp, message", [(_BranchyMLP, "cannot be traced with torch.fx"),
                                          (_SineMLP, "none of")])
def test_untraceable_or_unknown_block_is_named_and_the_model_untouched(mlp, message):
    model = _Model(mlp())
    before = copy.deepcopy(model.state_dict())
    site = mf.Site(target=mf.Target(roles=["up", "down"]), scope="ffn_block", adapter=POOL)
    spec = mf.AdapterSpec(sites=[site])
    with pytest.raises(mf.InjectionError, match=message) as err:
        mf.compile(spec, model)
    assert "layers.0.mlp" in str(err.value)
    assert not _blocks(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_block_scope_rejects_plain_lora_and_overlapping_sites():
    with pytest.raises(mf.InjectionError, match="kind 'pool'"):
        mf.compile(mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up"]), scope="ffn_block",
                                                 adapter=mf.LoRA())]), tiny("llama"))
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL),
                                 mf.Site(target=mf.Target(roles=["down"]), adapter=mf.LoRA())])
    with pytest.raises(mf.InjectionError, match="down_proj"):
        mf.compile(spec, tiny("llama"))


@given(seed=st.integers(0, 2**16), T=st.integers(1, 9), E=st.integers(1, 4), gated=st.booleans(),
       lora=st.booleans(), chunk=st.sampled_from([1, 7, 40, 1 << 20]),
       activation=st.sampled_from(ACTIVATION_NAMES))
def test_fused_experts_match_the_node_by_node_ops(seed, T, E, gated, lora, chunk, activation):
    """``routed_ffn`` (in runs of ``chunk`` values) against ``expert_hidden`` + ``expert_sum`` +
    ``expert_lora_down``: outputs and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    d, F, r = 3, 5, 2

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=F64) * 0.7).requires_grad_(True)

    k = min(2, E)
    scores = torch.randn(T, E, generator=gen, dtype=F64)
    index = scores.topk(k, dim=1).indices
    gates = rand(T, E)
    x, W_u, W_g = rand(T, d), rand(F, d), rand(F, d)
    lin_u = (W_u, None, rand(E, r, d), rand(E, F, r), 1.5)
    lin_g = (W_g, None, rand(E, r, d), rand(E, F, r), 0.5) if gated else None
    down_a = rand(E, r, F) if lora else None
    w_y, w_z = torch.randn(T, F, generator=gen, dtype=F64), torch.randn(T * k, r, generator=gen, dtype=F64)

    def run(fused: bool):
        plan = ops_block.slot_plan(gates, index)
        base_u, base_g = x @ W_u.T, x @ W_g.T
        if fused:
            y, z = ops_block.routed_ffn(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation,
                                        down_a, chunk)
        else:
            h = ops_block.expert_hidden(x, plan, lin_u, lin_g, base_u, base_g if gated else None, activation)
            y = ops_block.expert_sum(h, plan)
            z = ops_block.expert_lora_down(h, plan, down_a) if lora else None
        loss = (y * w_y).sum() + ((z * w_z).sum() if lora else 0.0)
        leaves = (x, gates, W_u, *lin_u[2:4], *(lin_g[2:4] if gated else ()), down_a)
        leaves = [t for t in leaves if t is not None]
        return [y, *([z] if lora else [])], torch.autograd.grad(loss, leaves, allow_unused=True)

    (outs, grads), (ref_outs, ref_grads) = run(True), run(False)
    for got, want in zip(outs + list(grads), ref_outs + list(ref_grads), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want)


class _DropoutMLP(_BranchyMLP):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.down_proj(self.dropout(torch.relu(self.up_proj(x))))


class _MethodMulMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.down_proj(self.up_proj(x).mul(torch.nn.functional.gelu(self.gate_proj(x))))


def test_dropout_inside_the_ffn_is_refused_and_method_products_recognised():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL)])
    with pytest.raises(mf.InjectionError, match="dropout"):
        mf.compile(spec, _Model(_DropoutMLP()))
    model, x = _Model(_MethodMulMLP()), torch.randn(2, 3, 4)
    base = model(x)
    handle = mf.compile(spec, model)
    graph = handle.graphs["layers.0.mlp"]
    assert {n.activation for n in graph.nodes if isinstance(n, ExpertHidden)} == {"gelu"}
    assert_close(model(x), base, "float32")
