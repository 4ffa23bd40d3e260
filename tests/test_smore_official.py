"""``mf.import_smore_official``: checkpoints of the official S'MoRE code reproduce the official
layer's outputs and aux losses; bad checkpoints and configs fail with clear errors.

Reference data, all in ``tests/data/smore_official``: the S'MoRE reference case ``case1_switch``
(512 -> 1408, switch gate; byte for byte the project's shared reference) and small cases made with
the official layer (dense, noisy top-k, three levels with unequal pools, fanout 1, lora_alpha
scalings, activation positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import moleforge as mf
from moleforge.integrations.inject import AdaptedLinear
from moleforge.interop.smore_official import official_name, smore_spec_from_official
from moleforge.ir import interpret

LOCAL = Path(__file__).resolve().parent / "data" / "smore_official"
REFERENCE = "case1_switch"  # the reference case, with tests of its own below
LOCAL_CASES = sorted(p.stem for p in LOCAL.glob("*.json") if p.stem != REFERENCE)
REF_TOL = 1e-5


class Holder(nn.Module):
    """A model holding one linear, as the official layer wraps one ``base_layer``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _case(directory: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((directory / f"{name}.json").read_text())
    return meta, load_file(str(directory / f"{name}.safetensors"))


def _reference_case() -> tuple[dict, dict[str, torch.Tensor]]:
    return _case(LOCAL, REFERENCE)


def _model_for(t: dict[str, torch.Tensor]) -> Holder:
    W = t["base_layer.weight"]
    model = Holder(W.shape[1], W.shape[0])
    with torch.no_grad():
        model.proj.weight.copy_(W)
        model.proj.bias.copy_(t["base_layer.bias"])
    return model.eval()


def _check_against_official(meta: dict, t: dict[str, torch.Tensor], source) -> mf.AdapterHandle:
    model = _model_for(t)
    handle = mf.import_smore_official(model, source, meta["official_config"])
    handle.eval_aux()  # the official layer's aux loss, in evaluation mode without autograd
    with torch.no_grad():
        y = model(t["x"])
    assert (y - t["y"]).abs().max().item() <= REF_TOL
    aux = handle.aux_loss()
    if "aux_balance_loss" in t:
        torch.testing.assert_close(aux.reshape(1), t["aux_balance_loss"], atol=1e-6, rtol=1e-5)
    else:
        assert aux is None
    return handle


def test_reference_case_through_the_importer():
    meta, t = _reference_case()
    handle = _check_against_official(meta, t, LOCAL / f"{REFERENCE}.safetensors")
    tree = handle.spec.sites[0].adapter
    assert tree.conventions == "official" and tree.router.gate == "switch"
    assert [lv.fanout for lv in tree.levels] == meta["official_config"]["num_active"]


def test_reference_case_routing_matches():
    meta, t = _reference_case()
    model = _model_for(t)
    handle = mf.import_smore_official(model, t, meta["official_config"])
    with torch.no_grad(), handle.record_routing() as log:
        model(t["x"])
    (_, routes), = log.entries
    indices, weights = routes["route"].indices, routes["route"].weights
    for l in range(len(indices)):
        ref_idx = t[f"routing.pool{l}.indices"].reshape(indices[l].shape)
        ref_w = t[f"routing.pool{l}.weights"].reshape(weights[l].shape)
        mine = indices[l].sort(-1)
        theirs = ref_idx.sort(-1)
        assert torch.equal(mine.values, theirs.values)
        torch.testing.assert_close(weights[l].gather(-1, mine.indices), ref_w.gather(-1, theirs.indices),
                                   atol=1e-6, rtol=1e-5)


def test_reference_case_is_the_interpreters_semantics():
    """The float64 interpreter, fed the official tensors, gives the official output."""
    meta, t = _reference_case()
    tree = smore_spec_from_official(meta["official_config"])
    from moleforge.compiler.build import SiteShape, build_graph
    d_out, d_in = t["base_layer.weight"].shape
    graph = build_graph(tree, SiteShape("proj", d_in, d_out))
    params = {d.name: t[_live(official_name(d.name))] for d in graph.params}
    x = t["x"].reshape(-1, d_in).double()
    delta = interpret(graph, params, x).output
    y = x @ t["base_layer.weight"].double().T + t["base_layer.bias"].double() + delta
    assert (y - t["y"].reshape(-1, d_out).double()).abs().max().item() <= REF_TOL


def _live(key: str) -> str:
    """The live ``state_dict`` key (adapter name ``default``) of a saved official key."""
    head, _, rest = key.partition(".")
    return f"{head}.default" + (f".{rest}" if rest else "")


@pytest.mark.parametrize("name", LOCAL_CASES)
def test_official_cases(name):
    meta, t = _case(LOCAL, name)
    _check_against_official(meta, t, t)


def test_peft_checkpoint_directory(tmp_path):
    """The fork's saved form: ``base_model.model.<module>.moe_*`` keys without the adapter
    name, in ``adapter_model.safetensors`` beside ``adapter_config.json``."""
    meta, t = _reference_case()
    saved = {f"base_model.model.proj.{k.replace('.default', '')}": v for k, v in t.items()
             if k.startswith("moe_")}
    save_file(saved, str(tmp_path / "adapter_model.safetensors"))
    config = dict(meta["official_config"], peft_type="HIER_MOE", moe_arch="smore", target_modules=["proj"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = _model_for(t)
    mf.import_smore_official(model, tmp_path, tmp_path)
    with torch.no_grad():
        assert (model(t["x"]) - t["y"]).abs().max().item() <= REF_TOL


def test_many_modules_of_a_model():
    """Every module of a checkpoint gets its own tensors; the down-projection width follows
    each module's d_in when ``dim_downproj_x <= 0``."""
    from models import tiny
    model = tiny("llama")
    cfg = {"num_experts": [3, 2], "num_active": [2, 1], "expert_dims": [2, 2], "gate_dims": [4, 3],
           "dim_downproj_x": 0, "gate_type": "switch", "expert_act_fn": "tanh", "gate_act_fn": "relu"}
    names = [n for n, _ in model.named_modules() if n.endswith(("mlp.up_proj", "mlp.down_proj"))]
    gen = torch.Generator().manual_seed(0)
    ckpt, shapes = {}, {}
    for name in names:
        d_in = model.get_submodule(name).in_features
        graph_tree = smore_spec_from_official(cfg, d_in)
        from moleforge.compiler.build import SiteShape, build_graph
        g = build_graph(graph_tree, SiteShape(name, d_in, model.get_submodule(name).out_features))
        for d in g.params:
            key = f"base_model.model.{name}.{official_name(d.name)}"
            ckpt[key] = torch.randn(d.shape, generator=gen)
            shapes[name] = d_in
    handle = mf.import_smore_official(model, ckpt, cfg)
    assert sorted(handle.modules) == sorted(names)
    own = handle.state_dict()
    for key, value in ckpt.items():
        name, _, off = key.removeprefix("base_model.model.").partition(".moe_")
        mine = next(k for k in own
                    if k.startswith(name + ".") and official_name(k[len(name) + 1:]) == "moe_" + off)
        assert torch.equal(own[mine], value)
    for name in names:
        assert handle.graphs[name].param_decls["down_w"].shape == (shapes[name], shapes[name])


# ---- errors -----------------------------------------------------------------------------------

def _small_checkpoint() -> tuple[dict, dict[str, torch.Tensor]]:
    meta, t = _case(LOCAL, "switch_child")
    return meta["official_config"], {k: v for k, v in t.items() if k.startswith("moe_")}


def _assert_untouched(model: Holder):
    assert isinstance(model.proj, nn.Linear)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


@pytest.mark.parametrize("field,value", [("gate_arch", "bottom_up"), ("is_shared_expert_pool", True),
                                         ("expert_act_fn", "prelu|0.25"), ("gate_type", "topk"),
                                         ("activation_position", "middle")])
def test_unsupported_config_fields(field, value):
    cfg, ckpt = _small_checkpoint()
    model = Holder(12, 10)
    with pytest.raises(mf.CheckpointError, match=field):
        mf.import_smore_official(model, ckpt, dict(cfg, **{field: value}))
    _assert_untouched(model)


def test_missing_unexpected_and_misshaped_tensors_are_listed():
    cfg, ckpt = _small_checkpoint()
    del ckpt["moe_W.default.1"]
    ckpt["moe_A.default.0"] = ckpt["moe_A.default.0"][:, :1]
    ckpt["moe_expert_act_param.default.0"] = torch.ones(1)
    model = Holder(12, 10)
    with pytest.raises(mf.CheckpointError) as e:
        mf.import_smore_official(model, ckpt, cfg)
    msg = str(e.value)
    assert "moe_W.1 is missing" in msg and "moe_A.0 has shape" in msg
    assert "unexpected moe_expert_act_param.0" in msg
    _assert_untouched(model)


def test_config_lists_must_agree():
    cfg, ckpt = _small_checkpoint()
    with pytest.raises(mf.CheckpointError, match="differ in length"):
        mf.import_smore_official(Holder(12, 10), ckpt, dict(cfg, expert_dims=[2]))


def test_modules_the_model_lacks():
    cfg, ckpt = _small_checkpoint()
    ckpt = {f"base_model.model.layers.3.mlp.up_proj.{k}": v for k, v in ckpt.items()}
    with pytest.raises(mf.CheckpointError, match="layers.3.mlp.up_proj"):
        mf.import_smore_official(Holder(12, 10), ckpt, cfg)


def test_keys_without_module_path_need_a_unique_linear():
    cfg, ckpt = _small_checkpoint()
    two = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12))
    with pytest.raises(mf.CheckpointError, match="module="):
        mf.import_smore_official(two, ckpt, cfg)
    handle = mf.import_smore_official(two, ckpt, cfg, module="0")
    assert list(handle.modules) == ["0"]


def test_several_adapters_need_a_name():
    cfg, ckpt = _small_checkpoint()
    both = dict(ckpt, **{k.replace(".default", ".other"): v for k, v in ckpt.items()})
    with pytest.raises(mf.CheckpointError, match="adapter_name"):
        mf.import_smore_official(Holder(12, 10), both, cfg)
    handle = mf.import_smore_official(Holder(12, 10), both, cfg, adapter_name="other")
    assert handle.modules


def test_no_smore_tensors():
    cfg, _ = _small_checkpoint()
    with pytest.raises(mf.CheckpointError, match="no S'MoRE parameters"):
        mf.import_smore_official(Holder(12, 10), {"lora_A.weight": torch.zeros(1)}, cfg)


def test_unreadable_files(tmp_path):
    cfg, _ = _small_checkpoint()
    with pytest.raises(mf.CheckpointError, match="adapter_model"):
        mf.import_smore_official(Holder(12, 10), tmp_path, cfg)
    with pytest.raises(mf.CheckpointError, match="adapter_config.json"):
        mf.import_smore_official(Holder(12, 10), {}, tmp_path)
