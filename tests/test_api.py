"""The public API around compile: parameter counts against the METHODS.md formulas, Γ,
and the errors a user meets (bad targets, atomic injection, damaged or mismatched saves)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import moleforge as mf
from models import batch, tiny

LLAMA_SITES = {  # (d_in, d_out) per role on tiny("llama"): hidden 32, kv width 16, intermediate 64
    "q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 64), "up": (32, 64), "down": (64, 32),
}
LAYERS = 2


def _sum(roles, per_site):
    return LAYERS * sum(per_site(*LLAMA_SITES[r]) for r in roles)


def _smore(d_in, d_out, levels=((4, 8, 2), (4, 8, 2)), m=32, g=32, bias=True):
    L = len(levels)
    widths = [0]
    for s, r, _ in levels:
        widths.append(widths[-1] + s * r)
    total = sum(s * d_in * r for s, r, _ in levels)                                      # A
    total += sum(s * r * widths[i + 1] + widths[i] * widths[i + 1] for i, (s, r, _) in enumerate(levels))  # B, W
    total += widths[-1] * d_out                                                           # W_proj
    total += d_in * m                                                                     # router down-projection
    for i, (s, _, _) in enumerate(levels):
        in_l = m + (L - 1 - i) * g
        total += in_l * g + g * g + 2 * g + s * g                                         # query MLP, keys
    if bias:
        total += m + d_out + sum(s * r + s * widths[i + 1] for i, (s, r, _) in enumerate(levels))
        total += sum(widths[i + 1] for i in range(1, L))                                  # W_l biases
    return total


ALL = ("q", "k", "v", "o", "gate", "up", "down")
FFN = ("gate", "up", "down")

EXPECTED = {
    "lora": _sum(ALL, lambda i, o: 8 * (i + o)),
    "molora": _sum(ALL, lambda i, o: 8 * 8 * (i + o) + i * 8),
    "hydralora": _sum(FFN, lambda i, o: 8 * i + 4 * 8 * o + i * 4),
    "loramoe": _sum(FFN, lambda i, o: 6 * 4 * (i + o) + i * 6),
    "smora": _sum(("q", "v"), lambda i, o: 64 * (i + o) + i * 64),
    "flylora": _sum(ALL, lambda i, o: 32 * o),
    "smore": _sum(FFN, _smore),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_count_parameters_matches_formulas(preset):
    model = tiny("llama")
    assert mf.count_parameters(mf.presets.load(preset), model) == EXPECTED[preset]
    handle = mf.compile(preset, model)
    assert sum(p.numel() for p in handle.trainable_parameters()) == EXPECTED[preset]


def test_mola_counts_follow_depth_quarters():
    model = tiny("llama", layers=4)
    # layers 0..3 -> quarters -> 2, 4, 6, 8 experts
    want = sum(E * 8 * (i + o) + i * E for E in (2, 4, 6, 8) for i, o in LLAMA_SITES.values())
    assert mf.count_parameters("mola", model) == want


def test_smore_breakdown_is_a_lora_of_rank_d_L_plus_small_terms():
    parts = mf.count_parameters("smore", tiny("llama"), breakdown=True)
    assert parts["A0"] == parts["A1"] == LAYERS * sum(4 * 8 * LLAMA_SITES[r][0] for r in FFN)
    assert parts["proj_w"] == LAYERS * sum(64 * LLAMA_SITES[r][1] for r in FFN)
    assert parts["W1"] == LAYERS * 3 * 64 * 32


def test_structural_flexibility():
    assert mf.structural_flexibility(mf.presets.load("smore")) == 216
    assert mf.structural_flexibility("molora") == math.comb(8, 2)
    assert mf.structural_flexibility("lora") == 1
    assert mf.structural_flexibility("hydralora") == 1
    assert mf.structural_flexibility("smora") == math.comb(64, 8)
    three = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up"]), adapter=mf.ResidualTree(
        levels=[mf.TreeLevel(experts=4, rank=8, fanout=2)] * 3))])
    assert mf.structural_flexibility(three) == 279_936
    mola = mf.structural_flexibility("mola")
    assert isinstance(mola, dict) and sorted(set(mola.values())) == [1, 6, 15, 28]


def test_no_matching_module_is_a_clear_error():
    model = tiny("llama")
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(modules=[r".*\.nonexistent"]))])
    with pytest.raises(mf.InjectionError, match="matches no nn.Linear"):
        mf.compile(spec, model)


def test_missing_role_warns_and_names_it():
    with pytest.warns(UserWarning, match="no linear for role.*gate"):
        mf.compile("hydralora", tiny("gpt2"))


def test_two_sites_claiming_one_module():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"])),
                                 mf.Site(target=mf.Target(modules=[r".*q_proj"]))])
    with pytest.raises(mf.InjectionError, match="targeted by sites\\[0\\] and sites\\[1\\]"):
        mf.compile(spec, tiny("llama"))


FFN_ONLY = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up", "down"]), scope="ffn_block",
                                         adapter=mf.ExpertPool(experts=2, rank=2, router=mf.TopKRouter(k=1)))])
UP_ONLY = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["up"]))])


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("first, second", [(FFN_ONLY, UP_ONLY), (FFN_ONLY, "lora"), (FFN_ONLY, FFN_ONLY),
                                           ("lora", FFN_ONLY), (UP_ONLY, UP_ONLY)])
def test_a_second_adapter_is_refused_with_remove_first(arch, first, second):
    """Whatever the two specs adapt (linears hidden inside a routed FFN block included), the
    second compile says to call ``remove()`` first and leaves the model as it was."""
    model = tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = mf.compile(first, model)
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(mf.InjectionError, match=r"already holds a moleforge adapter .*call remove\(\) first"):
            mf.compile(second, model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf.compile(second, model).remove()


def test_compiling_twice_is_refused_until_removed():
    model = tiny("llama")
    h = mf.compile("lora", model)
    with pytest.raises(mf.InjectionError, match=r"already holds a moleforge adapter.*call remove\(\) first"):
        mf.compile("lora", model)
    h.remove()
    h.remove()  # idempotent
    mf.compile("lora", model).remove()


def test_injection_is_atomic(monkeypatch):
    model = tiny("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    ids = batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    import sys

    import moleforge.integrations.inject as inject

    calls = {"n": 0}

    def fail_on_fifth(name, old):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure while swapping")

    compile_module = sys.modules["moleforge.compiler.compile"]
    monkeypatch.setattr(compile_module, "swap_modules",
                        lambda model, repl: inject.swap_modules(model, repl, check=fail_on_fifth))
    with pytest.raises(mf.InjectionError, match="left as it was"):
        mf.compile("molora", model)
    assert calls["n"] == 5
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_gpt2_conv1d_and_bert_linears_get_adapters():
    with pytest.warns(UserWarning, match="gate"):
        h = mf.compile("lora", tiny("gpt2"))
    names = sorted(h.modules)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.mlp.c_proj" in names
    assert h.modules["transformer.h.0.attn.c_attn"].out_features == 96
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hb = mf.compile("lora", tiny("bert"))
    assert "bert.encoder.layer.0.attention.self.query" in hb.modules
    assert "bert.encoder.layer.0.output.dense" in hb.modules
    assert "bert.encoder.layer.0.attention.output.dense" in hb.modules


def test_save_writes_only_our_files_atomically(tmp_path):
    model = tiny("llama")
    h = mf.compile("smore", model)
    out = tmp_path / "adapter"
    mf.save(h, out)
    assert sorted(p.name for p in out.iterdir()) == ["moleforge_config.json", "moleforge_model.safetensors"]
    cfg = json.loads((out / "moleforge_config.json").read_text())
    assert cfg["spec"]["name"] == "smore" and cfg["format_version"] == 1
    mf.save(h, out)  # overwriting leaves no temporary files
    assert len(list(out.iterdir())) == 2


def test_load_reports_every_mismatch(tmp_path):
    mf.save(mf.compile("lora", tiny("llama")), tmp_path / "a")
    import transformers as tf
    torch.manual_seed(0)
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(mf.CheckpointError, match="does not fit") as info:
        mf.load(wider, tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj.A" in str(info.value)
    assert not any(type(m).__name__ == "AdaptedLinear" for m in wider.modules())


def test_load_damaged_or_missing_files(tmp_path):
    with pytest.raises(mf.CheckpointError, match="moleforge_config.json is missing"):
        mf.load(tiny("llama"), tmp_path)
    mf.save(mf.compile("lora", tiny("llama")), tmp_path / "a")
    (tmp_path / "a" / "moleforge_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(mf.CheckpointError, match="could not be read as safetensors"):
        mf.load(tiny("llama"), tmp_path / "a")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_load_refuses_tensors_of_another_dtype(tmp_path, dtype):
    """A file whose tensors were converted after saving is refused, naming the tensor, its dtype
    and the fix, and leaves the model as it was; float32 and float64 load into one another."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    mf.save(mf.compile("lora", tiny("llama")), tmp_path / "a")
    weights = tmp_path / "a" / "moleforge_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.1.mlp.down_proj.B"
    save_file({**tensors, key: tensors[key].to(dtype)}, weights, metadata=metadata)
    model = tiny("llama")
    with pytest.raises(mf.CheckpointError, match=f"{key}: saved as {dtype}, this adapter stores it as torch.float32"):
        mf.load(model, tmp_path / "a")
    assert not any(type(m).__name__ == "AdaptedLinear" for m in model.modules())
    handle = mf.compile("lora", tiny("llama"))
    with pytest.raises(mf.CheckpointError, match="convert the file's tensors back"):
        handle.load_state_dict({key: tensors[key].to(dtype)})
    handle.load_state_dict({key: tensors[key].double()})
    assert torch.equal(handle.state_dict()[key], tensors[key])


def test_dict_json_and_preset_name_specs_are_accepted():
    model = tiny("llama")
    spec = mf.presets.load("lora")
    for form in (spec.model_dump(), spec.model_dump_json(), "lora"):
        mf.compile(form, model).remove()


def test_eval_mode_sites_follow_the_model():
    model = tiny("llama")
    h = mf.compile("smore_noisy", model)
    assert not any(m.training for m in h.modules.values())
    model.train()
    assert all(m.training for m in h.modules.values())


def test_sample_types_drive_localized_balancing():
    model = tiny("llama")
    h = mf.compile("loramoe", model)
    h.eval_aux()  # evaluation mode without autograd computes no aux loss unless asked
    ids = batch(B=2)
    with torch.no_grad():
        for p in h.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model(input_ids=ids)
        plain = h.aux_loss().clone()
        with h.sample_types(torch.tensor([0, 1])):
            model(input_ids=ids)
            typed = h.aux_loss().clone()
    assert not torch.allclose(plain, typed)


def test_update_balancing_moves_the_bias_toward_balance():
    model = tiny("llama")
    h = mf.compile("smora", model)
    model.train()
    model(input_ids=batch())
    name = next(iter(h.modules))
    site = h.modules[name].site
    counts = site.balance_counts.clone()
    assert counts.sum() > 0
    h.update_balancing()
    moved = site.balance
    over = counts > counts.mean()
    assert torch.all(moved[over] < 0) and torch.all(site.balance_counts == 0)


def test_attach_updates_balancing_after_each_optimizer_step():
    model = tiny("llama")
    h = mf.compile("flylora", model)
    opt = torch.optim.SGD(h.trainable_parameters(), lr=0.1)
    h.attach(opt)
    model.train()
    site = next(iter(h.modules.values())).site
    model(input_ids=batch(), labels=batch()).loss.backward()
    assert site.balance_counts.sum() > 0
    opt.step()
    assert site.balance_counts.sum() == 0 and site.balance.abs().sum() > 0


# ---- absurd sizes are refused before anything is allocated ---------------------------------------------

HUGE_TREE = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), adapter=mf.ResidualTree(
    levels=[mf.TreeLevel(experts=10**6, rank=8, fanout=2)]))])
HUGE_BLOCK = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                           adapter=mf.ExpertPool(experts=10**7, rank=8))])


@pytest.mark.parametrize("spec, module, tensor", [
    (HUGE_TREE, "model.layers.0.self_attn.q_proj", "B0 (1000000, 8000000, 8)"),
    (HUGE_BLOCK, "model.layers.0.mlp", "B_up (10000000, 64, 8)"),
], ids=["tree", "ffn_block"])
def test_an_absurd_adapter_is_refused_with_its_numbers_before_allocating(spec, module, tensor):
    import time

    model = tiny("llama")
    n = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with pytest.raises(mf.InjectionError) as info:
        mf.compile(spec, model)
    assert time.perf_counter() - start < 10, "refused from the plain graph, before the passes"
    msg = str(info.value)
    assert f"sites[0] at module {module!r} would store" in msg and " GiB in torch.float32" in msg
    assert f"more than the limit of {2**28:,} per site (4 × the model's {n:,} parameters" in msg
    assert tensor in msg and "MOLEFORGE_MAX_SITE_PARAMS" in msg
    assert not any(type(m).__name__ in ("AdaptedLinear", "MoleforgeBlock") for m in model.modules())


def test_the_site_limit_can_be_set_and_the_memory_of_the_device_is_checked(monkeypatch):
    from moleforge.compiler import sizes

    spec = mf.presets.load("lora")
    monkeypatch.setenv("MOLEFORGE_MAX_SITE_PARAMS", "100")
    with pytest.raises(mf.InjectionError, match=r"would store 512 adapter parameters .* limit of 100 per site "
                                                r"\(MOLEFORGE_MAX_SITE_PARAMS=100\)"):
        mf.compile(spec, tiny("llama"))
    monkeypatch.setenv("MOLEFORGE_MAX_SITE_PARAMS", "1e3")
    mf.compile(spec, tiny("llama")).remove()
    monkeypatch.setenv("MOLEFORGE_MAX_SITE_PARAMS", "lots")
    with pytest.raises(mf.InjectionError, match="MOLEFORGE_MAX_SITE_PARAMS='lots' is not a number"):
        mf.compile(spec, tiny("llama"))
    monkeypatch.delenv("MOLEFORGE_MAX_SITE_PARAMS")
    monkeypatch.setattr(sizes, "_device_memory", lambda model: (16 * 2**10, "this machine's RAM"))
    total = mf.count_parameters(spec, tiny("llama"))
    with pytest.raises(mf.InjectionError, match=f"would store {total:,} parameters over 14 sites .* more than "
                                                r"the 0\.0 GiB of this machine's RAM"):
        mf.compile(spec, tiny("llama"))
