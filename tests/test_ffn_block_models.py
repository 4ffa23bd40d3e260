"""FFN-block experts (``scope: "ffn_block"``) inside HF models: torch.fx recognition of every
supported architecture's MLP, the routed block against the interpreter, reversible injection,
and the errors for blocks that cannot be traced or routed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moleforge as mf
from conftest import assert_close
from ffn_block_helpers import POOL, block_spec, routed_blocks
from models import ARCHS, batch, tiny
from moleforge.integrations.block_module import BlockInput
from moleforge.ir import ExpertFFN, ExpertHidden, interpret

F64 = torch.float64
ACTIVATION_OF = {"llama": "silu", "qwen2": "silu", "mistral": "silu", "gpt2": "gelu_tanh", "bert": "gelu"}


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_block_computes_the_model_ffn(arch):
    """Zero up-projections: every expert is the frozen FFN and the gates sum to 1."""
    model, ids = tiny(arch), batch()
    base = model(ids).logits
    handle = mf.compile(block_spec(), model)
    blocks = routed_blocks(model)
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


# ---- hand-written MLPs: what cannot be routed, and what is recognised --------------------------

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
    assert not routed_blocks(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_block_scope_rejects_plain_lora_and_overlapping_sites():
    with pytest.raises(mf.SpecError, match="kind 'pool'"):
        mf.compile(mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up"]), scope="ffn_block",
                                                 adapter=mf.LoRA())]), tiny("llama"))
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL),
                                 mf.Site(target=mf.Target(roles=["down"]), adapter=mf.LoRA())])
    with pytest.raises(mf.InjectionError, match="down_proj"):
        mf.compile(spec, tiny("llama"))


@pytest.mark.parametrize("arch, pattern, found", [
    ("llama", r".*layers\.0\.(self_attn\.q_proj|mlp\.up_proj)", "'model.layers.0.self_attn.q_proj' (role q)"),
    ("gpt2", r".*h\.1\.(attn|mlp)\.c_proj", "'transformer.h.1.attn.c_proj' (role o)"),
])
def test_block_scope_module_patterns_reaching_attention_are_named(arch, pattern, found):
    """Roles are checked in the spec; module patterns once they meet the model, before any tracing."""
    model = tiny(arch)
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(modules=[pattern]), scope="ffn_block", adapter=POOL)])
    with pytest.raises(mf.InjectionError, match="targets attention projections") as err:
        mf.compile(spec, model)
    assert found in str(err.value) and "sites[0] (scope 'ffn_block')" in str(err.value)
    assert "torch.fx" not in str(err.value) and not routed_blocks(model)


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
