"""MixLoRA adapters with ``use_dora = true`` against the real ``mixlora`` package: ``mf.import_mixlora``
reads the magnitude of every expert LoRA and attention LoRA (non-zero B, magnitudes away from the
package's initial ones) and gives the package's logits; a file without magnitudes is read as the
package's loader reads it; ``mf.export_mixlora`` writes ``use_dora`` and the absolute magnitudes back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mixlora.config import LoraConfig
from mixlora.lora_linear import LoraLinear
from mixlora.model import inject_adapter_in_model, load_adapter_weights
from torch import nn

import moleforge as mf
from conftest import assert_close
from models import batch, tiny
from moleforge.integrations.block_module import MoleforgeBlock
from moleforge.interop.mixlora_dora import MAGNITUDE_KEY
from test_mixlora_import import ATTENTION, FFN, given_slot_masks, with_slot_masks, write_adapter


def _package_linears(model):
    """``{key prefix of the adapter file: the package's LoraLinear}`` of a model the package injected."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ATTENTION:
            lin = getattr(layer.self_attn, proj)
            if isinstance(lin, LoraLinear):
                out[f"mixlora.layers.{i}.self_attn.{proj}"] = lin
        for moe in layer.mlp.mixlora_moes.values():
            for name, lin in moe.experts_.items():
                _, e, proj = name.split(".")
                out[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}"] = lin
    return out


def write_dora_adapter(path, arch: str, model_seed: int, *, magnitudes: bool = True, seed: int = 0, **options):
    """A MixLoRA adapter with ``use_dora`` for ``tiny(arch, model_seed)`` (random non-zero factors); with
    ``magnitudes``, every LoRA's ``magnitude_vector_`` too: the package's initial one (``‖W + s B A‖``)
    scaled by random factors in (0.5, 1.5), as after training."""
    write_adapter(path, tiny(arch, seed=model_seed), seed=seed, **options)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    if not magnitudes:
        return path
    package = _inject(tiny(arch, seed=model_seed), path)
    weights = torch.load(path / "adapter_model.bin", weights_only=True)
    gen = torch.Generator().manual_seed(seed + 1)
    for key, lin in _package_linears(package).items():
        m = lin.magnitude_vector_.detach()
        weights[f"{key}.{MAGNITUDE_KEY}"] = m * (0.5 + torch.rand(m.shape, generator=gen))
    torch.save(weights, path / "adapter_model.bin")
    return path


def _inject(model, path):
    """The package's injection, then the file's magnitudes (its loader sets ``‖W + s B A‖`` instead)."""
    config, weights = load_adapter_weights(str(path), device="cpu")
    inject_adapter_in_model(model, config, weights)
    with torch.no_grad():
        for key, lin in _package_linears(model).items():
            if f"{key}.{MAGNITUDE_KEY}" in weights:
                lin.magnitude_vector_.copy_(weights[f"{key}.{MAGNITUDE_KEY}"])
            lin.eval()
    return model.eval()


def test_the_key_is_the_packages_parameter_name():
    config = LoraConfig(lora_r_=2, lora_alpha_=4, lora_dropout_=0.05, use_dora_=True)
    assert MAGNITUDE_KEY in LoraLinear(nn.Linear(3, 4), config).state_dict()


def test_dora_import_matches_the_package(tmp_path):
    ids = batch(seed=3, B=3, S=11)
    path = write_dora_adapter(tmp_path / "a", "llama", 12, seed=4)
    with torch.no_grad():
        want = _inject(tiny("llama", seed=12), path)(ids).logits
        plain = tiny("llama", seed=12)
        mf.import_mixlora(plain, write_adapter(tmp_path / "plain", plain, seed=4))
        assert (want - plain(ids).logits).abs().max() > 1e-2, "the magnitudes must change the logits"
    for passes in (None, ()):
        model = tiny("llama", seed=12)
        handle = mf.import_mixlora(model, path, passes=passes)
        assert all(s.adapter.magnitude for s in handle.spec.sites)
        with torch.no_grad():
            assert_close(model(ids).logits, want, "mixlora_package", msg=f"passes={passes}")


def test_dora_import_matches_the_package_in_float64(tmp_path):
    """The same in float64 (the file's tensors and the package's LoRAs in float64 too), to the float64
    tolerance."""
    ids = batch(seed=5, B=2, S=7)
    path = write_dora_adapter(tmp_path / "a", "qwen2", 3, seed=6, experts=3, top_k=2,
                              targets=("q_proj", "v_proj") + FFN)
    weights = torch.load(path / "adapter_model.bin", weights_only=True)
    torch.save({k: v.double() for k, v in weights.items()}, path / "adapter_model.bin")
    package = tiny("qwen2", seed=3).double()
    config, weights = load_adapter_weights(str(path), device="cpu", dtype=torch.float64)
    inject_adapter_in_model(package, config, weights)
    with torch.no_grad():
        for key, lin in _package_linears(package).items():
            lin.magnitude_vector_.copy_(weights[f"{key}.{MAGNITUDE_KEY}"])
            lin.eval()
        want = package.eval()(ids).logits
    model = tiny("qwen2", seed=3).double()
    mf.import_mixlora(model, path)
    with torch.no_grad():
        assert_close(model(ids).logits, want, "float64")


def test_a_file_without_magnitudes_is_read_as_the_package_reads_it(tmp_path):
    """The package's loader sets every magnitude to ``‖W + s B A‖`` from the loaded factors; the
    importer does the same for a file that has none, and gives the package's logits."""
    ids = batch(seed=2)
    path = write_dora_adapter(tmp_path / "a", "mistral", 1, magnitudes=False, seed=8, rslora=True)
    with torch.no_grad():
        want = _inject(tiny("mistral", seed=1), path)(ids).logits
    model = tiny("mistral", seed=1)
    handle = mf.import_mixlora(model, path)
    with torch.no_grad():
        assert_close(model(ids).logits, want, "mixlora_package")
    assert any(v.abs().max() > 1e-3 for k, v in handle.state_dict().items() if "magnitude" in k)


def test_dora_round_trips_through_export(tmp_path):
    """``export_mixlora`` writes ``use_dora: true`` and every magnitude, absolute, under the package's keys;
    the package (given those magnitudes) and ``import_mixlora`` read it back to the same logits."""
    ids = batch(seed=4)
    path = write_dora_adapter(tmp_path / "a", "llama", 0, seed=2)
    model = tiny("llama")
    handle = mf.import_mixlora(model, path)
    out = mf.export_mixlora(handle, tmp_path / "exported")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    before = torch.load(path / "adapter_model.bin", weights_only=True)
    after = torch.load(out / "adapter_model.bin", weights_only=True)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert_close(after[k], v, "float32", msg=k)
    with torch.no_grad():
        logits = model(ids).logits
        assert_close(_inject(tiny("llama"), out)(ids).logits, logits, "mixlora_package")
    again_model = tiny("llama")
    again = mf.import_mixlora(again_model, out)
    assert again.spec == handle.spec
    with torch.no_grad():
        assert_close(again_model(ids).logits, logits, "mixlora_package")


def test_export_needs_one_use_dora_for_every_lora(tmp_path):
    spec = mf.AdapterSpec(sites=[
        mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                adapter=mf.ExpertPool(experts=2, rank=2, magnitude=True, router=mf.TopKRouter(k=1))),
        mf.Site(target=mf.Target(roles=["q"]), adapter=mf.LoRA(rank=2))])
    with pytest.raises(mf.CheckpointError, match=re.escape("sites[1] is not a plain LoRA with the pool's rank, alpha, "
                                                           "scaling, dropout and magnitude (use_dora = True)")):
        mf.export_mixlora(mf.compile(spec, tiny("llama")), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dora_on_biased_attention_projections_is_refused(tmp_path):
    """Qwen2's q/k/v have biases, which the package's DoRA scales and PEFT's does not: refused, naming the
    projection, the model left as it was."""
    path = write_dora_adapter(tmp_path / "a", "qwen2", 0, magnitudes=False, targets=("q_proj",) + FFN)
    model = tiny("qwen2")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.bias.normal_()
    with pytest.raises(mf.CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj: use_dora on a projection "
                                                 "with a bias"):
        mf.import_mixlora(model, path)
    assert not any(isinstance(m, MoleforgeBlock) for m in model.modules())


def test_a_magnitude_of_another_shape_is_named(tmp_path):
    path = write_dora_adapter(tmp_path / "a", "llama", 0)
    weights = torch.load(path / "adapter_model.bin", weights_only=True)
    key = f"mixlora.layers.1.mlp.down_proj.experts.3.{MAGNITUDE_KEY}"
    weights[key] = torch.ones(5)
    torch.save(weights, path / "adapter_model.bin")
    model = tiny("llama")
    with pytest.raises(mf.CheckpointError, match=re.escape(f"{key}: shape (5,), the magnitude of this model's "
                                                           "linear needs (32,), one per output row")):
        mf.import_mixlora(model, path)
    assert not any(isinstance(m, MoleforgeBlock) for m in model.modules())


def test_training_with_dropout_matches_the_package(tmp_path, monkeypatch):
    """DoRA experts with dropout in training: given the same keep factors per token, routed slot and LoRA,
    the blocks give the package's logits (its ``apply_dora(base(x), lora_B(lora_A(dropout(x))))`` per
    expert LoRA). The attention LoRAs' dropout is off on both sides (their training form is PEFT's)."""
    ids, p, E, k = batch(seed=4, B=2, S=5), 0.3, 4, 2
    path = write_dora_adapter(tmp_path / "a", "llama", 0, seed=3, dropout=p, experts=E, top_k=k)
    model = tiny("llama")
    T, d = ids.numel(), model.config.hidden_size
    keeps = given_slot_masks(monkeypatch, model, T, k, p)
    mf.import_mixlora(model, path)
    ours = model.train()(ids).logits

    package = _inject(tiny("llama"), path)
    with_slot_masks(package, keeps, T, d, k, E)
    theirs = package.train()(ids).logits
    assert_close(ours, theirs, "mixlora_package")
    with torch.no_grad():
        assert (model.eval()(ids).logits - ours).abs().max() > 1e-3, "the masks change the logits"
