"""Padded batches: given the call's ``attention_mask`` (1 = real token, 0 = padding), the aux
losses of linear, tree and FFN-block sites, the balancing routers' selection counts and the
recorded routing count the real tokens only, and equal a run on the real tokens alone; an
all-ones mask is no mask, bit for bit. The adapter's outputs do not depend on the mask."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import Trainer, TrainingArguments

import moleforge as mf
from models import batch, tiny
from moleforge.integrations.inject import AuxCollector
from tolerances import assert_close

INIT = mf.Init(up="normal", std=0.3, seed=1)

LINEAR = mf.AdapterSpec(sites=[
    mf.Site(target=mf.Target(roles=["q"]), adapter=mf.ExpertPool(
        experts=4, rank=2, router=mf.TopKRouter(k=2), aux_losses=[mf.SwitchLoadBalance(weight=1.0)])),
    mf.Site(target=mf.Target(roles=["k"]), adapter=mf.RankPartition(
        rank=4, router=mf.SigmoidTopKRouter(k=2, bias_update_rate=0.01))),
    mf.Site(target=mf.Target(roles=["v"]), adapter=mf.ExpertPool(
        experts=3, rank=2, router=mf.DenseRouter(), aux_losses=[mf.CV2ImportanceLoad(weight=1.0)])),
    mf.Site(target=mf.Target(roles=["o"]), adapter=mf.ExpertPool(
        experts=4, rank=2, router=mf.DenseRouter(), aux_losses=[mf.LocalizedBalance(weight=1.0, delta=0.2)])),
])
"""One linear site per flat aux kind, and a balancing router (``k``)."""

SPECS = {"linear": LINEAR, "smore": mf.presets.load("smore"), "smore_noisy": mf.presets.load("smore_noisy"),
         "mixlora": mf.presets.load("mixlora")}
SIDES = {"left": ("left", "left"), "right": ("right", "right"), "both": ("left", "right")}
TYPES = torch.tensor([0, 1])
"""Sample types of the two rows (localized balancing)."""


def _compiled(name: str, arch: str = "llama"):
    """The model and its handle, with aux losses computed in evaluation mode without autograd too."""
    model = tiny(arch)
    handle = mf.compile(SPECS[name].with_init(INIT), model)
    handle.eval_aux()
    return model, handle


def _pad(real: torch.Tensor, pad: int, sides: tuple[str, ...]):
    """``real (B, n)`` with ``pad`` padding positions in each row, on ``sides[b]`` for row b:
    ``(input_ids, attention_mask, position_ids)``, each ``(B, n + pad)``. The real tokens keep the
    positions ``0..n-1``, so their hidden states are those of ``real`` alone."""
    B, n = real.shape
    ids = torch.zeros(B, n + pad, dtype=torch.long)
    mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, side in enumerate(sides):
        cols = slice(pad, None) if side == "left" else slice(0, n)
        ids[b, cols], mask[b, cols], pos[b, cols] = real[b], 1, torch.arange(n)
    return ids, mask, pos


def _counts(handle) -> dict[str, torch.Tensor]:
    return {n: m.site.balance_counts.clone() for n, m in handle.modules.items() if hasattr(m.site, "balance_counts")}


@pytest.mark.parametrize("sides", sorted(SIDES))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_padded_aux_equals_the_aux_of_the_real_tokens(name, sides):
    model, handle = _compiled(name)  # eval mode: the noisy gate draws no noise
    real = batch(seed=3, B=2, S=6)
    ids, mask, pos = _pad(real, 3, SIDES[sides])
    with torch.no_grad(), handle.sample_types(TYPES):
        alone = model(real)
        padded = model(ids, attention_mask=mask, position_ids=pos)
        positional = model(ids, mask, pos).aux_loss
        unmasked = model(ids, position_ids=pos).aux_loss
    assert_close(padded.aux_loss, alone.aux_loss, "float32_model")
    assert torch.equal(positional, padded.aux_loss), "attention_mask passed by position"
    assert (unmasked - alone.aux_loss).abs() > 1e-6, "the padding must count when no mask says it is padding"
    assert_close(padded.logits[mask.bool()], alone.logits.flatten(0, 1), "float32_model")


@pytest.mark.filterwarnings("ignore:.*GPT2LMHeadModel has no linear for role")  # GPT-2 has no gate
@pytest.mark.parametrize(("arch", "name"), [("gpt2", "smore"), ("gpt2", "mixlora"), ("bert", "linear"),
                                            ("bert", "mixlora")])
def test_padded_aux_on_other_architectures(arch, name):
    """GPT-2's ``Conv1D`` sites and BERT's split FFN block, right padding (no position ids needed)."""
    model, handle = _compiled(name, arch)
    real = batch(seed=3, B=2, S=6)
    ids, mask, _ = _pad(real, 3, SIDES["right"])
    with torch.no_grad(), handle.sample_types(TYPES):
        alone = model(real).aux_loss
        padded = model(ids, attention_mask=mask).aux_loss
    assert_close(padded, alone, "float32_model")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_all_ones_mask_is_no_mask_exactly(name):
    model, handle = _compiled(name)
    model.train()
    ids = batch(seed=4, B=2, S=7)
    runs = []
    for mask in (None, torch.ones_like(ids)):
        handle.seed_noise(5)
        with handle.sample_types(TYPES):
            out = model(ids, attention_mask=mask)
        runs.append((out, _counts(handle)))
    (plain, counts), (ones, counts_ones) = runs
    assert torch.equal(ones.aux_loss, plain.aux_loss) and torch.equal(ones.logits, plain.logits)
    assert counts.keys() == counts_ones.keys()
    for k in counts:
        assert torch.equal(counts_ones[k], 2 * counts[k]), "the second forward counts what the first did"


def test_balancing_counts_count_the_real_tokens():
    real = batch(seed=5, B=2, S=6)
    ids, mask, pos = _pad(real, 4, SIDES["both"])
    counts = []
    for padded in (False, True):
        model, handle = _compiled("linear")
        model.train()
        with handle.sample_types(TYPES):
            model(ids, attention_mask=mask, position_ids=pos) if padded else model(real)
        counts.append(_counts(handle))
    alone, masked = counts
    assert len(alone) == 2  # the k projections of both layers
    for k in alone:
        assert torch.equal(masked[k], alone[k]) and masked[k].sum() == real.numel() * 2, k


@pytest.mark.parametrize("name", ["linear", "smore", "mixlora"])
def test_recorded_routing_holds_the_real_tokens(name):
    model, handle = _compiled(name)
    real = batch(seed=6, B=2, S=5)
    ids, mask, pos = _pad(real, 3, SIDES["both"])
    with torch.no_grad(), handle.sample_types(TYPES):
        with handle.record_routing() as alone:
            model(real)
        with handle.record_routing() as padded:
            model(ids, attention_mask=mask, position_ids=pos)
    for _, routes in padded.entries:
        for value in routes.values():
            first = value[0][0] if isinstance(value[0], tuple) else value[0]  # a tree's top pool, or the gates
            assert first.shape[0] == real.numel()
    load, load_alone = padded.expert_load(), alone.expert_load()
    assert load.keys() == load_alone.keys() and load
    for module in load:
        for got, want in zip(load[module], load_alone[module]):
            assert_close(got, want, "float32_model", msg=module)
    for module, ent in padded.entropy().items():
        assert_close(torch.tensor(ent), torch.tensor(alone.entropy()[module]), "float32_model", msg=module)


def _step(name: str, checkpointing: bool, ids, mask, pos):
    model, handle = _compiled(name)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    with handle.sample_types(TYPES):
        out = model(ids, attention_mask=mask, position_ids=pos, labels=ids)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in handle.named_parameters()}, _counts(handle)


@pytest.mark.parametrize("name", ["linear", "smore", "mixlora"])
def test_activation_checkpointing_recomputes_with_the_same_mask(name):
    ids, mask, pos = _pad(batch(seed=7, B=2, S=6), 3, SIDES["both"])
    (plain, grads, counts), (ckpt, grads_ck, counts_ck) = (_step(name, c, ids, mask, pos) for c in (False, True))
    assert_close(ckpt.aux_loss, plain.aux_loss, "float32_model")
    assert_close(ckpt.loss, plain.loss, "float32_model")
    for k in grads:
        assert_close(grads_ck[k], grads[k], "float32_model", msg=k)
    for k in counts:
        assert torch.equal(counts_ck[k], counts[k]) and counts[k].sum() == mask.sum() * 2


def test_a_site_seeing_other_tokens_ignores_the_mask():
    collector = AuxCollector()
    collector.padding_mask = torch.tensor([[False, True, True], [True, True, False]])
    assert collector.token_mask(torch.zeros(2, 3, 4)).tolist() == [False, True, True, True, True, False]
    assert collector.token_mask(torch.zeros(6, 4)) is not None
    for shape in ((2, 1, 4), (3, 2, 4), (5, 4)):  # a decoding step, another layout, other tokens
        assert collector.token_mask(torch.zeros(shape)) is None
    model, _ = _compiled("linear")
    ids, mask, _ = _pad(batch(seed=8, B=2, S=4), 2, SIDES["left"])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 8)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def _pad_right(rows: list[dict], length: int = 10) -> dict:
    """A padding collator: right padding to ``length``, labels ``-100`` on the padding."""
    real = torch.stack([r["input_ids"] for r in rows])
    ids, mask, _ = _pad(real, length - real.shape[1], ("right",) * len(rows))
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_trainer_with_a_padding_collator_balances_the_real_tokens(tmp_path):
    real = batch(seed=9, B=2, S=7)
    model, handle = _compiled("linear")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                             learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(real), data_collator=_pad_right,
                      callbacks=[mf.MoleforgeTrainerCallback(handle)])
    trainer.train()
    logged = next(h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h)
    fresh, _ = _compiled("linear")
    with torch.no_grad():
        alone = fresh.train()(real).aux_loss
    assert_close(torch.tensor(logged), alone, "float32_model")


@pytest.mark.parametrize("types", [None, TYPES])
def test_localized_balance_does_not_depend_on_where_a_padding_row_sits(types):
    """A batch of one real row and one all-padding row: the same aux loss with the padding row
    first or last (the samples are the rows with a real token), and that of the real row alone."""
    model = tiny("llama")
    handle = mf.compile(mf.presets.load("loramoe").with_init(INIT), model)
    handle.eval_aux()
    real = batch(seed=6, B=1, S=6)
    runs = []
    for first in (True, False):
        ids = torch.cat([torch.zeros_like(real), real] if first else [real, torch.zeros_like(real)])
        mask = torch.cat([torch.zeros_like(real), torch.ones_like(real)] if first else
                         [torch.ones_like(real), torch.zeros_like(real)])
        row_types = None if types is None else (types.flip(0) if first else types)
        with torch.no_grad(), handle.sample_types(row_types) if types is not None else nullcontext():
            runs.append(model(ids, attention_mask=mask).aux_loss)
    with torch.no_grad(), handle.sample_types(types[:1]) if types is not None else nullcontext():
        alone = model(real).aux_loss
    assert_close(runs[0], runs[1], "float32_model")
    assert_close(runs[1], alone, "float32_model")
