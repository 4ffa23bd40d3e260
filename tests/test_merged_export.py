"""``mf.export_merged`` and the low-rank reduction under it.

The reduction of a site to ``s·B·A`` is checked against the float64 interpreter (``Δy(I) = ΔWᵀ``);
merged directories are loaded by plain transformers in a fresh process that cannot import
moleforge, and must give the adapted logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moleforge as mf
from models import batch, tiny
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import IRVerificationError
from moleforge.interop.lowrank import NotReducibleError, reduce_site
from moleforge.ir import (
    BlockColumns,
    BlockGate,
    BlockRows,
    Graph,
    Input,
    Linear,
    OuterGate,
    ParamDecl,
    ParamRef,
    Route,
    StaticGate,
    interpret,
    print_graph,
    verify,
)
from peft_helpers import logits
from strategies import loras, make_params, pools, trees
from tolerances import assert_close


@st.composite
def static_pools(draw):
    E = draw(st.integers(1, 4))
    down, up = draw(st.sampled_from([(mf.specs.PerExpert(), "per_expert"), (mf.Shared(), "per_expert"),
                                     (mf.specs.PerExpert(), "shared")]))
    return mf.ExpertPool(experts=E, rank=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([None, 3.0])),
                         down=down, up=up, router=mf.StaticRouter(), frozen_experts=draw(st.booleans()),
                         shared_expert=draw(st.one_of(st.none(), loras(dropouts=(0.0,), magnitude=False))))


def _gated_graph(kind: str, E: int, r: int, d_in: int, d_out: int) -> Graph:
    """The block-gated (§20.1) and outer-gated (§20.3) forms of a pool, under a static router."""
    w, g = ParamRef("w", (E,)), StaticGate(weights=ParamRef("w", (E,)))
    A = ParamRef("A", (E, r, d_in) if kind == "block" else (r, d_in))
    B = ParamRef("B", (E, d_out, r))
    gate = (BlockGate(id="gated", src="h", routing="route", rank=r, scale=0.7) if kind == "block"
            else OuterGate(id="gated", src="h", routing="route", scale=0.7))
    nodes = (Input(id="x", width=d_in), Route(id="route", src="x", gate=g, experts=E),
             Linear(id="h", src="x", weight=BlockRows(A) if kind == "block" else A), gate,
             Linear(id="out", src="gated", weight=BlockColumns(B), scale=1.5))
    params = tuple(ParamDecl(name=p.name, shape=p.shape, init="up") for p in (w, A, B))
    return verify(Graph(nodes=nodes, output="out", aux=(), params=params, d_in=d_in, d_out=d_out))


def _dense_delta(graph: Graph, params) -> torch.Tensor:
    """``ΔW [out, in]`` from the interpreter: ``Δy(e_j)`` is column j."""
    return interpret(graph, params, torch.eye(graph.d_in, dtype=torch.float64)).output.T


@given(adapter=st.one_of(loras(magnitude=False), static_pools()), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_reduction_equals_the_interpreter(adapter, d_in, d_out, seed):
    graph = build_graph(adapter, SiteShape(label="site", d_in=d_in, d_out=d_out))
    params = make_params(graph, seed)
    lr = reduce_site(graph, params)
    assert lr.rank <= sum(d.shape[-2] if len(d.shape) == 3 else d.shape[0] for d in graph.params if d.init != "one")
    assert_close(lr.delta_weight(), _dense_delta(graph, params))


@given(kind=st.sampled_from(["block", "outer"]), E=st.integers(1, 4), r=st.integers(1, 3), d_in=st.integers(1, 8),
       d_out=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_reduction_of_gated_forms_equals_the_interpreter(kind, E, r, d_in, d_out, seed):
    graph = _gated_graph(kind, E, r, d_in, d_out)
    params = make_params(graph, seed)
    assert_close(reduce_site(graph, params).delta_weight(), _dense_delta(graph, params))


@given(adapter=st.one_of(pools().filter(lambda p: not isinstance(p.router, mf.StaticRouter)), trees()),
       seed=st.integers(0, 99))
def test_token_routed_sites_are_not_reducible(adapter, seed):
    graph = build_graph(adapter, SiteShape(label="site", d_in=5, d_out=4))
    with pytest.raises(NotReducibleError) as info:
        reduce_site(graph, make_params(graph, seed))
    assert info.value.input_dependent and "router" in info.value.origin


# ---- the static gate: interpreter, verifier, printer, lowering ----------------------------

def test_static_pool_is_the_weighted_sum_of_its_experts():
    pool = mf.ExpertPool(experts=3, rank=2, alpha=6.0, router=mf.StaticRouter())
    graph = build_graph(pool, SiteShape(label="site", d_in=5, d_out=4))
    params = make_params(graph, 1)
    x = torch.randn(7, 5, dtype=torch.float64)
    A, B, w = params["A"], params["B"], params["router_w"]
    expected = sum(w[i] * 3.0 * (x @ A[i].T) @ B[i].T for i in range(3))
    assert_close(interpret(graph, params, x).output, expected)
    assert "route %x static(w=router_w) E=3" in print_graph(graph)


def test_verifier_rejects_static_weights_of_the_wrong_length():
    graph = build_graph(mf.ExpertPool(experts=3, rank=2, router=mf.StaticRouter()), SiteShape("site", 5, 4))
    bad_gate = StaticGate(weights=ParamRef("router_w", (2,)))
    nodes = tuple(n if not isinstance(n, Route) else Route(id=n.id, src=n.src, gate=bad_gate, experts=3)
                  for n in graph.nodes)
    params = tuple(d if d.name != "router_w" else ParamDecl(name="router_w", shape=(2,), init="one")
                   for d in graph.params)
    with pytest.raises(IRVerificationError, match="static weights have shape"):
        verify(graph.replace(nodes=nodes, params=params))


def test_static_router_takes_no_aux_loss():
    with pytest.raises(mf.SpecError, match="static router"):
        mf.ExpertPool(router=mf.StaticRouter(), aux_losses=[mf.CV2ImportanceLoad()])


@given(adapter=static_pools(), seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_lowered_static_pool_matches_the_interpreter_with_gradients(adapter, seed, T):
    graph = build_graph(adapter, SiteShape(label="site", d_in=6, d_out=5))
    params = make_params(graph, seed)
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for name, value in params.items():
            getattr(store, name).copy_(value)
    site = lower(graph, store)
    x = torch.randn(T, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = interpret(graph, leaves, x).output
    probe = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (ref * probe).sum().backward()
    out = site(x)[0]
    (out * probe).sum().backward()
    assert_close(out.detach(), ref.detach())
    for name, p in site.named_parameters():
        assert_close(p.grad, leaves[name].grad, msg=name)
    assert {n for n, _ in site.named_parameters()} == {d.name for d in graph.params if d.trainable}


# ---- whole models, loaded back by plain transformers -------------------------------------

def _mixed_spec(lora_roles, pool_roles, router=None) -> mf.AdapterSpec:
    return mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=lora_roles), adapter=mf.LoRA(rank=3, alpha=6)),
        mf.Site(target=mf.Target(roles=pool_roles),
                adapter=mf.ExpertPool(experts=3, rank=2, router=router or mf.StaticRouter(),
                                      shared_expert=mf.LoRA(rank=1))),
    ]).with_init(mf.Init(up="normal", std=0.2, seed=7))


def _randomize_static(handle) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in handle.modules.values():
            w = getattr(mod.site, "router_w", None)
            if w is not None and w.dim() == 1:
                w.copy_(torch.randn(w.shape, generator=gen))


MERGED = {  # case: (arch, spec, max_shard_size)
    "llama-sharded": ("llama", lambda: _mixed_spec(["q", "v", "down"], ["gate"]), "40KB"),
    "gpt2-conv1d": ("gpt2", lambda: _mixed_spec(["q"], ["up", "o"]), "5GB"),
    "qwen2-biases": ("qwen2", lambda: _mixed_spec(["k"], ["q"]), "5GB"),
}

_LOADER = textwrap.dedent("""
    import sys, torch
    sys.modules["moleforge"] = None  # importing moleforge now fails: the directories must not need it
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    out = {}
    for d in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            out[d] = model(ids).logits
    torch.save(out, sys.argv[2])
""")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Export every case, then load them all in one fresh interpreter."""
    root = tmp_path_factory.mktemp("merged")
    expected, dirs = {}, {}
    for case, (arch, make_spec, shard) in MERGED.items():
        model = tiny(arch)
        handle = mf.compile(make_spec(), model)
        _randomize_static(handle)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dirs[case] = mf.export_merged(handle, root / case, max_shard_size=shard)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export must not change the model"
        expected[case] = logits(model)
    torch.save(batch(), root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _LOADER, str(root / "ids.pt"), str(root / "out.pt"),
                    *map(str, dirs.values())], check=True, cwd=root, env=env, capture_output=True)
    got = torch.load(root / "out.pt")
    return {case: (expected[case], got[str(d)], d) for case, d in dirs.items()}


@pytest.mark.parametrize("case", sorted(MERGED))
def test_merged_model_loads_in_plain_transformers_with_adapted_logits(case, merged):
    expected, got, directory = merged[case]
    assert_close(got, expected, "float32_model")
    arch = MERGED[case][0]
    assert (expected - logits(tiny(arch))).abs().max() > 1e-3, "the adapter must change the logits"
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [type(tiny(arch)).__name__]


def test_sharded_export_has_an_index(merged):
    directory = merged["llama-sharded"][2]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((directory / s).is_file() for s in shards)
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert not any("base_layer" in k or ".site." in k for k in index["weight_map"])
    assert not (directory / "model.safetensors").exists()


def test_routed_sites_are_not_merged_unless_static_only(tmp_path):
    model = tiny("llama")
    handle = mf.compile(_mixed_spec(["q"], ["up"], router=mf.TopKRouter(k=2)), model)
    with pytest.raises(mf.NotMergeableError) as info:
        mf.export_merged(handle, tmp_path / "full")
    msg = str(info.value)
    assert "model.layers.0.mlp.up_proj" in msg and "sites[1].adapter.router" in msg and "static_only=True" in msg
    assert not (tmp_path / "full").exists()
    out = mf.export_merged(handle, tmp_path / "part", static_only=True)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    rest = mf.load(reloaded, out)
    assert list(rest.modules) == [n for n in handle.modules if "up_proj" in n]
    assert_close(logits(reloaded), logits(model), "float32_model")
    with pytest.raises(mf.CheckpointError, match="moleforge adapter"):
        mf.export_merged(mf.compile(_mixed_spec(["q"], ["v"]), tiny("llama")), out)


def test_tied_weights_are_not_merged(tmp_path):
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(modules=["lm_head"]), adapter=mf.LoRA(rank=2))])
    handle = mf.compile(spec.with_init(mf.Init(up="normal")), tiny("gpt2"))
    with pytest.raises(mf.NotMergeableError, match="tied"):
        mf.export_merged(handle, tmp_path)
