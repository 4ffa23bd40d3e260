"""DoRA on FFN-block experts (``magnitude: true`` on an ``ffn_block`` pool, MixLoRA's ``use_dora``):
the spec, the interpreter against the ``mixlora`` package's ``LoraLinear`` DoRA math by hand, a fresh
DoRA block is the plain block, DoRA with dropout in training, the printed IR, ``explain``, and a tiny
Llama and GPT-2 that train, save and load. The lowered ops and the block rewrites are checked against
the interpreter on random blocks with magnitudes by the property tests of ``test_ffn_block_rewrites.py``,
``passes/test_hoist_frozen_down.py``, ``passes/test_share_frozen_projections.py`` and
``backends/test_lowering_training.py`` (``ffn_block_helpers.block_graphs`` draws DoRA blocks)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mixlora.config import LoraConfig
from mixlora.lora_linear import LoraLinear
from torch import nn

import moleforge as mf
from backends.test_lowering_training import check_training  # the lowering's training-mode check
from conftest import assert_close
from ffn_block_helpers import F64, REWRITES, block_params, interpret_grads
from models import batch, tiny
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower, runs_as_routed_ffn
from moleforge.compiler.build import SiteShape, build_block_graph
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import ExpertFFN, ExpertHidden, interpret, print_graph, verify
from moleforge.ir.interpret import block_activation
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import DenseRouter, ExpertPool, TopKRouter

ROLES = ("gate", "up", "down")


def _block(E: int = 3, router=None, magnitude: bool = True, dropout: float = 0.0, bias: bool = True,
           roles=ROLES, gated: bool = True):
    lin = {"up": BlockLinear("up", "up", 4, 5, bias, False), "down": BlockLinear("down", "down", 5, 3, bias, False)}
    if gated:
        lin["gate"] = BlockLinear("gate", "gate", 4, 5, False, False)
    pool = ExpertPool(experts=E, rank=2, alpha=3.0, router=router or TopKRouter(k=min(2, E)), magnitude=magnitude,
                      dropout=dropout)
    return verify(build_block_graph(pool, lin, "silu", [r for r in roles if r in lin],
                                    SiteShape(label="block", d_in=4, d_out=3)))


def test_ffn_block_pools_take_magnitude_and_refuse_ranks():
    site = {"target": {"roles": ["gate", "up", "down"]}, "scope": "ffn_block",
            "adapter": {"kind": "pool", "magnitude": True, "dropout": 0.05}}
    spec = mf.AdapterSpec.model_validate({"sites": [site]})
    pool = mf.AdapterSpec.model_validate_json(spec.model_dump_json()).sites[0].adapter
    assert (pool.magnitude, pool.dropout) == (True, 0.05)
    site["adapter"] = {**site["adapter"], "magnitude": False, "experts": 2, "ranks": [1, 2]}
    with pytest.raises(mf.SpecError, match="adapter.ranks: one rank per expert is defined for scope 'linear'"):
        mf.AdapterSpec.model_validate({"sites": [site]})


def test_every_adapted_linear_gets_a_magnitude_per_expert_and_row():
    graph = _block(roles=("gate", "down"))
    decls = {d.name: d for d in graph.params}
    assert {n for n in decls if n.startswith("magnitude")} == {"magnitude_gate", "magnitude_down"}
    assert decls["magnitude_gate"].shape == (3, 5) and decls["magnitude_down"].shape == (3, 3)
    assert decls["magnitude_gate"].init == "zero" and decls["magnitude_gate"].trainable
    text = print_graph(graph)
    assert "gate=[W=W_gate b=- + A=A_gate B=B_gate scale=1.5 magnitude=magnitude_gate]" in text
    assert "up=[W=W_up b=b_up]" in text


# ---- the semantics, by hand against the mixlora package --------------------------------------

def _package_linear(w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                    m: torch.Tensor, alpha: float) -> LoraLinear:
    """The package's DoRA ``LoraLinear`` over a float64 ``nn.Linear`` with factors ``a``, ``b`` and the
    absolute magnitude ``m`` (a leaf: its gradient is read)."""
    base = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=F64)
    with torch.no_grad():
        base.weight.copy_(w)
        if bias is not None:
            base.bias.copy_(bias)
    config = LoraConfig(lora_r_=a.shape[0], lora_alpha_=alpha, lora_dropout_=0.05, use_dora_=True,
                                dtype_=F64)
    lin = LoraLinear(base, config, (a, b)).eval()
    lin.magnitude_vector_ = nn.Parameter(m.clone())
    return lin


@given(seed=st.integers(0, 2**16), T=st.integers(1, 6), bias=st.booleans())
def test_one_expert_at_gate_one_is_the_packages_lora_linear_dora(seed, T, bias):
    """One expert, top-1 (gate 1): the block is ``down(silu(gate(x)) * up(x))`` with the package's DoRA
    ``LoraLinear`` on each linear (absolute magnitude ``‖W‖ + M``, the bias scaled too); outputs and
    the gradients of x, A, B and the magnitude equal (the package detaches the norm, as we do)."""
    graph = _block(E=1, router=TopKRouter(k=1), bias=bias)
    params = block_params(graph, seed)
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    w = torch.randn(T, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    res, grads = interpret_grads(graph, params, x, w)
    lins = {}
    for role in ROLES:
        W = params[f"W_{role}"]
        m = torch.linalg.vector_norm(W, dim=1) + params[f"magnitude_{role}"][0]
        lins[role] = _package_linear(W, params.get(f"b_{role}"), params[f"A_{role}"][0], params[f"B_{role}"][0], m,
                                     alpha=3.0)
    xl = x.clone().requires_grad_(True)
    y = lins["down"](block_activation("silu", lins["gate"](xl)) * lins["up"](xl))
    assert_close(res.output, y)
    leaves = [xl] + [t for role in ROLES for t in (lins[role].lora_A.weight, lins[role].lora_B.weight,
                                                   lins[role].magnitude_vector_)]
    got = torch.autograd.grad((y * w).sum(), leaves)
    names = ["x"] + [f"{f}_{role}" for role in ROLES for f in ("A", "B", "magnitude")]
    for name, g in zip(names, got, strict=True):
        want = grads[name] if name == "x" else grads[name][0]
        assert_close(want, g, msg=f"gradient of {name}")


def test_a_fresh_dora_block_is_the_plain_block():
    """``B = 0`` and ``M = 0`` (the initialisation): ``c = ‖W‖ / ‖W‖ = 1``, so the DoRA block gives the
    plain block's output and gradients of x, A, B and the router (and a magnitude gradient of its own),
    before and after the default pipeline."""
    dora, plain = _block(), _block(magnitude=False)
    params = block_params(dora, 3)
    for role in ROLES:
        params[f"B_{role}"].zero_()
        params[f"magnitude_{role}"].zero_()
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    w = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    for form in (lambda g: g, lambda g: run_pipeline(g, DEFAULT_PIPELINE)):
        ref, ref_grads = interpret_grads(form(plain), {k: v for k, v in params.items() if "magnitude" not in k}, x, w)
        got, got_grads = interpret_grads(form(dora), params, x, w)
        assert_close(got.output, ref.output)
        for name, g in ref_grads.items():
            assert_close(got_grads[name], g, msg=f"gradient of {name}")
        assert got_grads["magnitude_down"].abs().sum() > 0


def test_magnitudes_change_the_output():
    """With non-zero magnitudes the block differs from the plain one on the same factors (each of
    gate, up and down scales its expert's output)."""
    dora, plain = _block(), _block(magnitude=False)
    params = block_params(dora, 5)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    base = interpret(plain, params, x).output
    for role in ROLES:
        only = {k: (v if "magnitude" not in k or k.endswith(role) else torch.zeros_like(v)) for k, v in params.items()}
        only.update({f"B_{r}": torch.zeros_like(params[f"B_{r}"]) for r in ROLES})
        only_plain = {k: v for k, v in only.items() if "magnitude" not in k}
        assert (interpret(dora, only, x).output - interpret(plain, only_plain, x).output).abs().max() > 1e-3, role
    assert (interpret(dora, params, x).output - base).abs().max() > 1e-3


# ---- passes and runtime forms -------------------------------------------------------------------

def test_a_dora_down_projection_is_not_hoisted_and_dora_blocks_are_not_fused():
    """``Σ g_i c_i ⊙ (h_i W_dᵀ ...)``: W_d cannot leave the sum with a down magnitude; gate and up
    magnitudes keep the shared frozen projections and the hoisted down projection, but not the fused
    op (``routed_ffn`` and its CPU kernel take no magnitudes)."""
    down = run_pipeline(_block(), DEFAULT_PIPELINE)
    node = next(n for n in down.nodes if isinstance(n, (ExpertFFN, ExpertHidden)))
    assert isinstance(node, ExpertFFN) and node.up_base is not None and node.gate_base is not None
    hidden_only = run_pipeline(_block(roles=("gate", "up")), DEFAULT_PIPELINE)
    node = next(n for n in hidden_only.nodes if isinstance(n, (ExpertFFN, ExpertHidden)))
    assert isinstance(node, ExpertHidden) and not runs_as_routed_ffn(hidden_only, node)
    plain = run_pipeline(_block(roles=("gate", "up"), magnitude=False), DEFAULT_PIPELINE)
    assert runs_as_routed_ffn(plain, next(n for n in plain.nodes if isinstance(n, ExpertHidden)))


@pytest.mark.parametrize("form", ["plain", "default pipeline"])
def test_norms_are_kept_without_autograd_until_a_weight_changes(form):
    """Evaluation without autograd: the second forward reuses the experts' norms (cache hits); after an
    in-place change of a B, of a magnitude and with autograd on, the output is the interpreter's."""
    graph = _block() if form == "plain" else run_pipeline(_block(), DEFAULT_PIPELINE)
    params = block_params(graph, 2)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gm = _lowered(graph, params).eval()
    frozen = {d.name: params[d.name] for d in graph.frozen}
    with torch.no_grad():
        first = gm(x, None, frozen)[0]
        hits = gm.pack_cache.hits
        assert_close(gm(x, None, frozen)[0], first)
        assert gm.pack_cache.hits == hits + 3, "the second forward rebuilt the norms"
        for name in ("B_down", "magnitude_up"):
            getattr(gm, name).mul_(1.5)
            params[name] = params[name] * 1.5
            assert_close(gm(x, None, frozen)[0], interpret(graph, params, x).output, msg=name)
    assert_close(gm(x, None, frozen)[0], interpret(graph, params, x).output)


def _lowered(graph, params):
    store = ParamStore(graph.params, dtype=F64)
    with torch.no_grad():
        for d in graph.params:
            getattr(store, d.name).copy_(params[d.name])
    return lower(graph, store)


@pytest.mark.parametrize("form", ["plain", "both", "default pipeline"])
@pytest.mark.parametrize("router", [TopKRouter(k=2), DenseRouter()], ids=["top2", "dense"])
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 8))
def test_dora_with_dropout_in_training_matches_interpreter(router, form, seed, T):
    """DoRA and dropout in one block, gate, up and down all adapted: the lowered module in training
    (masks drawn from the noise generator) gives the interpreter's outputs and gradients on the same
    masks; the dropped LoRA input is inside ``c ⊙ (...)``, the frozen projection reads ``u`` undropped."""
    graph = _block(router=router, dropout=0.4)
    lowered = {"plain": graph, "both": REWRITES["both"](graph),
               "default pipeline": run_pipeline(graph, DEFAULT_PIPELINE)}[form]
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    check_training(graph, lowered, block_params(graph, seed), x, None, seed + 1, seed + 2)


# ---- models -------------------------------------------------------------------------------------

def _dora_mixlora() -> mf.AdapterSpec:
    """The mixlora preset with DoRA experts and DoRA attention LoRAs (``use_dora``)."""
    spec = mf.presets.load("mixlora")
    sites = [s.model_copy(update={"adapter": s.adapter.model_copy(update={"magnitude": True})}) for s in spec.sites]
    return spec.model_copy(update={"sites": sites})


def test_a_fresh_dora_mixlora_changes_nothing():
    model, ids = tiny("llama"), batch()
    with torch.no_grad():
        base = model(ids).logits
        mf.compile(_dora_mixlora(), model)
        assert_close(model(ids).logits, base, "float32_model")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_mixlora_trains_saves_and_loads(arch, tmp_path):
    """A few steps of Adam move every magnitude; save -> load gives the same logits."""
    model, ids, spec = tiny(arch).train(), batch(), _dora_mixlora().with_init(mf.Init(up="normal", seed=2))
    handle = mf.compile(spec, model)
    named = dict(handle.named_parameters())
    assert mf.count_parameters(spec, tiny(arch)) == sum(p.numel() for p in named.values())
    mags = {k: v.detach().clone() for k, v in named.items() if k.split(".")[-1].startswith("magnitude")}
    assert len(mags) == sum(1 for g in handle.graphs.values() for d in g.params if d.name.startswith("magnitude"))
    assert sum(k.endswith(".magnitude_down") for k in mags) == 2 and sum(k.endswith(".magnitude") for k in mags) >= 4
    opt = torch.optim.Adam(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(not torch.equal(named[k], v) for k, v in mags.items())
    mf.save(handle, tmp_path / "adapter")
    fresh = tiny(arch)
    mf.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(fresh(ids).logits, model.eval()(ids).logits, "save_load")


def test_explain_says_the_block_experts_are_dora_experts():
    text = " ".join(mf.explain(_dora_mixlora(), tiny("llama")).split())  # lines joined
    assert "DoRA experts (MixLoRA's use_dora): a magnitude per expert and output row on gate_proj, up_proj and " \
           "down_proj" in text
    assert "magnitude=magnitude_down]" in text
    assert "DoRA experts" not in mf.explain("mixlora", tiny("llama"))
