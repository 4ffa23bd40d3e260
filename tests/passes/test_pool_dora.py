"""DoRA magnitudes on the experts of a pool (``specs/pool_magnitude.py``), of their own factors or
sharing one (HydraLoRA's A): one expert under a gate of 1 is PEFT's DoRA LoRA; hypothesis
properties of the lowered module (before and after the default pipeline) against the float64
interpreter, outputs and gradients, magnitudes and up-projections drawn non-zero; training and
save/load on tiny models; bad specs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_properties import check_pass

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import NotMergeableError, SpecError
from moleforge.ir import interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import ExpertPool, LoRA, PerExpert, Shared, StaticRouter
from strategies import capacities, make_params, routers, takes_capacity
from tolerances import assert_close


def test_one_dora_expert_under_a_gate_of_one_is_a_dora_lora():
    shape = SiteShape("s", 5, 4)
    pool = verify(build_graph(ExpertPool(experts=1, rank=2, magnitude=True, router=StaticRouter(trainable=False)),
                              shape))
    lora = verify(build_graph(LoRA(rank=2, magnitude=True), shape))
    p = make_params(lora, 1)
    x = torch.randn(6, 5, dtype=torch.float64)
    as_pool = {"A": p["A"][None], "B": p["B"][None], "magnitude": p["magnitude"][None], "W": p["W"],
               "router_w": torch.ones(1, dtype=torch.float64)}
    want = interpret(lora, p, x).output
    assert want.abs().max() > 1e-3
    assert_close(interpret(pool, as_pool, x).output, want)


@st.composite
def dora_pools(draw):
    E = draw(st.integers(1, 4))
    router = draw(routers(E, ("topk", "dense", "sigmoid_topk", "static")))
    if E == 1 and not isinstance(router, StaticRouter):
        router = StaticRouter()
    down, up = draw(st.sampled_from([(PerExpert(), "per_expert"), (Shared(), "per_expert"), (PerExpert(), "shared")]))
    return ExpertPool(experts=E, rank=draw(st.integers(1, 3)), magnitude=True, router=router, down=down, up=up,
                      alpha=draw(st.sampled_from([None, 4.0])), dropout=draw(st.sampled_from([0.0, 0.3])),
                      capacity_factor=draw(capacities()) if takes_capacity(router) else None)


@settings(max_examples=20, deadline=None)
@given(pool=dora_pools(), d_in=st.integers(1, 7), d_out=st.integers(1, 7), seed=st.integers(0, 2**16),
       T=st.integers(1, 6))
def test_lowered_dora_pool_matches_the_interpreter(pool, d_in, d_out, seed, T):
    graph = build_graph(pool, SiteShape("s", d_in, d_out))
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    check_pass(lambda g: run_pipeline(g, DEFAULT_PIPELINE), graph, seed, x)


@pytest.mark.parametrize("arch, down", [("llama", "per_expert"), ("gpt2", "per_expert"), ("llama", "shared")])
def test_dora_experts_train_and_reload(arch, down, tmp_path):
    """Experts of their own factors, and HydraLoRA's experts over one shared A."""
    model = tiny(arch)
    spec = {"sites": [{"target": {"roles": ["q", "v", "up", "down"]}, "init": {"up": "normal", "std": 0.1, "seed": 0},
                       "adapter": {"kind": "pool", "experts": 4, "rank": 4, "magnitude": True, "down": {"kind": down},
                                   "router": {"kind": "topk", "k": 2}}}]}
    handle = mf.compile(spec, model)
    ids = batch()
    named = dict(model.named_parameters())
    mags = {n: p.detach().clone() for n, p in named.items() if n.endswith("magnitude")}
    assert mags
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(named[n], m) for n, m in mags.items()), "every site's magnitudes train"
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a")
    with pytest.raises(NotMergeableError):
        mf.export_merged(handle, tmp_path / "merged")


@pytest.mark.parametrize("adapter, words", [
    ({"kind": "pool", "magnitude": True, "down": {"kind": "sparse_random"}, "rank": 1,
      "router": {"kind": "implicit_topk", "k": 2}}, "magnitude: down.kind = 'sparse_random'"),
    ({"kind": "pool", "magnitude": True, "experts": 2, "ranks": [1, 2]}, "magnitude with ranks"),
])
def test_bad_specs_name_the_field(adapter, words):
    with pytest.raises(SpecError, match=words):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{"target": {"roles": ["up"]}, "adapter": adapter}]})


def test_ffn_block_experts_take_magnitude_but_not_ranks():
    """FFN-block pools take ``magnitude`` (DoRA experts, ``tests/test_ffn_block_dora.py``), not ``ranks``."""
    site = {"target": {"roles": ["up", "down"]}, "scope": "ffn_block", "adapter": {"kind": "pool", "magnitude": True}}
    assert mf.AdapterSpec.model_validate({"sites": [site]}).sites[0].adapter.magnitude
    site["adapter"] = {"kind": "pool", "experts": 2, "ranks": [1, 2]}
    with pytest.raises(SpecError, match="one rank per expert is defined for scope 'linear' pools"):
        mf.AdapterSpec.model_validate({"sites": [site]})
