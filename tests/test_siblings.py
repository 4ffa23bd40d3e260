"""Sibling sites found on real model structures and fused end to end: same logits and gradients
as the unfused adapter, one GEMM per group per forward, removal and save/load unaffected."""

from __future__ import annotations

import copy

import torch

import moleforge as mf
from models import batch, tiny
from moleforge.backends.runtime.siblings import SiblingGroup
from moleforge.integrations.siblings import find_siblings
from moleforge.integrations.sites import resolve_sites
from tolerances import assert_close

SPEC = mf.presets.load("molora").with_init(mf.Init(up="normal", std=0.2, seed=3))


def _names(model):
    return [s.name for s in resolve_sites(SPEC, model)]


def test_llama_siblings_are_qkv_and_gate_up_by_hooks_and_by_export():
    model = tiny("llama")
    found = find_siblings(model, _names(model))
    assert found.groups[:2] == [[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"],
                                ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]]
    assert len(found.groups) == 4
    assert find_siblings(model, _names(model), method="export").groups == found.groups


def test_bert_query_key_value_are_siblings_and_gpt2_has_none():
    bert = tiny("bert")
    assert [g[0].rsplit(".", 1)[1] for g in find_siblings(bert, _names(bert)).groups] == ["query", "query"]
    gpt2 = tiny("gpt2")
    assert find_siblings(gpt2, _names(gpt2)).groups == []


def test_fused_siblings_give_the_unfused_logits_and_gradients(tmp_path, monkeypatch):
    # the torch ops' plan: the sparse pools' CPU kernel computes each router itself (no sibling groups)
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "0")
    base = tiny("llama")
    ids = batch()
    plain_model, fused_model = copy.deepcopy(base), copy.deepcopy(base)
    plain = mf.compile(SPEC, plain_model, siblings=False)
    fused = mf.compile(SPEC, fused_model)
    groups = {id(m.site.sibling_group): m.site.sibling_group for m in fused.modules.values()
              if m.site.sibling_group is not None}
    assert len(groups) == 4 and all(isinstance(g, SiblingGroup) for g in groups.values())
    assert all(plain.modules[n].site.sibling_group is None for n in plain.modules)
    plain_model.train()
    fused_model.train()
    out_plain, out_fused = plain_model(input_ids=ids, labels=ids), fused_model(input_ids=ids, labels=ids)
    assert all(g.gemms == 1 for g in groups.values()), "one fused GEMM per group per forward"
    assert_close(out_fused.logits, out_plain.logits, "float32_model")
    out_plain.loss.backward()
    out_fused.loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, grads[name].grad, "float32_model", msg=name)

    fused_model.eval()
    with torch.no_grad():
        logits = fused_model(input_ids=ids).logits
    mf.save(fused, tmp_path / "a")
    again = mf.load(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert_close(again.model(input_ids=ids).logits, logits, "save_load")
    fused.remove()
    with torch.no_grad():
        assert torch.equal(fused_model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_under_torch_compile_each_member_computes_its_own_linear():
    model = tiny("llama")
    mf.compile(SPEC, model)
    ids = batch()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")(input_ids=ids).logits
    assert_close(compiled, eager, "float32_model")
