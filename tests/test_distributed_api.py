"""The single-process side of the data-parallel support: routing noise follows
``seed_noise`` (router jitter included) and the rank, a process outside ``torch.distributed``
computes exactly what it computes with no statistics group, DDP is told to leave the selection
counts alone, and ``save_pretrained`` given a state dict saves its tensors."""

from __future__ import annotations

import pytest
import torch

import moleforge as mf
from models import batch, tiny
from moleforge.interop.own_format import read_adapter

JITTER = mf.AdapterSpec(sites=[mf.Site(
    target=mf.Target(roles=["q", "v"]),
    adapter=mf.ExpertPool(experts=4, rank=2, router=mf.TopKRouter(k=2, jitter=0.3),
                          aux_losses=[mf.SwitchLoadBalance(weight=0.1)]))]).with_init(mf.Init(up="normal", seed=1))


def _logits(model, handle, seed, rank=None):
    handle.seed_noise(seed, rank=rank)
    with torch.no_grad():
        return model(batch()).logits


def test_router_jitter_follows_seed_noise_and_leaves_the_global_generator_alone():
    model = tiny("llama", layers=1).train()
    handle = mf.compile(JITTER, model)
    state = torch.get_rng_state()
    a, b, c = _logits(model, handle, 5), _logits(model, handle, 5), _logits(model, handle, 6)
    assert torch.equal(torch.get_rng_state(), state), "the sites' generators drew the jitter"
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    assert torch.equal(_logits(model, handle, 5), _logits(model, handle, 6)), "no jitter in evaluation"


def test_each_rank_seeds_its_own_stream():
    model = tiny("llama", layers=1).train()
    handle = mf.compile(JITTER, model)
    alone = _logits(model, handle, 5)
    assert torch.equal(_logits(model, handle, 5, rank=0), alone), "rank 0 draws what one process draws"
    ranks = [_logits(model, handle, 5, rank=r) for r in (1, 2)]
    assert not torch.equal(ranks[0], alone) and not torch.equal(ranks[1], ranks[0])
    assert torch.equal(_logits(model, handle, 5, rank=1), ranks[0])


def test_outside_torch_distributed_the_statistics_group_changes_nothing():
    outs = []
    for group in ("world", None):
        model = tiny("llama", layers=1).train()
        handle = mf.compile(mf.presets.load("smore").with_init(mf.Init(up="normal", seed=1)), model)
        assert handle.statistics_group == "world"
        handle.set_statistics_group(group)
        assert {m.site.stat_group for m in handle.modules.values()} == {group}
        out = model(batch(), labels=batch())
        out.loss.backward()
        outs.append((out.aux_loss, [p.grad for p in handle.trainable_parameters()]))
    (aux, grads), (aux_none, grads_none) = outs
    assert aux > 0 and torch.equal(aux, aux_none)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_none))


def test_ddp_leaves_the_selection_counts_alone_until_remove():
    model = tiny("llama", layers=1)
    model._ddp_params_and_buffers_to_ignore = ["lm_head.weight"]
    handle = mf.compile("smora", model)
    ignored = model._ddp_params_and_buffers_to_ignore
    buffers = dict(model.named_buffers())
    assert ignored[0] == "lm_head.weight" and len(ignored) == 1 + len(handle.modules)
    assert all(name.endswith("_counts") and name in buffers for name in ignored[1:])
    handle.remove()
    assert model._ddp_params_and_buffers_to_ignore == ["lm_head.weight"], "the user's list as it was"
    bare = tiny("llama", layers=1)
    mf.compile("smora", bare).remove()
    assert not hasattr(bare, "_ddp_params_and_buffers_to_ignore")
    plain = tiny("llama", layers=1)
    mf.compile("lora", plain)
    assert not hasattr(plain, "_ddp_params_and_buffers_to_ignore"), "nothing to ignore without counts"


def test_save_pretrained_takes_the_adapter_tensors_from_a_given_state_dict(tmp_path):
    """What the Trainer passes under FSDP: the gathered state dict of the whole model."""
    model = tiny("llama", layers=1)
    handle = mf.compile("molora", model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith(".site.B"))
    state[key] = torch.full_like(state[key], 0.5)
    model.save_pretrained(tmp_path / "given", state_dict=state)
    _, tensors = read_adapter(tmp_path / "given")
    module = key.removesuffix(".site.B")
    assert torch.equal(tensors[f"{module}.B"], state[key])
    assert tensors.keys() == handle.state_dict().keys()
    model.save_pretrained(tmp_path / "own")
    assert torch.equal(read_adapter(tmp_path / "own")[1][f"{module}.B"], handle.state_dict()[f"{module}.B"])


def test_a_partitioned_tensor_is_refused_not_saved(tmp_path):
    """What DeepSpeed ZeRO-3 hands over without gathering: empty parameters on every rank."""
    model = tiny("llama", layers=1)
    mf.compile("molora", model)
    state = dict(model.state_dict())
    key = next(k for k in state if k.endswith(".site.A"))
    state[key] = torch.empty(0)
    with pytest.raises(mf.CheckpointError, match=r"has shape \(0,\), the adapter declares .*partitioned"):
        model.save_pretrained(tmp_path / "adapter", state_dict=state)
    assert not (tmp_path / "adapter").exists()
