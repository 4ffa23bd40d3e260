"""The LoRA options and pool shapes of the family: parameter counts and Γ of the deepseek_mole and
flexmore presets against their papers' formulas, expert capacity counted by record_routing(),
dropout applied in training only and kept through PEFT import and export."""

from __future__ import annotations

import json
import math

import torch
from peft import PeftModel

import moleforge as mf
from models import batch, tiny
from peft_helpers import logits, make_peft_adapter, peft_logits
from tolerances import assert_close

LLAMA_SITES = {  # (d_in, d_out) per role on tiny("llama"): hidden 32, kv width 16, intermediate 64
    "q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 64), "up": (32, 64), "down": (64, 32),
}
LAYERS = 2


def _deepseek(d_in: int, d_out: int, routed=16, r=2, shared=2, r_s=4) -> int:
    """DeepSeekMoE: ``m·N`` fine-grained routed experts of rank r, a router over them, ``K_s`` shared
    experts of rank ``r_s``: ``mN·r·(d_in + d_out) + mN·d_in + K_s·r_s·(d_in + d_out)``."""
    return routed * r * (d_in + d_out) + routed * d_in + shared * r_s * (d_in + d_out)


def _flexmore(d_in: int, d_out: int, ranks=(2, 2, 4, 4, 8, 8)) -> int:
    """Experts of their own ranks: ``Σ_i r_i·(d_in + d_out) + E·d_in``."""
    return sum(ranks) * (d_in + d_out) + len(ranks) * d_in


def test_deepseek_mole_parameters_and_gamma_follow_the_formula():
    want = LAYERS * sum(_deepseek(*LLAMA_SITES[r]) for r in ("gate", "up", "down"))
    model = tiny("llama")
    assert mf.count_parameters("deepseek_mole", model) == want
    handle = mf.compile("deepseek_mole", model)
    assert sum(p.numel() for p in handle.trainable_parameters()) == want
    assert mf.structural_flexibility("deepseek_mole") == math.comb(16, 4) == 1820  # shared experts add no choice


def test_flexmore_parameters_and_gamma_follow_the_formula():
    want = LAYERS * sum(_flexmore(*LLAMA_SITES[r]) for r in LLAMA_SITES)
    model = tiny("llama")
    assert mf.count_parameters("flexmore", model) == want
    handle = mf.compile("flexmore", model)
    assert sum(p.numel() for p in handle.trainable_parameters()) == want
    assert mf.structural_flexibility("flexmore") == math.comb(6, 2)


def test_capacity_adds_the_smaller_expert_sets_to_gamma():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), adapter=mf.ExpertPool(
        experts=8, rank=2, router=mf.TopKRouter(k=2), capacity_factor=1.0))])
    assert mf.structural_flexibility(spec) == 1 + 8 + 28


def test_record_routing_counts_the_tokens_over_capacity():
    model = tiny("llama")
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), init=mf.Init(up="normal", seed=0),
                                         adapter=mf.ExpertPool(experts=4, rank=2, router=mf.TopKRouter(k=2),
                                                               capacity_factor=0.25))])
    handle = mf.compile(spec, model)
    ids = batch()
    with handle.record_routing() as log, torch.no_grad():
        model.eval()(input_ids=ids)
    T, cap = ids.numel(), math.ceil(0.25 * ids.numel() * 2 / 4)
    dropped = log.dropped()
    assert set(dropped) == set(handle.modules)
    for name, n in dropped.items():
        assert n >= T * 2 - 4 * cap > 0, (name, n)  # at most 4 experts · C slots are kept
        loads = log.expert_load()[name]
        assert len(loads) == 2  # the router's selections and what capacity kept
    uncapped = mf.compile(mf.presets.load("molora"), tiny("llama"))
    with uncapped.record_routing() as log2, torch.no_grad():
        uncapped.model.eval()(input_ids=ids)
    assert set(log2.dropped().values()) == {0}


def test_dropout_acts_in_training_only():
    model = tiny("llama")
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q", "v"]), init=mf.Init(up="normal", seed=1),
                                         adapter=mf.LoRA(rank=4, dropout=0.5))])
    mf.compile(spec, model)
    ids = batch()
    with torch.no_grad():
        a, b = model.eval()(input_ids=ids).logits, model(input_ids=ids).logits
        c, d = model.train()(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b), "evaluation draws nothing"
    assert not torch.allclose(c, d) and not torch.allclose(a, c), "training drops features, a new draw each call"


def test_peft_lora_dropout_is_imported_and_exported(tmp_path):
    path = make_peft_adapter("llama", tmp_path / "a", seed=5, r=4, lora_alpha=8, lora_dropout=0.15,
                             target_modules=["q_proj", "v_proj"])
    model = tiny("llama")
    handle = mf.from_peft(model, path)
    assert {s.adapter.dropout for s in handle.spec.sites} == {0.15}
    assert_close(logits(model), peft_logits("llama", path), "float32_model")
    out = mf.export_peft(handle, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.15
    again = PeftModel.from_pretrained(tiny("llama"), str(out))
    assert again.peft_config["default"].lora_dropout == 0.15
    assert_close(logits(again), peft_logits("llama", path), "float32_model")


def _peft_dora(arch: str, path, mods: list[str]):
    """A PEFT DoRA adapter with random A, B and magnitudes moved off their initial norms."""
    make_peft_adapter(arch, path, seed=7, r=4, lora_alpha=8, target_modules=mods, use_dora=True)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors = {k: v * 1.3 if k.endswith("lora_magnitude_vector") else v for k, v in tensors.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_peft_dora_imports_and_exports_with_peft_logits(tmp_path):
    for arch, mods in (("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])):
        path = _peft_dora(arch, tmp_path / arch, mods)
        want = peft_logits(arch, path)
        model = tiny(arch)
        assert (want - logits(model)).abs().max() > 1e-2, "the DoRA adapter changes the logits"
        handle = mf.from_peft(model, path)
        assert all(s.adapter.magnitude for s in handle.spec.sites)
        assert_close(logits(model), want, "float32_model")
        out = mf.export_peft(handle, tmp_path / f"{arch}-out")
        assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
        assert_close(peft_logits(arch, out), want, "float32_model")


def test_dora_trains_saves_and_loads(tmp_path):
    for arch in ("llama", "gpt2"):
        model = tiny(arch)
        spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q", "v", "down"]),
                                             adapter=mf.LoRA(rank=4, magnitude=True, dropout=0.1))])
        handle = mf.compile(spec, model)
        ids = batch()
        base = logits(tiny(arch))
        assert_close(logits(model), base, "float32_model")  # B = 0 and m = ‖W‖: the frozen layer
        opt = torch.optim.AdamW(list(handle.trainable_parameters()), lr=1e-2)
        model.train()
        losses = []
        for _ in range(8):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert any(n.endswith("magnitude") and p.abs().max() > 0 for n, p in handle.model.named_parameters())
        adapted = logits(model)
        mf.save(handle, tmp_path / arch)
        other = tiny(arch)
        mf.load(other, tmp_path / arch)
        assert_close(logits(other), adapted, "save_load")
