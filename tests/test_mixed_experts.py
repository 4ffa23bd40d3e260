"""A pool whose experts come from PEFT LoRA folders, some trainable and some frozen, on a tiny
Llama: the folders' logits; under AdamW with weight decay the frozen experts stay bit-identical
(they are buffers: no optimizer holds them) and the trainable ones change; save/load keeps every
expert; explain names each expert's folder, whether it trains and which tensors hold it; a static
pool exports merged and an X-LoRA pool to PEFT; LoRA-Mixer's ``preserve`` loss measures the trainable
experts' drift from their folders; bad combinations name the field."""

from __future__ import annotations

import json

import pytest
import torch

import moleforge as mf
from models import batch, tiny
from peft_helpers import logits, make_peft_adapter
from tolerances import assert_close

MODULES = ["q_proj", "v_proj", "down_proj"]
FLAGS = [True, False, False, True]
"""Experts 0 and 3 train, 1 and 2 stay frozen: runs [0, 1), [1, 3), [3, 4)."""
FROZEN, TRAINED = ("A_1_3", "B_1_3"), ("A_0_1", "B_0_1", "A_3_4", "B_3_4")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Four task LoRAs on the same modules, of ranks 4, 2, 4, 2 (alphas 8, 3, 8, 3)."""
    d = tmp_path_factory.mktemp("mixed")
    return [make_peft_adapter("llama", d / f"task{i}", seed=20 + i, r=r, lora_alpha=a, target_modules=MODULES)
            for i, (r, a) in enumerate([(4, 8), (2, 3), (4, 8), (2, 3)])]


def _spec(paths, router=None, flags=FLAGS, **pool) -> dict:
    return {"name": "mixed", "sites": [{
        "target": {"roles": ["q", "v", "down"]},
        "adapter": {"kind": "pool", "router": router or {"kind": "topk", "k": 2},
                    "experts_from": [{"path": str(p), "trainable": f} for p, f in zip(paths, flags)], **pool}}]}


def _runs(handle, names) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.state_dict().items() if k.rsplit(".", 1)[1] in names}


def _train(model, handle, steps: int = 3) -> None:
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        model(batch(seed=step), labels=batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_mixed_pool_gives_the_folders_logits(folders):
    """With every expert on at weight 1 (a fixed static router), the mixed pool is the sum of the
    folders' LoRAs, whichever run holds each expert: compared with a pool stored whole."""
    fixed = {"kind": "static", "trainable": False, "start": "sum"}
    whole = tiny("llama")
    mf.compile(_spec(folders, router=fixed, flags=[False] * 4), whole)
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router=fixed), model)
    assert (logits(model) - logits(tiny("llama"))).abs().max() > 1e-3, "the experts must change the logits"
    assert_close(logits(model), logits(whole), "float32_model")
    assert not handle.spec.sites[0].adapter.frozen_experts


def test_frozen_experts_never_change_and_trainable_ones_do(folders):
    model = tiny("llama")
    handle = mf.compile(_spec(folders), model)
    names = {n.rsplit(".", 1)[1] for n, _ in handle.named_parameters()}
    assert names == {*TRAINED, "router_w"}, "frozen runs must not be optimizer parameters"
    site = next(iter(handle.modules.values())).site
    assert all(not getattr(site, n).requires_grad for n in FROZEN)
    frozen, trained = _runs(handle, FROZEN), _runs(handle, TRAINED)
    _train(model, handle)
    after = handle.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "a frozen expert changed"
    assert all(not torch.equal(after[k], v) for k, v in trained.items()), "a trainable expert did not train"


def test_save_and_load_keep_every_expert(folders, tmp_path):
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "dense"}), model)
    _train(model, handle, steps=2)
    expected, state = logits(model), {k: v.detach().clone() for k, v in handle.state_dict().items()}
    mf.save(handle, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "moleforge_config.json").read_text())
    srcs = cfg["spec"]["sites"][0]["adapter"]["experts_from"]
    assert [s["trainable"] for s in srcs] == FLAGS
    other = tiny("llama")
    loaded = mf.load(other, tmp_path / "saved")
    assert_close(logits(other), expected, "save_load")
    got = loaded.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert {n.rsplit(".", 1)[1] for n, _ in loaded.named_parameters()} == {*TRAINED, "router_w"}


def test_explain_names_each_experts_source_and_whether_it_trains(folders):
    text = mf.explain(_spec(folders), tiny("llama"), ir="none")
    held = ["A_0_1/B_0_1", "A_1_3/B_1_3", "A_1_3/B_1_3", "A_3_4/B_3_4"]
    for j, (p, f, (r, a)) in enumerate(zip(folders, FLAGS, [(4, 8), (2, 3), (4, 8), (2, 3)])):
        state = "trainable" if f else "frozen"
        assert f"expert {j}: PEFT LoRA {p} (rank {r}, alpha {a}, {state}, in {held[j]})" in text
    assert "buffers A_1_3=" in text


def test_a_static_mixed_pool_exports_merged(folders, tmp_path):
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "static"}), model)
    _train(model, handle, steps=2)
    mf.export_merged(handle, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_close(logits(merged), logits(model), "float32_model")


def test_a_mixed_xlora_pool_exports_to_peft(folders, tmp_path):
    from peft import PeftModel
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "xlora", "depth": 2, "size": 16}), model)
    with torch.no_grad():
        for p in handle.classifier.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    _train(model, handle, steps=1)  # the trainable experts move away from their folders
    want = logits(model)
    out = mf.export_peft(handle, tmp_path / "out")
    base = tiny("llama")
    base.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    loaded = PeftModel.from_pretrained(base, str(out), adapters={str(i): str(out / str(i)) for i in range(4)})
    assert_close(logits(loaded), want, "float32_model")


def test_preserve_anchors_the_trainable_experts_at_their_folders(folders, tmp_path):
    model = tiny("llama")
    handle = mf.compile(_spec(folders, router={"kind": "dense"}, aux_losses=[{"kind": "preserve", "weight": 0.5}]),
                        model)
    state = handle.state_dict()
    starts = {k: v for k, v in state.items() if k.endswith("_start")}
    assert {k.rsplit(".", 1)[1] for k in starts} == {f"{n}_start" for n in TRAINED}
    assert all(torch.equal(v, state[k[:-len("_start")]]) for k, v in starts.items())
    model.train()(batch(), labels=batch())
    assert handle.aux_loss().item() == 0.0, "no drift yet"
    _train(model, handle, steps=2)
    model.train()(batch(), labels=batch())
    state = handle.state_dict()
    want = sum(0.5 * (state[k[:-len("_start")]].double() - v.double()).square().sum() for k, v in starts.items())
    assert want > 0
    assert_close(handle.aux_loss().double(), want, "float32_model")
    mf.save(handle, tmp_path / "saved")
    other = tiny("llama")
    loaded = mf.load(other, tmp_path / "saved")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in starts.items())
    assert_close(logits(other), logits(model), "save_load")  # evaluation without autograd: no aux computed


@pytest.mark.parametrize("change, message", [
    ({"frozen_experts": True}, r"frozen_experts = True contradicts experts_from\[\*\]\.trainable = "
                               r"\[True, False, False, True\]"),
    ({"magnitude": True}, r"magnitude: a pool whose experts_from\[\*\]\.trainable flags differ"),
    ({"ranks": [2, 2, 4, 4]}, r"ranks: the experts of experts_from take their ranks from their folders"),
])
def test_bad_combinations_name_the_field(folders, change, message):
    with pytest.raises(mf.SpecError, match=message):
        mf.AdapterSpec.model_validate(_spec(folders, **change))
