"""Adapters on quantised frozen bases, the way QLoRA users train: torchao's weight-only int8
(``quantize_`` on the model, or transformers' ``TorchAoConfig`` in ``from_pretrained``) and
bitsandbytes' 4-bit and 8-bit linears (``BitsAndBytesConfig``; its CPU backend runs them here).

A site on a quantised linear must compute what the same site computes on a float model holding the
dequantised weights (the ``W`` the quantised linear multiplies by): logits and adapter gradients, with
up-projections drawn non-zero, for linear sites, routed FFN blocks (which run the frozen projections
themselves) and DoRA (which reads ``W``'s column norms). The base stays quantised and frozen; the
adapter trains, saves and loads to the same logits; the merged export writes a float model."""

from __future__ import annotations

import json

import pytest
import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TorchAoConfig

import moleforge as mf
from models import VOCAB, batch
from moleforge.integrations.quantized import dequantized, is_quantized, quantized_modules
from tolerances import assert_close

QUANTIZERS = {
    "torchao_int8": lambda: TorchAoConfig(Int8WeightOnlyConfig()),
    "bnb_4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    "bnb_8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-layer Llama of width 64, saved: bitsandbytes' 4-bit inference kernel on CPU needs
    every input width to be a multiple of its block of 64."""
    folder = tmp_path_factory.mktemp("quantized") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def quantized_model(folder, quantizer: str):
    """The saved tiny Llama quantised by ``quantizer`` (``"torchao_quantize_"``: torchao's
    ``quantize_`` on the loaded model; the others through ``from_pretrained``)."""
    if quantizer == "torchao_quantize_":
        model = AutoModelForCausalLM.from_pretrained(folder)
        quantize_(model, Int8WeightOnlyConfig())
        return model
    device = "cuda" if quantizer.endswith("_cuda") else "cpu"
    config = QUANTIZERS[quantizer.removesuffix("_cuda")]()
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=device)


def float_twin(folder, quantized):
    """The saved model with each quantised linear's weight replaced by its dequantised values."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    for name, mod in quantized_modules(quantized).items():
        model.get_submodule(name).weight.data.copy_(dequantized(mod).cpu())
    return model


def spec_of(preset: str):
    spec = mf.presets.load(preset.removesuffix("_dora")).model_dump(mode="json")
    if preset.endswith("_dora"):
        spec["sites"][0]["adapter"]["magnitude"] = True
    return mf.AdapterSpec.model_validate(spec).with_init(mf.Init(up="normal", std=0.3, seed=1))


def train_step(model, spec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compile, one training forward and backward: the logits and every adapter gradient."""
    handle = mf.compile(spec, model)
    model.train()
    ids = batch().to(model.device)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().cpu(), {k: p.grad.cpu() for k, p in handle.named_parameters() if p.requires_grad}


CASES = [("torchao_quantize_", "lora"), ("torchao_quantize_", "molora"), ("torchao_int8", "smore"),
         ("torchao_int8", "mixlora"), ("torchao_int8", "lora_dora"), ("bnb_8bit", "molora"), ("bnb_8bit", "smore"),
         ("bnb_8bit", "mixlora"), ("bnb_8bit", "lora_dora")]


@pytest.mark.parametrize("quantizer,preset", CASES)
def test_sites_on_quantized_linears_compute_as_on_the_dequantized_weights(saved, quantizer, preset):
    model = quantized_model(saved, quantizer)
    twin = float_twin(saved, model)
    assert len([n for n in quantized_modules(model) if ".layers.0." in n]) == 7, "every linear of the layer"
    logits, grads = train_step(model, spec_of(preset))
    want_logits, want_grads = train_step(twin, spec_of(preset))
    assert_close(logits, want_logits, "float32_model")
    assert set(grads) == set(want_grads)
    for key, g in want_grads.items():
        assert g.abs().max() > 0, f"{key}: no gradient, the comparison would be vacuous"
        assert_close(grads[key], g, "float32_model", msg=key)
    for name, mod in quantized_modules(model).items():
        assert is_quantized(mod.weight) and mod.weight.grad is None and not mod.weight.requires_grad, name


@pytest.mark.parametrize("quantizer", ["torchao_int8", "bnb_8bit"])
def test_an_adapter_on_a_quantized_base_trains_saves_and_loads(saved, tmp_path, quantizer):
    model = quantized_model(saved, quantizer)
    frozen = {n: dequantized(m).clone() for n, m in quantized_modules(model).items()}
    handle = mf.compile("molora", model)
    start = {k: v.clone() for k, v in handle.state_dict().items()}
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    ids = batch(seed=3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(v, start[k]) for k, v in handle.state_dict().items()), "the adapter trained"
    for name, mod in quantized_modules(model).items():
        same = torch.equal(dequantized(mod), frozen[name.replace(".base_layer", "")])
        assert is_quantized(mod.weight) and same, f"{name} changed"
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    mf.save(handle, tmp_path / "adapter")
    fresh = quantized_model(saved, quantizer)
    mf.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(fresh(input_ids=ids).logits, want, "save_load")


@pytest.mark.parametrize("quantizer", ["torchao_int8", "bnb_8bit"])
def test_merged_export_of_a_quantized_base_writes_the_float_model(saved, tmp_path, quantizer):
    """Dequantise, merge, write: a plain float model, without ``quantization_config``, with the
    logits of the adapter on the dequantised weights (bitsandbytes' 8-bit inference also rounds
    the activations, which a float model cannot repeat)."""
    model = quantized_model(saved, quantizer)
    twin = float_twin(saved, model)
    handle = mf.compile(spec_of("lora"), model)
    mf.compile(spec_of("lora"), twin)
    ids = batch(seed=4)
    with torch.no_grad():
        want = twin(input_ids=ids).logits
    mf.export_merged(handle, tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not quantized_modules(merged)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, want, "float32_model")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["molora", "mixlora", "lora_dora"])
def test_sites_on_bitsandbytes_4bit_linears_on_cuda(saved, preset):
    """bitsandbytes' 4-bit linears on CUDA (on a CPU its kernel has no autograd formula for the
    input: the gradients to earlier layers would be wrong, so the CPU cases above use 8-bit)."""
    model = quantized_model(saved, "bnb_4bit_cuda")
    twin = float_twin(saved, model).cuda()
    logits, grads = train_step(model, spec_of(preset))
    want_logits, want_grads = train_step(twin, spec_of(preset))
    assert_close(logits, want_logits, "float32_model")
    for key, g in want_grads.items():
        assert g.abs().max() > 0, key
        assert_close(grads[key], g, "float32_model", msg=key)
