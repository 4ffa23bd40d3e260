"""Generation with routed adapters: greedy decoding on the decode path gives the tokens and logits
of the training path (autograd on, no packed weights, no decode forms), batched padded
generation gives the tokens of one prompt at a time, and updated weights are followed."""

from __future__ import annotations

import pytest
import torch

import moleforge as mf
from models import VOCAB, tiny
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.ir import GroupedMix
from moleforge.passes import group_pools
from tolerances import assert_close

INIT = mf.Init(up="normal", std=0.3, seed=1)
PRESETS = ["lora", "molora", "smore", "mixlora", "flylora"]
NEW = 6


def _model(preset: str, policy: KernelPolicy | None = None):
    model = tiny("llama", layers=2)
    handle = mf.compile(mf.presets.load(preset).with_init(INIT), model, policy=policy)
    model.generation_config.eos_token_id = None  # every step takes the argmax of the logits
    return model.eval(), handle


def _greedy(model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _step_logits_with_autograd(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of every position of ``ids`` through the training path (autograd on)."""
    with torch.enable_grad():
        return model(ids).logits.detach()


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_decoding_equals_the_training_path(preset):
    model, _ = _model(preset)
    prompt = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    tokens, logits = _greedy(model, prompt)
    full = torch.cat([prompt, tokens], 1)
    reference = _step_logits_with_autograd(model, full)[:, prompt.shape[1] - 1:-1]
    assert_close(logits, reference, "float32_model")
    assert torch.equal(reference.argmax(-1), tokens)
    assert logits.std() > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_padded_generation_equals_one_prompt_at_a_time(preset):
    model, _ = _model(preset)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as generation needs
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched, batched_logits = _greedy(model, ids, mask)
    for row, p in enumerate(prompts):
        alone, alone_logits = _greedy(model, p.unsqueeze(0))
        assert torch.equal(batched[row], alone[0]), f"prompt {row}"
        assert_close(batched_logits[row], alone_logits[0], "float32_model", msg=f"prompt {row}")


@pytest.mark.parametrize("preset", ["molora", "smore"])
def test_decoding_follows_an_optimizer_step(preset):
    model, handle = _model(preset)
    prompt = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    before = _greedy(model, prompt)[1]
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    model.train()
    model(prompt, labels=prompt).loss.backward()
    opt.step()
    model.eval()
    tokens, after = _greedy(model, prompt)
    reference = _step_logits_with_autograd(model, torch.cat([prompt, tokens], 1))[:, prompt.shape[1] - 1:-1]
    assert_close(after, reference, "float32_model")
    assert (after - before).abs().max() > 1e-4, "the step changed nothing: the test proves nothing"


def test_grouped_pools_decode_densely_and_give_the_planned_forms_logits():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q", "v", "up"]), adapter=mf.ExpertPool(
        experts=6, rank=4, alpha=8, router=mf.TopKRouter(k=2)))]).with_init(INIT)
    logits = {}
    for tokens in (0, 16):
        model = tiny("llama", layers=2)
        handle = mf.compile(spec, model, passes=(group_pools,),
                            policy=KernelPolicy(triton="off", cpu="off", decode_tokens=tokens))
        prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
        model.generation_config.eos_token_id = None
        logits[tokens] = _greedy(model.eval(), prompt)
        grouped = [(handle.modules[s.name].site.pack_cache, n.id) for s in handle.plan.sites
                   for n in s.final.nodes if isinstance(n, GroupedMix)]
        assert grouped
        assert all((node in cache._entries) == (tokens > 0) for cache, node in grouped)
    assert torch.equal(logits[0][0], logits[16][0])
    assert_close(logits[16][1], logits[0][1], "float32_model")


def test_explain_shows_which_form_runs_at_which_sizes():
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), adapter=mf.ExpertPool(
        experts=6, rank=4, alpha=8, router=mf.TopKRouter(k=2)))])
    text = " ".join(mf.explain(mf.plan(spec, tiny("llama", layers=1), passes=(group_pools,))).split())  # unwrapped
    assert "grouped GEMMs over each token's top-2 experts" in text
    assert "at <= 16 tokens (decode path): all 24 ranks in one dense GEMM, gated after" in text
    assert "kernels: decode path: sparse pools at <= 16 tokens per site as one dense GEMM" in text
    off = mf.plan(spec, tiny("llama", layers=1), passes=(group_pools,), policy=KernelPolicy(decode_tokens=0))
    assert "decode path): all" not in mf.explain(off)
