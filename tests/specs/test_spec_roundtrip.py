"""Specs round-trip through JSON; every preset loads; the schema is valid JSON Schema."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

import moleforge as mf
from strategies import adapters


@given(adapter=adapters(), roles=st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down"]),
                                            min_size=1, unique=True))
def test_json_round_trip(adapter, roles):
    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=roles), adapter=adapter)])
    again = mf.AdapterSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert json.loads(again.model_dump_json()) == json.loads(spec.model_dump_json())


def test_every_preset_loads_and_round_trips():
    names = mf.presets.names()
    assert {"lora", "molora", "mola", "hydralora", "loramoe", "smora", "flylora", "smore", "smore_dense",
            "smore_noisy"} <= set(names)
    for name in names:
        spec = mf.presets.load(name)
        assert spec.name == name and spec.description
        assert mf.AdapterSpec.model_validate_json(spec.model_dump_json()) == spec


def test_schema_is_json_and_names_the_kinds():
    schema = mf.AdapterSpec.model_json_schema()
    text = json.dumps(schema)
    for kind in ("residual_tree", "pool", "rank_partition", "lora", "switch_lb", "sigmoid_topk", "implicit_topk"):
        assert kind in text
    assert schema["required"] == ["sites"]


def test_preset_defaults_match_the_methods():
    smore = mf.presets.load("smore").sites[0].adapter
    assert [(lv.experts, lv.rank, lv.fanout) for lv in smore.levels] == [(4, 8, 2), (4, 8, 2)]
    assert smore.router.gate == "switch" and smore.activation == "tanh"
    assert mf.presets.load("smore_dense").sites[0].adapter.router.gate == "dense"
    assert mf.presets.load("smore_noisy").sites[0].adapter.router.gate == "noisy_topk"
    mola = mf.presets.load("mola").sites[0]
    assert [ov.experts for ov in mola.target.overrides] == [2, 4, 6, 8]
    hydra = mf.presets.load("hydralora").sites[0].adapter
    assert hydra.down.kind == "shared" and hydra.router.kind == "dense" and hydra.experts == 4
    fly = mf.presets.load("flylora").sites[0].adapter
    assert (fly.experts, fly.rank, fly.router.k, fly.down.density) == (32, 1, 8, 0.25)
    smora = mf.presets.load("smora").sites[0].adapter
    assert (smora.rank, smora.router.k, smora.router.bias_update_rate) == (64, 8, 1e-5)
