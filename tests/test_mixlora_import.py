"""``mf.import_mixlora`` against the real ``mixlora`` package: adapters written in the package's
format (random non-zero weights, ``lora_dropout`` 0.05 as the package writes it) give the same logits
as the package's own injection in evaluation, and in training given the same dropout keep factors;
``lora_dropout`` is kept, saved and written back by ``mf.export_mixlora``."""

from __future__ import annotations

import copy
import json

import mixlora
import pytest
import torch
from mixlora.model import inject_adapter_in_model, load_adapter_weights
from torch import nn

import moleforge as mf
from conftest import assert_close
from models import batch, tiny
from moleforge.backends.runtime import ops_basics, ops_block
from moleforge.integrations.block_module import MoleforgeBlock

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def write_adapter(path, model, *, experts=4, top_k=2, r=4, alpha=8, targets=ATTENTION + FFN, rslora=False,
                  act_fn="silu", seed=0, dropout=0.05):
    """A MixLoRA adapter as the package writes it: its config class's ``export()`` and a
    ``torch.save``d dict of tensors (every tensor random, non-zero)."""
    config = mixlora.MixLoraConfig(base_model_="tiny", task_type_="CAUSAL_LM", peft_type_="MIXLORA",
                                   use_rslora_=rslora, lora_r_=r, lora_alpha_=alpha, lora_dropout_=dropout,
                                   target_modules_={t: True for t in targets}, routing_strategy_="mixlora",
                                   num_experts_=experts, top_k_=top_k, act_fn_=act_fn)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config.export()))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            parent = layer.self_attn if name in ATTENTION else layer.mlp
            lin = getattr(parent, name)
            keys = [f"mixlora.layers.{i}.self_attn.{name}"] if name in ATTENTION else \
                [f"mixlora.layers.{i}.mlp.{name}.experts.{e}" for e in range(experts)]
            for key in keys:
                weights[f"{key}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=gen) * 0.3
                weights[f"{key}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=gen) * 0.3
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(experts, model.config.hidden_size,
                                                                         generator=gen) * 0.5
    torch.save(weights, path / "adapter_model.bin")
    return path


def package_logits(model, path, ids):
    config, weights = load_adapter_weights(str(path), device="cpu")
    inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # the package keeps its experts outside the module tree
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    with torch.no_grad():
        return model(ids).logits


CASES = [
    ("llama", {}), ("qwen2", {}), ("mistral", {}),
    ("llama", {"top_k": 1, "rslora": True, "targets": ("q_proj", "v_proj", "up_proj", "down_proj"),
               "seed": 5}),
    ("qwen2", {"experts": 6, "top_k": 3, "r": 2, "alpha": 16, "targets": FFN, "seed": 7}),
    ("mistral", {"experts": 2, "top_k": 2, "targets": ("o_proj", "gate_proj"), "seed": 9}),
]


@pytest.mark.parametrize("arch, options", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_import_matches_the_package(arch, options, tmp_path):
    ids = batch(seed=3, B=3, S=11)
    model_seed = 11 + len(options)
    path = write_adapter(tmp_path / "adapter", tiny(arch, seed=model_seed), **options)
    base = tiny(arch, seed=model_seed)
    with torch.no_grad():
        base_logits = base(ids).logits
    want = package_logits(tiny(arch, seed=model_seed), path, ids)
    assert (want - base_logits).abs().max() > 1e-2, "the adapter must change the logits"
    for passes in (None, ()):
        model = tiny(arch, seed=model_seed)
        handle = mf.import_mixlora(model, path, passes=passes)
        with torch.no_grad():
            assert_close(model(ids).logits, want, "mixlora_package", msg=f"passes={passes}")
        assert len({n for n, m in model.named_modules() if isinstance(m, MoleforgeBlock)}) == 2
        handle.remove()


def test_missing_act_fn_uses_the_block_activation(tmp_path):
    ids = batch()
    path = write_adapter(tmp_path / "a", tiny("llama"))
    config = json.loads((path / "adapter_config.json").read_text())
    want = package_logits(tiny("llama"), path, ids)
    del config["act_fn"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny("llama")
    mf.import_mixlora(model, path)
    with torch.no_grad():
        assert_close(model(ids).logits, want, "mixlora_package")


def _edit(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LORA"}, "peft_type = 'LORA'"),
    ({"use_dora": "yes"}, "use_dora = 'yes': expected true or false"),
    ({"act_fn": "gelu"}, "differs from the activation"),
    ({"target_modules": ["q_proj"]}, "names no FFN projection"),
    ({"lora_dropout": 1.0}, r"lora_dropout = 1\.0: expected a probability in \[0, 1\)"),
])
def test_bad_configs_are_refused_and_the_model_untouched(tmp_path, change, message):
    model = tiny("llama")
    path = write_adapter(tmp_path / "a", model)
    _edit(path, **change)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mf.CheckpointError, match=message):
        mf.import_mixlora(model, path)
    assert not any(isinstance(m, MoleforgeBlock) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_tensors_are_listed(tmp_path):
    model = tiny("llama")
    path = write_adapter(tmp_path / "a", model)
    weights = torch.load(path / "adapter_model.bin", weights_only=True)
    del weights["mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"]
    torch.save(weights, path / "adapter_model.bin")
    with pytest.raises(mf.CheckpointError, match=r"layers\.1\.mlp\.up_proj\.experts\.2\.lora_B"):
        mf.import_mixlora(model, path)
    assert not any(isinstance(m, MoleforgeBlock) for m in model.modules())


def test_targets_the_model_lacks_are_skipped_as_the_package_does(tmp_path):
    ids = batch()
    path = write_adapter(tmp_path / "a", tiny("llama"))
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = config["target_modules"] + ["dense", "fc1"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    weights = torch.load(path / "adapter_model.bin", weights_only=True)
    weights["mixlora.layers.0.self_attn.dense.lora_A.weight"] = torch.ones(4, 32)
    torch.save(weights, path / "adapter_model.bin")
    want = package_logits(tiny("llama"), path, ids)
    model = tiny("llama")
    with pytest.warns(UserWarning, match="ignored"):
        mf.import_mixlora(model, path)
    with torch.no_grad():
        assert_close(model(ids).logits, want, "mixlora_package")


def test_lora_dropout_is_imported_exported_and_round_trips(tmp_path):
    """The package's ``lora_dropout`` becomes the ``dropout`` of the pool and of the attention LoRAs;
    ``mf.save`` / ``mf.load`` keep it; ``mf.export_mixlora`` writes it back, with every tensor, in files
    the package reads (its logits equal ours) and ``import_mixlora`` reads again."""
    ids = batch(seed=2)
    path = write_adapter(tmp_path / "a", tiny("llama"), dropout=0.15)
    model = tiny("llama")
    handle = mf.import_mixlora(model, path)
    assert [s.adapter.dropout for s in handle.spec.sites] == [0.15, 0.15]
    mf.save(handle, tmp_path / "saved")
    assert [s.adapter.dropout for s in mf.load(tiny("llama"), tmp_path / "saved").spec.sites] == [0.15, 0.15]
    out = mf.export_mixlora(handle, tmp_path / "exported")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.15
    assert mixlora.MixLoraConfig.from_config(config).check().lora_dropout_ == 0.15
    before = torch.load(path / "adapter_model.bin", weights_only=True)
    after = torch.load(out / "adapter_model.bin", weights_only=True)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert_close(model.eval()(ids).logits, package_logits(tiny("llama"), out, ids), "mixlora_package")
    again = mf.import_mixlora(tiny("llama"), out)
    assert again.spec == handle.spec


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    spec = mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                adapter=mf.ExpertPool(experts=2, rank=2, dropout=0.1, router=mf.TopKRouter(k=1))),
        mf.Site(target=mf.Target(roles=["q"]), adapter=mf.LoRA(rank=2, dropout=0.2))])
    with pytest.raises(mf.CheckpointError, match=r"sites\[1\] is not a plain LoRA with the pool's rank, alpha"):
        mf.export_mixlora(mf.compile(spec, tiny("llama")), tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _SlotDrop(nn.Module):
    """Stands in for the ``nn.Dropout`` of one of the package's expert ``LoraLinear``: multiplies the
    rows of its call (one expert's tokens, in the package's order) by the keep factors stashed for it."""

    keep: torch.Tensor | None = None

    def forward(self, x):
        return x * self.keep


def given_slot_masks(monkeypatch, model, T: int, k: int, p: float) -> list:
    """Drawn keep factors per layer (gate, up and down, ``(T, k, width)``) that moleforge's blocks are
    handed in place of their own draws (each block checks it draws once, for those widths); the
    attention LoRAs' dropout is turned off. Returns them for :func:`with_slot_masks`."""
    d, F = model.config.hidden_size, model.config.intermediate_size
    gen = torch.Generator().manual_seed(0)
    keeps = [[(torch.rand(T, k, w, generator=gen) >= p).float() / (1 - p) for w in (d, d, F)]
             for _ in model.model.layers]
    calls = iter(keeps)

    def given_keeps(like, T_, k_, widths, drop):
        assert (T_, k_, list(widths), drop[0]) == (T, k, [d, d, F], p), "one draw per block: gate, up, down"
        return next(calls)

    monkeypatch.setattr(ops_block, "draw_keeps", given_keeps)
    monkeypatch.setattr(ops_basics, "dropout", lambda x, p, training, generator=None: x)
    return keeps


def with_slot_masks(package, keeps, T: int, d: int, k: int, E: int) -> None:
    """Make the package's MixLoRA blocks drop with ``keeps`` (per layer: gate, up and down keep
    factors ``(T, k, width)``): each expert call gets its tokens' rows, in the package's routing
    order; the attention LoRAs' dropout is turned off."""
    for layer, keep in zip(package.model.layers, keeps, strict=True):
        for proj in ATTENTION:
            getattr(layer.self_attn, proj).dropout_ = nn.Identity()
        moe = layer.mlp.mixlora_moes["default"]
        for lin in moe.experts_.values():
            lin.dropout_ = _SlotDrop()

        def forward(hidden, moe=moe, keep=keep):  # the package's routing, to hand each expert call its rows
            selected = torch.softmax(torch.nn.functional.linear(hidden.reshape(T, d), moe.gate_), 1).topk(k).indices
            slots = torch.nn.functional.one_hot(selected, E).permute(2, 1, 0)  # (E, k, T), the package's mask
            for e in range(E):
                j, t = torch.where(slots[e])
                for proj, factors in zip(FFN, keep, strict=True):
                    moe.experts_[f"experts.{e}.{proj}"].dropout_.keep = factors[t, j]
            return moe.forward(hidden)

        layer.mlp.forward = forward


def test_training_dropout_is_where_the_package_applies_it(tmp_path, monkeypatch):
    """In training, given the same keep factors per token, routed slot and LoRA, moleforge's blocks
    and the package's ``MixLoraSparseMoe`` (whose ``LoraLinear`` apply ``lora_B(lora_A(dropout(x)))``
    per expert: gate and up on the block input, down on ``act(gate) * up``) give the same logits. The
    attention LoRAs' dropout is off on both sides (it is PEFT's, tested elsewhere)."""
    ids, p, E, k = batch(seed=4, B=2, S=5), 0.3, 4, 2
    path = write_adapter(tmp_path / "a", tiny("llama"), dropout=p, experts=E, top_k=k)
    model = tiny("llama")
    T, d = ids.numel(), model.config.hidden_size
    keeps = given_slot_masks(monkeypatch, model, T, k, p)
    mf.import_mixlora(model, path)
    ours = model.train()(ids).logits

    package = tiny("llama")
    config, weights = load_adapter_weights(str(path), device="cpu")
    inject_adapter_in_model(package, config, weights)
    with_slot_masks(package, keeps, T, d, k, E)
    theirs = package.train()(ids).logits
    assert_close(ours, theirs, "mixlora_package")
    with torch.no_grad():
        assert (model.eval()(ids).logits - ours).abs().max() > 1e-3, "the masks change the logits"
