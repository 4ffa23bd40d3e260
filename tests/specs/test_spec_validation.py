"""Every invalid field gives a SpecError that names its path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import moleforge as mf
from moleforge.errors import SpecError


def _site(**adapter):
    return {"sites": [{"target": {"roles": ["gate"]}, "adapter": adapter}]}


CASES = [
    ({"sites": []}, "sites"),
    ({"sites": [{"target": {"roles": ["gatex"]}}]}, "sites[0].target.roles[0]"),
    ({"sites": [{"target": {}}]}, "sites[0].target"),
    ({"sites": [{"target": {"modules": ["(unclosed"]}}]}, "sites[0].target.modules"),
    ({"sites": [{"target": {"roles": ["q"]}, "colour": 1}]}, "sites[0].colour"),
    (_site(kind="pool", experts=0), "sites[0].adapter.pool.experts"),
    (_site(kind="pool", experts=2, router={"kind": "topk", "k": 3}), "sites[0].adapter.pool"),
    (_site(kind="pool", router={"kind": "nope"}), "sites[0].adapter.pool.router"),
    (_site(kind="pool", rank=2, down={"kind": "sparse_random"}), "sites[0].adapter.pool"),
    (_site(kind="pool", down={"kind": "shared"}, up="shared"), "sites[0].adapter.pool"),
    (_site(kind="lora", rank=-1), "sites[0].adapter.lora.rank"),
    (_site(kind="lora", alpha=0), "sites[0].adapter.lora.alpha"),
    (_site(kind="rank_partition", rank=10, block=3), "sites[0].adapter.rank_partition"),
    (_site(kind="residual_tree", levels=[]), "sites[0].adapter.residual_tree.levels"),
    (_site(kind="residual_tree", levels=[{"experts": 2, "fanout": 3}]), "sites[0].adapter.residual_tree"),
    (_site(kind="residual_tree", levels=[{"experts": 4, "fanout": 2}], router={"gate": "dense"}),
     "sites[0].adapter.residual_tree"),
    (_site(kind="residual_tree", router={"gate": "argmax"}), "sites[0].adapter.residual_tree.router.gate"),
    (_site(kind="residual_tree", aux_losses=[{"kind": "localized_balance"}]), "sites[0].adapter.residual_tree"),
    (_site(kind="quantum"), "sites[0].adapter"),
    ({"sites": [{"target": {"roles": ["q"], "overrides": [{"depth": [0.5, 0.2], "experts": 2}]},
                 "adapter": {"kind": "pool"}}]}, "sites[0].target.overrides[0]"),
    ({"sites": [{"target": {"roles": ["q"], "overrides": [{"layers": [0], "experts": 2}]},
                 "adapter": {"kind": "lora"}}]}, "sites[0]"),
    ({"sites": [{"target": {"roles": ["q"]}, "init": {"up": "ones"}}]}, "sites[0].init.up"),
    ({"sites": [{"target": {"roles": ["q"]}}], "aux_loss_coef": -1}, "aux_loss_coef"),
]


@pytest.mark.parametrize("data,path", CASES, ids=[c[1] + f"#{i}" for i, c in enumerate(CASES)])
def test_invalid_field_names_its_path(data, path):
    with pytest.raises(SpecError) as info:
        mf.AdapterSpec.model_validate(data)
    paths = [p for p, _ in info.value.problems]
    assert any(p == path or p.startswith(path + ".") or p.startswith(path + "[") for p in paths), paths
    assert path in str(info.value)


def test_json_and_python_construction_raise_spec_error():
    with pytest.raises(SpecError, match="experts"):
        mf.AdapterSpec.model_validate_json('{"sites": [{"target": {"roles": ["q"]}, '
                                           '"adapter": {"kind": "pool", "experts": 0}}]}')
    with pytest.raises(SpecError, match="router.k = 3 exceeds experts = 2"):
        mf.ExpertPool(experts=2, router=mf.TopKRouter(k=3))
    with pytest.raises(SpecError, match="not valid JSON|Invalid JSON"):
        mf.AdapterSpec.model_validate_json("{not json")


def test_spec_error_is_value_error_with_problems_list():
    with pytest.raises(ValueError) as info:
        mf.AdapterSpec.model_validate({"sites": [{"target": {"roles": ["q"]}, "adapter": {"kind": "lora", "rank": 0}}]})
    err = info.value
    assert isinstance(err, SpecError)
    assert err.problems and "greater than 0" in err.problems[0][1] and "(got 0)" in err.problems[0][1]


def test_unknown_preset_lists_available():
    with pytest.raises(SpecError, match="smore"):
        mf.presets.load("smoree")


def test_specs_are_frozen():
    spec = mf.presets.load("lora")
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "x"  # type: ignore[misc]
