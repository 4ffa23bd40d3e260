"""LoRA Soups / CAT (the ``lora_soups`` preset over PEFT LoRA folders): after training its
per-module weights, the adapter exports as one PEFT LoRA equal, module by module, to PEFT's
``add_weighted_adapter(..., combination_type="cat")`` with the learned weights, and merges into a
plain HF model with the adapter's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import moleforge as mf
from models import batch, tiny
from peft_helpers import logits, make_peft_adapter
from tolerances import assert_close

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("skills")
    return [make_peft_adapter("llama", d / f"skill{i}", seed=10 + i, r=r, lora_alpha=a, target_modules=MODULES)
            for i, (r, a) in enumerate([(4, 8), (4, 8), (4, 8)])]


def _soup(folders):
    spec = mf.presets.load("lora_soups").model_dump()
    pool = spec["sites"][0]["adapter"]
    for k in ("experts", "rank", "alpha", "frozen_experts"):
        pool.pop(k)
    pool["experts_from"] = [{"path": str(p)} for p in folders]
    spec["sites"][0]["target"] = {"roles": ["q", "v", "down"]}
    return spec


def _train(model, handle, steps=4):
    """A few plain SGD steps: the per-module weights move away from 1 and from each other."""
    opt = torch.optim.SGD(list(handle.trainable_parameters()), lr=2.0)
    model.train()
    for s in range(steps):
        opt.zero_grad()
        model(batch(seed=s), labels=batch(seed=s)).loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(folders):
    model = tiny("llama")
    handle = mf.compile(_soup(folders), model)
    _train(model, handle)
    weights = {n: m.site.router_w.detach().clone() for n, m in handle.modules.items()}
    assert all(not torch.allclose(w, torch.ones(3)) for w in weights.values()), "training must move the weights"
    assert len({tuple(w.tolist()) for w in weights.values()}) == len(weights), "the weights are per module"
    return model, handle, weights


def _peft_cat_delta(folders, weights: torch.Tensor, module: str) -> torch.Tensor:
    """``B_cat @ A_cat`` of PEFT's cat combination of the folders with ``weights``, at ``module``."""
    names = [f"s{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(tiny("llama"), str(folders[0]), adapter_name=names[0])
    for n, p in zip(names[1:], folders[1:]):
        model.load_adapter(str(p), adapter_name=n)
    model.add_weighted_adapter(names, weights.tolist(), "cat", combination_type="cat")
    layer = model.base_model.model.get_submodule(module)
    a, b = layer.lora_A["cat"].weight, layer.lora_B["cat"].weight
    assert a.shape[0] == sum(layer.r[n] for n in names)
    return layer.scaling["cat"] * (b.double() @ a.double())


def test_exported_lora_equals_peft_cat_with_the_learned_weights(folders, trained, tmp_path):
    model, handle, weights = trained
    mf.export_peft(handle, tmp_path / "cat")
    exported = PeftModel.from_pretrained(tiny("llama"), str(tmp_path / "cat"))
    assert_close(logits(exported), logits(model), "float32_model")
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        layer = exported.base_model.model.get_submodule(module)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        ours = layer.scaling["default"] * (b @ a)
        assert_close(ours, _peft_cat_delta(folders, weights[module], module), "float32_model")


def test_merged_model_gives_the_adapter_logits(trained, tmp_path):
    model, handle, _ = trained
    mf.export_merged(handle, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert_close(logits(merged), logits(model), "float32_model")
    assert (logits(merged) - logits(tiny("llama"))).abs().max() > 1e-3


def test_only_the_weights_train(trained):
    _, handle, _ = trained
    site = next(iter(handle.modules.values())).site
    assert site.router_w.requires_grad and not site.A.requires_grad and not site.B.requires_grad
    assert sum(p.numel() for p in handle.trainable_parameters()) == 3 * len(handle.modules)


def test_static_weights_start_at_the_mean_when_asked():
    """``start: "mean"`` (the lora_soups preset): CAT starts from the average of the experts, 1/E."""
    router = {"kind": "static", "start": "mean"}
    pool = {"kind": "pool", "experts": 4, "rank": 2, "router": router}
    spec = {"sites": [{"target": {"roles": ["q"]}, "adapter": pool}]}
    handle = mf.compile(spec, tiny("llama"))
    for m in handle.modules.values():
        assert torch.equal(m.site.router_w, torch.full((4,), 0.25))
    assert mf.presets.load("lora_soups").sites[0].adapter.router.start == "mean"
