"""Every preset on tiny Llama, Qwen2, Mistral, GPT-2 and BERT models built from configs:
compile, train 30 steps (loss falls), only adapter parameters change, aux losses reach the
loss, save -> load gives the same logits, remove() restores the base logits exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import moleforge as mf
from models import ARCHS, batch, tiny
from moleforge.integrations.task_ids import reads_task_ids
from tolerances import assert_close


def _ce(arch: str, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if arch == "bert":
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _standalone(spec: mf.AdapterSpec) -> mf.AdapterSpec:
    """Presets of frozen imported experts (lora_soups ...) stand for trained LoRAs: without folders,
    their experts get random up-projections (a zero expert leaves the router nothing to learn)."""
    sites = [s.model_copy(update={"init": s.init.model_copy(update={"up": "normal", "std": 0.2})})
             if getattr(s.adapter, "frozen_experts", False) else s for s in spec.sites]
    return spec.model_copy(update={"sites": sites})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", mf.presets.names())
def test_preset_trains_saves_loads_and_removes(preset, arch, tmp_path):
    model = tiny(arch)
    ids = batch()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.clone()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roles a family lacks (BERT has no gate_proj) are reported as warnings
        handle = mf.compile(_standalone(mf.presets.load(preset)), model)
    params = list(handle.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if ".site." not in n and not n.startswith("xlora_classifier."))  # X-LoRA's classifier trains

    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    tasks = {"task_ids": torch.arange(ids.shape[0]) % 2} if reads_task_ids(handle.graphs) else {}  # MeteoRA
    for _ in range(30):
        out = model(input_ids=ids, labels=ids, **tasks)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        handle.update_balancing()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3, f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"

    model.eval()
    with torch.no_grad():  # evaluation without autograd: no aux loss unless asked for
        plain = model(input_ids=ids, labels=ids)
    assert handle.aux_loss() is None
    assert_close(plain.loss, _ce(arch, plain.logits, ids), "float32_model")
    handle.eval_aux()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, **tasks)
    aux = handle.aux_loss()
    has_aux = any(getattr(s.adapter, "aux_losses", []) for s in handle.spec.sites)
    if has_aux:
        assert aux is not None and float(aux) != 0  # RSL may be negative (its entropy term)
        assert_close(out.loss, _ce(arch, out.logits, ids) + aux, "float32_model")
        assert torch.equal(out.aux_loss, aux)
    else:
        assert aux is None
        assert_close(out.loss, _ce(arch, out.logits, ids), "float32_model")

    adapted = out.logits.clone()
    assert not torch.allclose(adapted, base_logits), "training left the adapter a no-op"

    mf.save(handle, tmp_path / "adapter")
    other = tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf.load(other, tmp_path / "adapter")
    with torch.no_grad():
        again = other(input_ids=ids, **tasks).logits  # EPT's task embeddings route: the same task ids
    assert_close(again, adapted, "save_load")

    handle.remove()
    with torch.no_grad():
        back = model(input_ids=ids).logits
    assert torch.equal(back, base_logits)
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == base_state.keys()
    for k, v in model.state_dict().items():  # training changed adapter tensors only
        assert torch.equal(v, base_state[k]), f"base tensor {k} changed"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sites_add_into_the_frozen_output_in_place(arch, monkeypatch):
    # nn.Linear and GPT-2 Conv1D sites add Δy into the frozen layer's own output tensor; the
    # loss and every gradient equal the out-of-place sum's bit for bit.
    from moleforge.integrations import inject

    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q", "v", "up", "down"]), adapter=mf.LoRA(rank=4),
                                         init=mf.Init(up="normal", std=0.1, seed=0))])
    accumulable = inject._accumulable
    runs = []
    for in_place in (True, False):
        decisions: list[bool] = []

        def decide(out, dtype, in_place=in_place, decisions=decisions):
            decisions.append(accumulable(out, dtype) if in_place else False)
            return decisions[-1]

        monkeypatch.setattr(inject, "_accumulable", decide)
        model = tiny(arch)
        handle = mf.compile(spec, model)
        model.train()
        loss = model(input_ids=batch(), labels=batch()).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in handle.trainable_parameters()], decisions))
    (loss_in, grads_in, dec_in), (loss_out, grads_out, _) = runs
    assert dec_in and all(dec_in)
    assert torch.equal(loss_in, loss_out)
    assert all(torch.equal(a, b) for a, b in zip(grads_in, grads_out))
    assert any(g.abs().max() > 0 for g in grads_in)
