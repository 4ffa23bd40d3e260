"""Pools whose experts are PEFT LoRA folders named in the JSON spec (``experts_from``): the
folders made by PEFT itself on tiny models; logits equal PEFT's; misfits name folder, module and
shape; save/load without the folders; inspect and explain show where each expert came from."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import moleforge as mf
from models import batch, tiny
from peft_helpers import logits, make_peft_adapter
from tolerances import assert_close

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three task LoRAs on the same modules: ranks 4, 2 and 4, alphas 8, 3 and 8."""
    d = tmp_path_factory.mktemp("tasks")
    return [make_peft_adapter("llama", d / "math", seed=5, r=4, lora_alpha=8, target_modules=MODULES),
            make_peft_adapter("llama", d / "code", seed=6, r=2, lora_alpha=3, target_modules=MODULES),
            make_peft_adapter("llama", d / "chat", seed=7, r=4, lora_alpha=8, target_modules=MODULES)]


def _spec(paths, router=None, **pool) -> dict:
    return {"name": "composed", "sites": [{
        "target": {"roles": ["q", "v", "down"]},
        "adapter": {"kind": "pool", "router": router or {"kind": "static", "trainable": False},
                    "experts_from": [{"path": str(p)} for p in paths], **pool}}]}


def _peft_all_on(paths) -> torch.Tensor:
    """PEFT with every adapter active at once: the sum of the LoRAs."""
    names = [f"e{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(tiny("llama"), str(paths[0]), adapter_name=names[0])
    for n, p in zip(names[1:], paths[1:]):
        model.load_adapter(str(p), adapter_name=n)
    model.base_model.set_adapter(names)
    return logits(model)


def test_folders_named_in_json_give_the_sum_of_the_loras(folders):
    spec = mf.AdapterSpec.model_validate_json(json.dumps(_spec(folders)))
    model = tiny("llama")
    base = logits(model)
    handle = mf.compile(spec, model)
    got = logits(model)
    assert_close(got, _peft_all_on(folders), "float32_model")
    assert (got - base).abs().max() > 1e-3, "the experts must change the logits"
    pool = handle.spec.sites[0].adapter
    assert [(s.rank, s.alpha) for s in pool.experts_from] == [(4, 8.0), (2, 3.0), (4, 8.0)]
    assert pool.experts == 3 and pool.rank == 4 and pool.frozen_experts


def test_frozen_experts_get_no_gradient_and_the_router_does(folders):
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "topk", "k": 2}), model)
    before = {k: v.clone() for k, v in handle.state_dict().items() if k.endswith((".A", ".B"))}
    model.train()(batch(), labels=batch()).loss.backward()
    site = next(iter(handle.modules.values())).site
    assert site.router_w.grad is not None and site.router_w.grad.abs().sum() > 0
    assert not site.A.requires_grad and not site.B.requires_grad
    after = handle.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_trainable_folders_train(folders):
    spec = _spec(folders)
    for src in spec["sites"][0]["adapter"]["experts_from"]:
        src["trainable"] = True
    handle = mf.compile(spec, tiny("llama"))
    site = next(iter(handle.modules.values())).site
    assert site.A.requires_grad and site.B.requires_grad


def test_save_and_load_need_no_folders(folders, tmp_path):
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "dense"}), model)
    expected = logits(model)
    mf.save(handle, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "moleforge_config.json").read_text())
    srcs = cfg["spec"]["sites"][0]["adapter"]["experts_from"]
    assert [s["path"] for s in srcs] == [str(p) for p in folders] and [s["rank"] for s in srcs] == [4, 2, 4]
    moved = [tmp_path / "gone" / p.name for p in folders]
    cfg["spec"]["sites"][0]["adapter"]["experts_from"] = [dict(s, path=str(m)) for s, m in zip(srcs, moved)]
    (tmp_path / "saved" / "moleforge_config.json").write_text(json.dumps(cfg))
    other = tiny("llama")
    mf.load(other, tmp_path / "saved")
    assert_close(logits(other), expected, "float32_model")


def test_missing_folder_names_the_field(folders, tmp_path):
    with pytest.raises(mf.CheckpointError, match=r"experts_from\[1\]\.path = .*nowhere.*no such folder"):
        mf.compile(_spec([folders[0], tmp_path / "nowhere"]), tiny("llama"))


def test_folder_without_a_targeted_module_names_folder_and_module(folders, tmp_path):
    qv = make_peft_adapter("llama", tmp_path / "qv", seed=8, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(mf.CheckpointError, match=r"folder .*qv: no LoRA for module 'model\.layers\.0\.mlp\.down_proj'"):
        mf.compile(_spec([folders[0], qv]), tiny("llama"))


def test_folder_of_another_base_model_names_the_shapes(folders, tmp_path):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    get_peft_model(wide, LoraConfig(r=4, target_modules=MODULES, init_lora_weights=False)).save_pretrained(
        str(tmp_path / "wide"))
    with pytest.raises(mf.CheckpointError) as e:
        mf.compile(_spec([folders[0], tmp_path / "wide"]), tiny("llama"))
    msg = str(e.value)
    assert "folder " + str(tmp_path / "wide") in msg and "'model.layers.0.self_attn.q_proj'" in msg
    assert "lora_A (4, 48)" in msg and "(32, 32)" in msg and "another base model" in msg


def test_a_rank_the_spec_gives_is_checked(folders):
    spec = _spec(folders)
    spec["sites"][0]["adapter"]["experts_from"][1]["rank"] = 4
    with pytest.raises(mf.CheckpointError, match=r"folder .*code: module .*: rank 2 .*experts_from\[1\]\.rank = 4"):
        mf.compile(spec, tiny("llama"))


@pytest.mark.parametrize("change, message", [
    ({"experts": 2}, r"experts = 2 but experts_from names 3 folders"),
    ({"frozen_experts": False}, r"frozen_experts = False contradicts"),
    ({"up": "shared"}, r"each expert's own A and B"),
])
def test_pool_rules(folders, change, message):
    with pytest.raises(mf.SpecError, match=message):
        mf.AdapterSpec.model_validate(_spec(folders, **change))


def test_mixed_trainable_flags_make_a_pool_that_is_not_frozen(folders):
    """Experts that differ train one by one (``tests/test_mixed_experts.py``)."""
    spec = _spec(folders)
    spec["sites"][0]["adapter"]["experts_from"][0]["trainable"] = True
    pool = mf.AdapterSpec.model_validate(spec).sites[0].adapter
    assert not pool.frozen_experts and [s.trainable for s in pool.experts_from] == [True, False, False]


def test_block_scope_is_refused(folders):
    spec = _spec(folders, router={"kind": "topk", "k": 1})
    spec["sites"][0]["scope"] = "ffn_block"
    spec["sites"][0]["target"] = {"roles": ["gate", "up", "down"]}
    with pytest.raises(mf.SpecError, match=r"experts_from.*scope = 'linear'"):
        mf.AdapterSpec.model_validate(spec)


def test_explain_shows_the_sources(folders):
    text = mf.explain(_spec(folders), tiny("llama"), ir="none")
    for p, (r, a) in zip(folders, [(4, 8), (2, 3), (4, 8)]):
        assert f"{p} (rank {r}, alpha {a}, frozen)" in text


def test_cli_composes_folders_with_a_preset(folders, tmp_path):
    from click.testing import CliRunner

    from moleforge.cli import main

    tiny("llama").save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": batch(seed=s)[0].tolist()}) for s in range(8)) + "\n")
    experts = ["--experts", f"{folders[0]},{folders[1]}", "--experts", str(folders[2])]
    run = CliRunner().invoke(main, ["inspect", "lora_soups", "--model", str(tmp_path / "model"), *experts],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert f"expert 1: PEFT LoRA {folders[1]} (rank 2, alpha 3, frozen)" in run.output
    out = tmp_path / "run"
    run = CliRunner().invoke(main, ["train", "lora_soups", "--model", str(tmp_path / "model"), "--data", str(data),
                                    "--out", str(out), "--steps", "2", "--batch-size", "4", *experts],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(main, ["export", str(out), "--peft", str(tmp_path / "peft"), "--merged",
                                    str(tmp_path / "merged")], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    model = tiny("llama")
    mf.load(model, out / "adapter")
    exported = PeftModel.from_pretrained(tiny("llama"), str(tmp_path / "peft"))
    assert_close(logits(exported), logits(model), "float32_model")


def test_one_frozen_expert_under_a_token_router_is_refused(folders):
    with pytest.raises(mf.SpecError, match=r"experts = 1 and router.kind = 'topk'.*nothing would train"):
        mf.AdapterSpec.model_validate(_spec(folders[:1], router={"kind": "topk", "k": 1}))
    mf.AdapterSpec.model_validate(_spec(folders[:1]))  # a static router scales it: that trains
