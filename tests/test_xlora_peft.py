"""X-LoRA against PEFT's ``XLoraModel``: the same frozen LoRA folders (made by PEFT) and the same
classifier weights give the same logits and classifier gradients on tiny Llama and Qwen2, over
the classifier depths, layerwise scalings, top-k and softmax-over-top-k settings PEFT offers."""

from __future__ import annotations

import pytest
import torch
from peft import XLoraConfig, get_peft_model

import moleforge as mf
from models import batch, tiny
from peft_helpers import make_peft_adapter
from tolerances import assert_close

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three LoRAs per architecture, A and B both drawn (non-zero), ranks 4, 2, 4."""
    d = tmp_path_factory.mktemp("xlora")
    out = {}
    for arch in ("llama", "qwen2"):
        out[arch] = [make_peft_adapter(arch, d / arch / f"e{i}", seed=11 + i, r=r, lora_alpha=a,
                                       target_modules=MODULES) for i, (r, a) in enumerate([(4, 8), (2, 3), (4, 8)])]
    return out


def peft_xlora(arch: str, paths, **cfg):
    model = tiny(arch)
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    adapters = {str(i): str(p) for i, p in enumerate(paths)}  # PEFT's loader names them "0", "1", ...
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, **cfg)
    return get_peft_model(model, config)


def xlora_spec(paths, **router) -> dict:
    return {"name": "xlora", "sites": [{"target": {"roles": ["q", "v", "down"]},
                                        "adapter": {"kind": "pool", "experts_from": [{"path": str(p)} for p in paths],
                                                    "router": {"kind": "xlora", **router}}}]}


def _classifier(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's classifier tensors under the adapter's keys, drawn non-trivially (bias included)."""
    clf = peft_model.base_model.internal_xlora_classifier
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return {f"xlora_classifier.{k}": v.clone() for k, v in clf.state_dict().items()}


def _grads(model, named) -> dict[str, torch.Tensor]:
    out = model(batch(), labels=batch())
    out.loss.backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in named}


CASES = [
    dict(xlora_depth=1),
    dict(xlora_depth=1, layerwise_scalings=True),
    dict(xlora_depth=2, xlora_size=16, top_k_lora=2),
    dict(xlora_depth=3, xlora_size=8, layerwise_scalings=True, top_k_lora=2, enable_softmax_topk=True),
    dict(xlora_depth=2, xlora_size=16, softmax_temperature=0.5, global_scaling_weight=1.7, top_k_lora=2),
]
ROUTER = {"xlora_depth": "depth", "xlora_size": "size", "layerwise_scalings": "layerwise", "top_k_lora": "top_k",
          "enable_softmax_topk": "softmax_topk", "softmax_temperature": "temperature",
          "global_scaling_weight": "global_scaling_weight"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_logits_and_classifier_gradients_as_peft(folders, arch, case):
    paths = folders[arch]
    peft_model = peft_xlora(arch, paths, **case).eval()  # eval: the classifier's dropout is off in both
    tensors = _classifier(peft_model)
    want_logits, want = _grads(peft_model, [(f"xlora_classifier.{k}", p) for k, p in
                                            peft_model.base_model.internal_xlora_classifier.named_parameters()])
    model = tiny(arch).eval()
    base = model(batch()).logits.detach()
    handle = mf.compile(xlora_spec(paths, **{ROUTER[k]: v for k, v in case.items()}), model)
    handle.load_state_dict(tensors)
    got_logits, got = _grads(model, handle.named_parameters())
    assert (want_logits - base).abs().max() > 1e-3, "the experts must change the logits"
    assert_close(got_logits, want_logits, "float32_model")
    assert set(got) == set(want)
    for k in want:
        assert want[k].abs().max() > 0, f"{k}: PEFT's gradient is zero, the comparison would be vacuous"
        assert_close(got[k], want[k], "float32_model", msg=k)
    assert_close(handle.latest_scalings(), peft_model.base_model.get_latest_scalings(), "float32_model")
