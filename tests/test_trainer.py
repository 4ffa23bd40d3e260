"""The HF Trainer on a compiled model, unchanged: aux loss in ``outputs.loss`` scaled right under
gradient accumulation, counted once under activation checkpointing, ``save_model`` writing the
moleforge adapter, and the callback's logs and once-per-step balancing updates."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import moleforge as mf
from models import VOCAB, batch, tiny
from peft_helpers import logits
from tolerances import assert_close


def _spec(coef: float = 1.0) -> mf.AdapterSpec:
    """A dense pool with an aux loss (q) and an SMoRA rank partition with balancing bias (v)."""
    return mf.AdapterSpec(aux_loss_coef=coef, sites=[
        mf.Site(target=mf.Target(roles=["q"]),
                adapter=mf.ExpertPool(experts=3, rank=2, router=mf.DenseRouter(),
                                      aux_losses=[mf.CV2ImportanceLoad(weight=2.0)])),
        mf.Site(target=mf.Target(roles=["v"]),
                adapter=mf.RankPartition(rank=4, router=mf.SigmoidTopKRouter(k=2, bias_update_rate=0.01))),
    ]).with_init(mf.Init(up="normal", std=0.3, seed=1))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        self.ids, self.labels = ids, ids if labels is None else labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _Grads(TrainerCallback):
    """The adapter's gradients just before each optimizer step (after accumulation)."""

    def __init__(self, handle):
        self.handle, self.steps = handle, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({k: p.grad.clone() for k, p in self.handle.named_parameters()})


def _train(tmp_path, rows: _Rows, *, batch_size: int, accumulation: int, coef: float = 1.0, steps: int = 1,
           callbacks=(), **extra):
    model = tiny("llama")
    handle = mf.compile(_spec(coef), model)
    grads = _Grads(handle)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-2,
                             optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none",
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      callbacks=[grads, *(cb(handle) for cb in callbacks)])
    trainer.train()
    return trainer, handle, grads.steps


def test_gradient_accumulation_keeps_the_aux_inclusive_gradient(tmp_path):
    # Four copies of one sequence: every micro-batch has the batch's routing statistics, so the
    # aux loss of 4 x 1 accumulated must give exactly the gradient of one batch of 4.
    rows = _Rows(batch(seed=3, B=1, S=12).repeat(4, 1))
    _, _, one = _train(tmp_path / "a", rows, batch_size=4, accumulation=1)
    _, _, four = _train(tmp_path / "b", rows, batch_size=1, accumulation=4)
    _, _, no_aux = _train(tmp_path / "c", rows, batch_size=4, accumulation=1, coef=0.0)
    for k in one[0]:
        assert_close(four[0][k], one[0][k], "float32_model", msg=k)
    router = next(k for k in one[0] if k.endswith("q_proj.router_w"))
    assert (one[0][router] - no_aux[0][router]).abs().max() > 1e-3, "the aux loss must shape the router gradient"


def test_aux_loss_enters_with_the_micro_batch_share_of_label_tokens():
    model = tiny("llama")
    handle = mf.compile(_spec(coef=0.5), model)
    ids = batch(seed=4, B=3, S=10)
    labels = ids.clone()
    labels[0, 4:] = -100
    labels[2, :7] = -100
    n_total = torch.tensor(40)
    out = model(ids, labels=labels, num_items_in_batch=n_total)
    n_here = (labels[:, 1:] != -100).sum()
    lm = model.loss_function(out.logits, labels, vocab_size=VOCAB, num_items_in_batch=n_total)
    assert_close(out.loss, lm + out.aux_loss * n_here / n_total, "float32_model")
    assert_close(out.aux_loss, handle.aux_loss(), "float32_model")
    plain = model(ids, labels=labels)
    assert_close(plain.loss - plain.aux_loss, model.loss_function(plain.logits, labels, vocab_size=VOCAB),
                 "float32_model")


def _step(model, handle, ids):
    calls = []
    hook = handle.modules["model.layers.0.self_attn.q_proj"].register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad()
    with handle.record_routing() as log:
        out = model(ids, labels=ids)
        out.loss.backward()
    hook.remove()
    counts = {n: m.site.balance_counts.clone() for n, m in handle.modules.items() if hasattr(m.site, "balance_counts")}
    grads = {k: p.grad.clone() for k, p in handle.named_parameters()}
    return out, len(log.entries), counts, grads, len(calls)


def test_activation_checkpointing_counts_the_aux_once():
    ids = batch(seed=5)
    runs = []
    for checkpointing in (False, True):
        model = tiny("llama").train()
        handle = mf.compile(_spec(), model)
        if checkpointing:
            model.activation_checkpointing_enable()
        runs.append(_step(model, handle, ids))
    (plain, entries, counts, grads, calls), (ckpt, entries_ck, counts_ck, grads_ck, calls_ck) = runs
    assert calls == 1 and calls_ck == 2, "checkpointing must recompute the adapted layer in backward"
    assert_close(ckpt.loss, plain.loss, "float32_model")
    assert_close(ckpt.aux_loss, plain.aux_loss, "float32_model")
    assert entries_ck == entries == 4, "one routing record per site and forward"
    for k in counts:
        assert torch.equal(counts_ck[k], counts[k]) and counts[k].sum() == ids.numel() * 2
    for k in grads:
        assert_close(grads_ck[k], grads[k], "float32_model", msg=k)


def test_activation_checkpointing_counts_selections_once_on_the_last_linear_of_a_layer():
    """The recomputation in backward stops at the layer's last saved tensor (checkpoint early
    stop), inside the down projection's adapter after its router selected: still counted once."""
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["down"]), adapter=mf.RankPartition(
        rank=4, router=mf.SigmoidTopKRouter(k=2, bias_update_rate=0.01)))])
    ids = batch(seed=5)
    counts = []
    for checkpointing in (False, True):
        model = tiny("llama").train()
        handle = mf.compile(spec, model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        counts.append({n: m.site.balance_counts.clone() for n, m in handle.modules.items()})
    plain, ckpt = counts
    assert len(plain) == 2
    for k in plain:
        assert torch.equal(ckpt[k], plain[k]) and plain[k].sum() == ids.numel() * 2


def test_activation_checkpointing_replays_seeded_routing_noise():
    """A seeded noisy gate draws from the site's own generator, which checkpointing does not
    restore: the recomputation must still see the first run's noise (same gradients)."""
    ids = batch(seed=7)
    grads = []
    for checkpointing in (False, True):
        model = tiny("llama").train()
        handle = mf.compile(mf.presets.load("smore_noisy"), model)
        handle.seed_noise(3)
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in handle.model.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert any(p.abs().max() > 0 for p in plain.values())
    for k in plain:
        assert_close(ckpt[k], plain[k], "float32_model", msg=k)


def test_reentrant_checkpointing_that_drops_the_aux_gradient_is_reported():
    model = tiny("llama").train()
    mf.compile(_spec(), model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        model(batch(), labels=batch())


def test_save_model_writes_the_moleforge_adapter(tmp_path):
    trainer, handle, _ = _train(tmp_path / "run", _Rows(batch(seed=6, B=4)), batch_size=2, accumulation=1, steps=2)
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"moleforge_config.json", "moleforge_model.safetensors"} <= files and "model.safetensors" not in files
    fresh = tiny("llama")
    mf.load(fresh, tmp_path / "final")
    assert_close(logits(fresh), logits(handle.model), "save_load")
    handle.remove()
    assert "save_pretrained" not in vars(handle.model), "remove() restores the model's own save_pretrained"


def test_callback_logs_routing_and_updates_balancing_once_per_step(tmp_path):
    updates = []

    def callback(handle):
        original = handle.update_balancing
        handle.update_balancing = lambda: (updates.append(1), original())[1]
        return mf.MoleforgeTrainerCallback(handle)

    trainer, handle, _ = _train(tmp_path, _Rows(batch(seed=7, B=8)), batch_size=2, accumulation=2, steps=2,
                                callbacks=[callback])
    assert len(updates) == 2, "one balancing update per optimizer step, not per micro-batch"
    bias = handle.modules["model.layers.0.self_attn.v_proj"].site.balance
    assert bias.abs().sum() > 0 and torch.allclose(bias / 0.01, (bias / 0.01).round())
    logged = [h for h in trainer.state.log_history if "routing/entropy" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["aux_loss"] > 0 and 0 < entry["routing/entropy"]
        assert {"routing/layer_0/entropy", "routing/layer_1/max_load", "routing/max_load"} <= entry.keys()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, mf.MoleforgeTrainerCallback))
    assert [h["step"] for h in cb.history] == [1, 2]
    assert all(abs(sum(v[0]) - 1) < 1e-5 for h in cb.history for v in h["expert_load"].values())


@pytest.mark.parametrize("preset", ["lora"])
def test_trainer_runs_a_preset_unchanged(preset, tmp_path):
    model = tiny("llama")
    mf.compile(mf.presets.load(preset), model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    before = logits(model)
    Trainer(model=model, args=args, train_dataset=_Rows(batch(seed=8, B=4))).train()
    assert (logits(model) - before).abs().max() > 0
