"""FFN-block experts (``scope: "ffn_block"``) in training: a step with gradients, save and load,
the ``mixlora`` and ``llava_mole`` presets, activation checkpointing, and LoRA dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

import moleforge as mf
from conftest import assert_close
from ffn_block_helpers import POOL, block_spec, routed_blocks
from models import batch, tiny
from moleforge.ir import ExpertHidden, print_graph


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_step_save_and_load(arch, tmp_path):
    model, ids = tiny(arch), batch()
    spec = mf.presets.load("mixlora").with_init(mf.Init(up="normal", seed=2))
    handle = mf.compile(spec, model)
    labels = ids if arch != "bert" else ids.clone()
    out = model(input_ids=ids, labels=labels)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    named = dict(handle.named_parameters())
    assert any(k.endswith(".router_w") for k in named) and any(k.endswith(".B_down") for k in named)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert mf.count_parameters(spec, tiny(arch)) == sum(p.numel() for p in named.values())
    mf.save(handle, tmp_path / "adapter")
    fresh = tiny(arch)
    mf.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(fresh(ids).logits, model(ids).logits, "save_load")


def test_frozen_experts_of_blocks_stay_fixed(tmp_path):
    """Regression: ``frozen_experts`` on an FFN-block pool keeps the experts' A and B as buffers
    (they trained before); only the routers learn, and the frozen factors are saved and loaded."""
    model, ids = tiny("llama").train(), batch()
    pool = POOL.model_copy(update={"frozen_experts": True})
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=pool)]).with_init(mf.Init(up="normal", seed=2))
    handle = mf.compile(spec, model)
    named = dict(handle.named_parameters())
    assert named and all(k.endswith(".router_w") for k in named)
    assert mf.count_parameters(spec, tiny("llama")) == sum(p.numel() for p in named.values())
    frozen = {k: v.clone() for k, v in handle.state_dict().items() if k.split(".")[-1][:2] in ("A_", "B_")}
    assert len(frozen) == 6 * len(handle.modules)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    torch.optim.SGD(handle.trainable_parameters(), lr=1.0).step()
    state = handle.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    mf.save(handle, tmp_path / "adapter")
    fresh = mf.load(tiny("llama"), tmp_path / "adapter")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in frozen.items())


def test_presets_compile_with_their_routing():
    model = tiny("llama")
    handle = mf.compile("llava_mole", model)
    routes = [n for g in handle.graphs.values() for n in g.nodes if type(n).__name__ == "Route"]
    assert len(routed_blocks(model)) == 2 and {r.gate.k for r in routes} == {1}
    assert sum(1 for g in handle.graphs.values() if any(isinstance(n, ExpertHidden) for n in g.nodes)) == 2
    handle.remove()
    handle = mf.compile("mixlora", model)
    assert len(handle.modules) == 2 + 2 * 4
    assert {r.gate.k for g in handle.graphs.values() for r in g.nodes if type(r).__name__ == "Route"} == {2}


GOLDEN_LLAMA_BLOCK = """\
graph model.layers.0.mlp (d_in=32, d_out=32)
  param router_w (8, 32) init=kaiming trainable
  param A_gate (8, 8, 32) init=kaiming trainable
  param B_gate (8, 64, 8) init=up trainable
  param A_up (8, 8, 32) init=kaiming trainable
  param B_up (8, 64, 8) init=up trainable
  param A_down (8, 8, 64) init=kaiming trainable
  param B_down (8, 32, 8) init=up trainable
  frozen W_gate (64, 32)
  frozen W_up (64, 32)
  frozen W_down (32, 64)
  %x = input 32
  %logits = linear %x W=router_w b=- -> 8
  %route = route %logits softmax_topk(k=2, renorm=True, tau=1) E=8
  %experts_gate_base = linear %x W=W_gate b=- -> 64
  %experts_up_base = linear %x W=W_up b=- -> 64
  %experts_hidden = expert_hidden %x by %route act=silu \
gate=[%experts_gate_base + A=A_gate B=B_gate scale=2] up=[%experts_up_base + A=A_up B=B_up scale=2] -> 64
  %experts_sum = expert_sum %experts_hidden by %route -> 64
  %experts_down = linear %experts_sum W=W_down b=- -> 32
  %experts_down_lora = expert_lora %experts_hidden by %route A=A_down B=B_down scale=2 -> 32
  %experts = add %experts_down %experts_down_lora
  %aux0 = aux_loss switch_lb %route weight=0.01
  return %experts ; aux %aux0"""


def test_mixlora_block_ir_golden():
    handle = mf.compile("mixlora", tiny("llama"))
    assert print_graph(handle.graphs["model.layers.0.mlp"]) == GOLDEN_LLAMA_BLOCK


# ---- activation checkpointing ---------------------------------------------------------------------

def _checkpointing_spec() -> mf.AdapterSpec:
    """Layer 0: a top-k block with router jitter and LoRA dropout (noise the recomputation must draw
    again, the same) and a Switch loss; layer 1: a block whose sigmoid router counts its selections
    for the balancing bias."""
    experts = dict(experts=3, rank=2, alpha=4.0)
    return mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=["gate", "up", "down"], layers=[0]), scope="ffn_block",
                adapter=mf.ExpertPool(**experts, router=mf.TopKRouter(k=2, jitter=0.1), dropout=0.2,
                                      aux_losses=[mf.SwitchLoadBalance(weight=0.1)])),
        mf.Site(target=mf.Target(roles=["gate", "up", "down"], layers=[1]), scope="ffn_block",
                adapter=mf.ExpertPool(**experts, router=mf.SigmoidTopKRouter(k=2, bias_update_rate=0.01))),
    ]).with_init(mf.Init(up="normal", std=0.3, seed=1))


def _train_step(arch: str, ids: torch.Tensor, checkpointing: bool, early_stop: bool, noise_seed: int | None = None):
    """One forward and backward; the output, routing records, selection counts, adapter
    gradients and how often each block ran. ``noise_seed``: the jitter comes from the sites'
    seeded noise generators (``handle.seed_noise``) rather than torch's global generator."""
    model = tiny(arch).train()
    handle = mf.compile(_checkpointing_spec(), model)
    if noise_seed is not None:
        handle.seed_noise(noise_seed)
    if checkpointing:
        model.activation_checkpointing_enable()
    runs = dict.fromkeys(handle.modules, 0)
    hooks = [block.register_forward_pre_hook(lambda *_, n=name: runs.__setitem__(n, runs[n] + 1))
             for name, block in handle.modules.items()]
    with set_checkpoint_early_stop(early_stop), handle.record_routing() as log:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    for hook in hooks:
        hook.remove()
    counts = {n: b.site.balance_counts.clone() for n, b in handle.modules.items() if hasattr(b.site, "balance_counts")}
    grads = {k: p.grad.clone() for k, p in handle.named_parameters()}
    return out, len(log.entries), counts, grads, runs


@pytest.mark.parametrize("arch, early_stop, noise_seed", [("llama", True, None), ("llama", False, None),
                                                         ("bert", True, None), ("llama", True, 3),
                                                         ("llama", False, 3)])
def test_activation_checkpointing_of_blocks_counts_the_aux_once(arch, early_stop, noise_seed):
    """Non-reentrant checkpointing recomputes each block in backward (to the layer's last saved
    tensor with early stop, to its end without): same loss, aux loss and adapter gradients as
    without checkpointing, one routing record per block and forward, selections counted once.
    With seeded noise generators the recomputation draws the first run's jitter and dropout masks
    again (torch's own checkpointing restores its global generator for the unseeded runs)."""
    ids = batch(seed=5)
    plain, entries, counts, grads, runs = _train_step(arch, ids, False, early_stop, noise_seed)
    ckpt, entries_ck, counts_ck, grads_ck, runs_ck = _train_step(arch, ids, True, early_stop, noise_seed)
    assert set(runs.values()) == {1} and set(runs_ck.values()) == {2}, "checkpointing must recompute the blocks"
    assert_close(ckpt.loss, plain.loss, "float32_model")
    assert plain.aux_loss > 0
    assert_close(ckpt.aux_loss, plain.aux_loss, "float32_model")
    assert entries_ck == entries == 2, "one routing record per block and forward"
    assert len(counts) == 1
    for k in counts:
        assert torch.equal(counts_ck[k], counts[k]) and counts[k].sum() == ids.numel() * 2
    assert grads.keys() == grads_ck.keys() and any(k.endswith("router_w") for k in grads)
    for k in grads:
        assert_close(grads_ck[k], grads[k], "float32_model", msg=k)


def test_reentrant_checkpointing_of_blocks_that_drops_the_aux_gradient_is_reported():
    model = tiny("llama").train()
    mf.compile(block_spec(), model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        model(batch(), labels=batch())


# ---- LoRA dropout (MixLoRA's lora_dropout) ----------------------------------------------------------

def _mixlora_with_dropout(p: float) -> mf.AdapterSpec:
    spec = mf.presets.load("mixlora").with_init(mf.Init(up="normal", std=0.2, seed=4))
    return spec.model_copy(update={"sites": [s.model_copy(update={"adapter": s.adapter.model_copy(
        update={"dropout": p})}) for s in spec.sites]})


def _losses(spec: mf.AdapterSpec, noise_seed: int, steps: int = 3) -> tuple[list[float], mf.AdapterHandle]:
    torch.manual_seed(0)
    model = tiny("llama").train()
    handle = mf.compile(spec, model)
    handle.seed_noise(noise_seed)
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        ids = batch(seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, handle


def test_mixlora_with_dropout_trains_reproducibly_and_saves_its_dropout(tmp_path):
    """A MixLoRA spec with dropout 0.1 (experts and attention LoRAs) trains a few steps; the same
    noise seed gives the same losses bit for bit, another seed other ones; the saved adapter keeps
    ``dropout`` and, in evaluation, the logits."""
    spec = _mixlora_with_dropout(0.1)
    first, handle = _losses(spec, noise_seed=1)
    again, _ = _losses(spec, noise_seed=1)
    other, _ = _losses(spec, noise_seed=2)
    assert all(math.isfinite(v) for v in first) and first == again and first != other
    assert first[1:] != _losses(_mixlora_with_dropout(0.0), noise_seed=1)[0][1:], "dropout changes training"
    mf.save(handle, tmp_path / "adapter")
    fresh = tiny("llama")
    loaded = mf.load(fresh, tmp_path / "adapter")
    assert [s.adapter.dropout for s in loaded.spec.sites] == [0.1, 0.1]
    ids = batch(seed=9)
    with torch.no_grad():
        assert_close(fresh.eval()(ids).logits, handle.model.eval()(ids).logits, "save_load")
