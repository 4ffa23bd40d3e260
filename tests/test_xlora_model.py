"""X-LoRA in a model: PEFT's saved X-LoRA folders in (``mf.from_peft``) and out (``mf.export_peft``),
``export_merged`` refused, generation with a KV cache, save/load, the HF Trainer training the
classifier alone, and a first pass that skips the adapters when its scalings are 0."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny
from peft_helpers import make_peft_adapter
from test_xlora_peft import MODULES, _classifier, peft_xlora, xlora_spec
from tolerances import assert_close


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("xlora_model")
    return [make_peft_adapter("llama", d / f"e{i}", seed=21 + i, r=4, lora_alpha=8, target_modules=MODULES)
            for i in range(3)]


def _compiled(paths, **router):
    model = tiny("llama")
    handle = mf.compile(xlora_spec(paths, depth=2, size=16, **router), model)
    with torch.no_grad():
        for p in handle.classifier.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return model, handle


def _logits(model, ids=None):
    with torch.no_grad():
        return model.eval()(batch() if ids is None else ids).logits


def test_from_peft_reads_a_folder_peft_saved(paths, tmp_path):
    peft_model = peft_xlora("llama", paths, xlora_depth=2, xlora_size=16, layerwise_scalings=True, top_k_lora=2)
    _classifier(peft_model)
    peft_model.save_pretrained(str(tmp_path / "xl"))
    want = _logits(peft_model)
    model = tiny("llama")
    handle = mf.from_peft(model, tmp_path / "xl")
    router = handle.spec.sites[0].adapter.router
    assert (router.kind, router.depth, router.size, router.layerwise, router.top_k) == ("xlora", 2, 16, True, 2)
    assert_close(_logits(model), want, "float32_model")
    assert (want - _logits(tiny("llama"))).abs().max() > 1e-3


def test_export_peft_writes_a_folder_peft_loads(paths, tmp_path):
    model, handle = _compiled(paths, top_k=2, softmax_topk=True)
    want = _logits(model)
    out = mf.export_peft(handle, tmp_path / "out")
    base = tiny("llama")
    base.config.use_cache = False
    loaded = PeftModel.from_pretrained(base, str(out), adapters={str(i): str(out / str(i)) for i in range(3)})
    assert_close(_logits(loaded), want, "float32_model")


def test_export_merged_is_refused_naming_the_router(paths, tmp_path):
    _, handle = _compiled(paths)
    with pytest.raises(mf.NotMergeableError, match="xlora"):
        mf.export_merged(handle, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_generation_with_a_cache_equals_generation_without_and_peft(paths):
    model, handle = _compiled(paths)
    peft_model = peft_xlora("llama", paths, xlora_depth=2, xlora_size=16)
    peft_model.base_model.internal_xlora_classifier.load_state_dict(
        {k[len("xlora_classifier."):]: v for k, v in handle.state_dict().items() if k.startswith("xlora_classifier.")})
    ids = batch(B=2, S=5)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    plain = model.generate(ids, use_cache=False, **kw)
    want = peft_model.eval().generate(input_ids=ids, **kw)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, want)
    tiny_base = tiny("llama").generate(ids, **kw)
    assert not torch.equal(cached, tiny_base), "the experts must change what is generated"


def test_save_and_load_keep_the_classifier(paths, tmp_path):
    model, handle = _compiled(paths, layerwise=True)
    assert any(k.startswith("xlora_classifier.") for k in handle.state_dict())
    assert_reloads_to_the_same_logits(model, handle, batch(), "llama", tmp_path / "saved")


def test_explain_names_the_classifier(paths):
    text = mf.explain(xlora_spec(paths, depth=2, size=16, layerwise=True), tiny("llama"), ir="none")
    assert "X-LoRA classifier (trainable, beside the sites' parameters): depth 2, size 16" in text
    assert "one set per the 6 X-LoRA sites" in text
    model = tiny("llama")
    mf.compile(xlora_spec(paths, depth=2, size=16, layerwise=True), model)
    count = sum(p.numel() for p in model.xlora_classifier.parameters())
    assert f"depth 2, size 16, {count:,} parameters," in text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the classifier: experts frozen
    assert trainable == count
    assert f"{count:,} trainable parameters" in text


def test_remove_restores_the_model(paths):
    model, handle = _compiled(paths)
    ref = _logits(tiny("llama"))
    handle.remove()
    assert not hasattr(model, "xlora_classifier")
    assert torch.equal(_logits(model), ref)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_the_trainer_trains_the_classifier_alone(paths, tmp_path):
    model, handle = _compiled(paths)
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=_Rows(batch(seed=8, B=4))).train()
    after = handle.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("xlora_classifier.") for k in moved), moved
    assert {k for k in before if k.startswith("xlora_classifier.")} == moved


def test_first_pass_skips_the_adapters_at_scaling_0_and_mixes_them_otherwise(paths):
    model, handle = _compiled(paths)
    calls = []
    hooks = [m.site.register_forward_hook(lambda *a: calls.append(1)) for m in handle.modules.values()]
    _logits(model)
    assert len(calls) == len(handle.modules)  # the adapted pass only
    for h in hooks:
        h.remove()
    peft_model = peft_xlora("llama", paths, xlora_depth=2, xlora_size=16, scaling_pass_value=0.4)
    tensors = _classifier(peft_model)
    model = tiny("llama")
    handle = mf.compile(xlora_spec(paths, depth=2, size=16, scaling_pass_value=0.4), model)
    handle.load_state_dict(tensors)
    assert_close(_logits(model), _logits(peft_model), "float32_model")


def test_cli_trains_xlora_on_peft_folders_and_exports_what_can_be_exported(paths, tmp_path):
    import json

    from click.testing import CliRunner

    from moleforge.cli import main

    tiny("llama").save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": batch(seed=s)[0].tolist()}) for s in range(8)) + "\n")
    out = tmp_path / "run"
    run = CliRunner().invoke(main, ["train", "xlora", "--model", str(tmp_path / "model"), "--data", str(data),
                                    "--out", str(out), "--steps", "2", "--batch-size", "4", "--experts",
                                    ",".join(map(str, paths))], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    model = tiny("llama")
    handle = mf.load(model, out / "adapter")
    assert handle.spec.sites[0].adapter.router.kind == "xlora" and handle.classifier.experts == 3
    run = CliRunner().invoke(main, ["export", str(out), "--peft", str(tmp_path / "peft")], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "PEFT X-LoRA folder written" in run.output
    peft_dir = tmp_path / "peft"
    base = tiny("llama")
    base.config.use_cache = False
    loaded = PeftModel.from_pretrained(base, str(peft_dir), adapters={str(i): str(peft_dir / str(i)) for i in range(3)})
    assert_close(_logits(loaded), _logits(model), "float32_model")
    run = CliRunner().invoke(main, ["export", str(out), "--merged", str(tmp_path / "merged")])
    assert run.exit_code != 0
    assert "X-LoRA sites" in run.output and "--peft OUT" in run.output
    assert not (tmp_path / "merged" / "model.safetensors").exists()
