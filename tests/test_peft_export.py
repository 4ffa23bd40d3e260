"""``mf.export_peft``: LoRA-reducible adapters written in PEFT's format load in PEFT
(``PeftModel.from_pretrained``) with the adapted logits; routed ones are refused with advice."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

import moleforge as mf
from models import tiny
from peft_helpers import logits, make_peft_adapter, peft_logits
from tolerances import assert_close


def _lora_spec(down_roles, other_roles) -> mf.AdapterSpec:
    """Plain LoRA with per-layer rank overrides and an rsLoRA site: ranks and alphas differ per module."""
    return mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=down_roles, overrides=[mf.LayerOverride(layers=[1], rank=2)]),
                adapter=mf.LoRA(rank=4, alpha=8)),
        mf.Site(target=mf.Target(roles=other_roles), adapter=mf.LoRA(rank=3, alpha=5, scaling="rslora")),
    ]).with_init(mf.Init(up="normal", std=0.2, seed=4))


def _cat_spec(roles) -> mf.AdapterSpec:
    """Static-gated pools (CAT): per-expert factors with a shared expert, and a shared-A pool."""
    return mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=roles[:1]),
                adapter=mf.ExpertPool(experts=3, rank=2, alpha=4, router=mf.StaticRouter(),
                                      shared_expert=mf.LoRA(rank=2, alpha=3))),
        mf.Site(target=mf.Target(roles=roles[1:]),
                adapter=mf.ExpertPool(experts=2, rank=3, down=mf.Shared(), router=mf.StaticRouter())),
    ]).with_init(mf.Init(up="normal", std=0.2, seed=5))


def _set_static_weights(handle, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in handle.modules.values():
            w = mod.site.router_w
            w.copy_(torch.randn(w.shape, generator=gen))


CASES = {
    "llama-lora": ("llama", lambda: _lora_spec(["down", "up"], ["q", "v"])),
    "gpt2-lora": ("gpt2", lambda: _lora_spec(["down"], ["q", "o"])),
    "bert-lora": ("bert", lambda: _lora_spec(["down"], ["q", "k"])),
    "llama-cat": ("llama", lambda: _cat_spec(["q", "v", "gate"])),
    "gpt2-cat": ("gpt2", lambda: _cat_spec(["o", "up"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_the_export_with_the_adapted_logits(case, tmp_path):
    arch, make_spec = CASES[case]
    model = tiny(arch)
    handle = mf.compile(make_spec(), model)
    if "cat" in case:
        _set_static_weights(handle, seed=1)
    mf.export_peft(handle, tmp_path / "peft")
    assert_close(peft_logits(arch, tmp_path / "peft"), logits(model), "float32_model")
    assert (logits(model) - logits(tiny(arch))).abs().max() > 1e-3, "the adapter must change the logits"


def test_export_is_peft_format(tmp_path):
    model = tiny("gpt2")
    handle = mf.compile(_lora_spec(["down"], ["q"]), model)
    mf.export_peft(handle, tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"]
    assert sorted(config["target_modules"]) == sorted(handle.modules)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == {f"base_model.model.{m}.lora_{w}.weight" for m in handle.modules for w in "AB"}
    loaded = PeftModel.from_pretrained(tiny("gpt2"), str(tmp_path)).base_model.model
    assert loaded.get_submodule("transformer.h.1.mlp.c_proj").r["default"] == 2  # from rank_pattern


def test_imported_adapter_round_trips_unchanged(tmp_path):
    src = make_peft_adapter("llama", tmp_path / "src", seed=8, r=4, lora_alpha=16, target_modules=["k_proj", "o_proj"],
                            rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 2})
    handle = mf.from_peft(tiny("llama"), src)
    mf.export_peft(handle, tmp_path / "out")
    before = load_file(str(src / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert_close(peft_logits("llama", tmp_path / "out"), peft_logits("llama", src), "save_load")


def test_imported_experts_under_static_weights_export_as_one_lora(tmp_path):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter("llama", tmp_path / "b", seed=2, r=3, lora_alpha=3, target_modules=["v_proj"])
    model = tiny("llama")
    handle = mf.from_peft(model, [a, b])
    _set_static_weights(handle, seed=3)
    mf.export_peft(handle, tmp_path / "cat")
    assert_close(peft_logits("llama", tmp_path / "cat"), logits(model), "float32_model")


def test_routed_adapters_are_refused_with_advice(tmp_path):
    spec = mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=["q"]), adapter=mf.LoRA(rank=2)),
        mf.Site(target=mf.Target(roles=["gate"]),
                adapter=mf.ExpertPool(experts=4, rank=2, router=mf.TopKRouter(k=2))),
    ])
    handle = mf.compile(spec, tiny("llama"))
    with pytest.raises(mf.NotMergeableError) as info:
        mf.export_peft(handle, tmp_path)
    msg = str(info.value)
    assert "model.layers.0.mlp.gate_proj" in msg and "sites[1].adapter.router" in msg and "softmax_topk" in msg
    assert "static_only=True" in msg and "mf.save" in msg and "q_proj" not in msg
    assert not (tmp_path / "adapter_config.json").exists()
