"""``mf.from_peft``: PEFT LoRA adapters, made and loaded by PEFT on tiny models, become
moleforge sites (one adapter) or frozen experts of a routed pool (several); logits match PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import moleforge as mf
from models import tiny
from peft_helpers import logits, make_peft_adapter, peft_logits
from tolerances import assert_close

SINGLE = {
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "qwen2-rslora-layers": ("qwen2", dict(r=3, lora_alpha=5, use_rslora=True, layers_to_transform=[1],
                                          layers_pattern="layers", target_modules=["q_proj", "o_proj", "gate_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                 rank_pattern={r"h\.0\.attn\.c_attn": 5})),
    "bert-all-linear": ("bert", dict(r=2, lora_alpha=2, target_modules="all-linear")),
}


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_one_adapter_gives_peft_logits(case, tmp_path):
    arch, config = SINGLE[case]
    path = make_peft_adapter(arch, tmp_path / "a", seed=3, **config)
    expected = peft_logits(arch, path)
    model = tiny(arch)
    base = logits(model)
    handle = mf.from_peft(model, path)
    got = logits(model)
    assert_close(got, expected, "float32_model")
    assert (got - base).abs().max() > 1e-3, "the adapter must change the logits"
    saved = PeftModel.from_pretrained(tiny(arch), str(path)).base_model.model
    for name, mod in handle.modules.items():  # ranks come from PEFT (rank_pattern included)
        assert mod.site.A.shape == saved.get_submodule(name).lora_A["default"].weight.shape


def test_layers_to_transform_limits_the_sites(tmp_path):
    path = make_peft_adapter("llama", tmp_path / "a", seed=1, r=2, target_modules=["q_proj"],
                             layers_to_transform=[1], layers_pattern="layers")
    handle = mf.from_peft(tiny("llama"), path)
    assert list(handle.modules) == ["model.layers.1.self_attn.q_proj"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Different ranks, alphas and targets: the first has no down_proj, the second no q_proj."""
    d = tmp_path_factory.mktemp("experts")
    a = make_peft_adapter("llama", d / "math", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter("llama", d / "code", seed=6, r=2, lora_alpha=6, use_rslora=True,
                          target_modules=["v_proj", "down_proj"])
    return a, b


def _peft_weighted_sum(paths, weights) -> torch.Tensor:
    """PEFT with every adapter active at once, adapter i's B scaled by ``weights[i]``."""
    names = [f"e{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(tiny("llama"), str(paths[0]), adapter_name=names[0])
    for n, p in zip(names[1:], paths[1:]):
        model.load_adapter(str(p), adapter_name=n)
    model.base_model.set_adapter(names)
    with torch.no_grad():
        for mod in model.modules():
            for n, w in zip(names, weights):
                if hasattr(mod, "lora_B") and n in mod.lora_B:
                    mod.lora_B[n].weight.mul_(w)
    return logits(model)


def test_static_pool_of_adapters_is_their_weighted_sum(two_adapters):
    model = tiny("llama")
    handle = mf.from_peft(model, list(two_adapters))
    weights = torch.tensor([0.7, -1.3])
    with torch.no_grad():
        for mod in handle.modules.values():
            mod.site.router_w.copy_(weights)
    assert_close(logits(model), _peft_weighted_sum(two_adapters, weights.tolist()), "float32_model")


def test_pool_experts_are_frozen_and_the_router_trains(two_adapters):
    model = tiny("llama")
    handle = mf.from_peft(model, list(two_adapters), router=mf.DenseRouter(), seed=0)
    trainable = dict(handle.named_parameters())
    assert trainable and all(k.endswith(".router_w") for k in trainable)
    with torch.no_grad():  # zero router weights: uniform gates 1/E, the mean of the adapters
        for p in trainable.values():
            p.zero_()
    assert_close(logits(model), _peft_weighted_sum(two_adapters, [0.5, 0.5]), "float32_model")
    model.train()
    ids = torch.arange(18).reshape(2, 9) % 60
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_topk_router_over_imported_experts_saves_and_loads(two_adapters, tmp_path):
    model = tiny("llama")
    handle = mf.from_peft(model, list(two_adapters), router=mf.TopKRouter(k=1), seed=2, frozen=False)
    assert any(k.endswith(".A") for k, _ in handle.named_parameters()), "frozen=False trains the experts"
    mf.save(handle, tmp_path / "saved")
    again = tiny("llama")
    mf.load(again, tmp_path / "saved")
    assert_close(logits(again), logits(model), "save_load")


def test_unsupported_variants_and_mismatched_models_are_refused(tmp_path):
    variant = make_peft_adapter("llama", tmp_path / "variant", seed=0, r=2, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(mf.CheckpointError, match="a bias on lora_B"):
        mf.from_peft(tiny("llama"), variant)
    dora = make_peft_adapter("llama", tmp_path / "dora", seed=0, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(mf.CheckpointError, match="DoRA adapters \\(use_dora\\) import as LoRA sites"):
        mf.from_peft(tiny("llama"), [dora, dora])  # pool experts have no magnitudes
    gpt2 = make_peft_adapter("gpt2", tmp_path / "gpt2", seed=0, r=2, target_modules=["c_attn"])
    model = tiny("llama")
    with pytest.raises(mf.CheckpointError, match="c_attn"):
        mf.from_peft(model, gpt2)
    assert not any(type(m).__name__ == "AdaptedLinear" for m in model.modules()), "the model is left as it was"
    with pytest.raises(mf.CheckpointError, match="adapter_config.json"):
        mf.from_peft(tiny("llama"), tmp_path / "nowhere")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(mf.CheckpointError, match="IA3"):
        mf.from_peft(tiny("llama"), dora)
