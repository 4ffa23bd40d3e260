"""CoMoL (METHODS.md §9): core-space experts between one shared A and B, routed on the token in
the core space, merged per token. The preset on every decoder family: parameters and Γ by the
paper's count, training, save/load; exporters refuse the routed adapter; bad specs."""

from __future__ import annotations

import pytest
import torch

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny
from moleforge.errors import NotMergeableError, SpecError

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_parameters_and_gamma_follow_the_paper(arch):
    """``r·(d_in + d_out) + E·r² + E·r`` per adapted linear (METHODS.md §9, §20.14: shared A and
    B, E cores, a core-space router), E = 8, r = 8; the dense soft merge routes one structure, Γ = 1."""
    model = tiny(arch)
    E, r = 8, 8
    sites = mf.plan("comol", model, passes=()).sites
    want = sum(r * (s.plain.d_in + s.plain.d_out) + E * r * r + E * r for s in sites)
    assert mf.count_parameters("comol", model) == want
    assert mf.structural_flexibility("comol") == 1


def test_gamma_of_a_top_k_core_pool():
    spec = {"name": "c", "sites": [{"target": {"roles": ["q"]}, "adapter": {
        "kind": "core_pool", "experts": 6, "router": {"kind": "topk", "k": 2}}}]}
    assert mf.structural_flexibility(spec) == 15


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_trains_and_reloads(arch, tmp_path):
    model = tiny(arch)
    handle = mf.compile(mf.presets.load("comol").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids = batch()
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    cores = next(p for n, p in model.named_parameters() if n.endswith("cores"))
    before = cores.detach().clone()
    model.train()
    for _ in range(3):
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(cores, before), "the cores train"
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a")


def test_routed_cores_do_not_merge(tmp_path):
    model = tiny("llama")
    handle = mf.compile("comol", model)
    with pytest.raises(NotMergeableError, match="route"):
        mf.export_merged(handle, tmp_path / "merged")


def test_preset_is_listed_with_its_paper():
    assert "arXiv 2603.00573" in mf.presets.describe()["comol"]


@pytest.mark.parametrize("adapter, words", [
    ({"kind": "core_pool", "router": {"kind": "sigmoid_topk", "k": 2}}, "core-space experts take a softmax router"),
    ({"kind": "core_pool", "experts": 2, "router": {"kind": "topk", "k": 3}}, "router.k = 3 exceeds experts = 2"),
    ({"kind": "core_pool", "aux_losses": [{"kind": "switch_lb"}]}, "'switch_lb' needs router.kind = 'topk'"),
    ({"kind": "core_pool", "rank": 0}, "rank"),
])
def test_bad_specs_name_the_field(adapter, words):
    with pytest.raises(SpecError, match=words):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{"target": {"roles": ["up"]}, "adapter": adapter}]})
