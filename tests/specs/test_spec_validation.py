"""Every invalid field gives a SpecError that names its path."""

from __future__ import annotations

import math
import typing

import pytest
from pydantic import ValidationError

import moleforge as mf
from moleforge.errors import SpecError
from moleforge.specs import SpecModel


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


# ---- finite floats, bounded seeds ------------------------------------------------------------------

def _spec_models() -> list[type[mf.SpecModel]]:
    found, todo = [], [SpecModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return sorted({c for c in found if c.__module__.startswith("moleforge.specs")}, key=lambda c: c.__name__)


def _has_float(annotation) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


FLOAT_FIELDS = [(cls, name) for cls in _spec_models() for name, info in cls.model_fields.items()
                if _has_float(info.annotation)]
"""Every float field of every spec object (``float``, ``float | None``, ``tuple[float, float]``,
``list[float] | None``)."""

VALID = {mf.LayerOverride: {"layers": [0], "experts": 2}, mf.Target: {"roles": ["q"]},
         mf.Site: {"target": {"roles": ["q"]}}, mf.AdapterSpec: {"sites": [{"target": {"roles": ["q"]}}]},
         mf.specs.LoRASource: {"path": "lora"}}
"""The fields a spec object needs besides defaults."""


def test_the_float_fields_found_are_every_float_field():
    names = {name for _, name in FLOAT_FIELDS}
    assert {"temperature", "jitter", "bias_update_rate", "weight", "delta", "alpha", "std", "density",
            "aux_loss_coef", "depth"} <= names, names


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cls, name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
def test_every_float_field_refuses_infinity_and_nan(cls, name, value):
    data = dict(VALID.get(cls, {}))
    kinds = {typing.get_origin(a) for a in typing.get_args(cls.model_fields[name].annotation)}
    data[name] = (0.0, value) if tuple in kinds else [value] if list in kinds else value
    with pytest.raises(SpecError) as info:
        cls.model_validate(data)
    assert [p for p, _ in info.value.problems] in ([name], [f"{name}[1]"], [f"{name}[0]"]), info.value.problems
    assert "finite number" in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_json_infinity_and_nan_are_refused_with_the_full_path(literal):
    text = ('{"sites": [{"target": {"roles": ["q"]}, "adapter": {"kind": "pool", "router": '
            f'{{"kind": "topk", "temperature": {literal}}}}}}}]}}')
    with pytest.raises(SpecError, match=r"sites\[0\]\.adapter\.pool\.router\.topk\.temperature: .*finite"):
        mf.AdapterSpec.model_validate_json(text)


@pytest.mark.parametrize("name", mf.presets.names())
def test_every_preset_round_trips_through_json(name):
    spec = mf.presets.load(name)
    text = spec.model_dump_json()
    again = mf.AdapterSpec.model_validate_json(text)
    assert again == spec and again.model_dump_json() == text


@pytest.mark.parametrize("seed, ok", [(0, True), (2**63 - 1, True), (2**63, False), (2**64, False), (-1, False)])
def test_init_seed_is_a_64_bit_signed_integer(seed, ok):
    data = {"sites": [{"target": {"roles": ["q"]}, "init": {"seed": seed}}]}
    if ok:
        assert mf.AdapterSpec.model_validate(data).sites[0].init.seed == seed
        return
    with pytest.raises(SpecError, match=r"sites\[0\]\.init\.seed: Input should be"):
        mf.AdapterSpec.model_validate(data)


def test_the_largest_seed_compiles():
    from models import tiny

    spec = mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), init=mf.Init(seed=2**63 - 1))])
    mf.compile(spec, tiny("llama")).remove()


# ---- rules the IR verifier used to be the first to find --------------------------------------------

@pytest.mark.parametrize("adapter", [
    {"kind": "pool", "router": {"kind": "dense"}},
    {"kind": "pool", "router": {"kind": "sigmoid_topk", "k": 2}},
    {"kind": "pool", "rank": 1, "down": {"kind": "sparse_random"}, "router": {"kind": "implicit_topk", "k": 2}},
    {"kind": "rank_partition", "rank": 8, "router": {"kind": "dense"}},
    {"kind": "rank_partition", "rank": 8, "router": {"kind": "sigmoid_topk", "k": 2}},
], ids=["pool-dense", "pool-sigmoid", "pool-implicit", "partition-dense", "partition-sigmoid"])
def test_switch_lb_needs_a_softmax_topk_router(adapter):
    data = {"sites": [{"target": {"roles": ["q"]}, "adapter": {**adapter, "aux_losses": [{"kind": "switch_lb"}]}}]}
    with pytest.raises(SpecError, match=r"aux_losses\[0\]\.kind = 'switch_lb' needs a softmax top-k router") as info:
        mf.AdapterSpec.model_validate(data)
    assert info.value.problems[0][0] == f"sites[0].adapter.{adapter['kind']}"
    assert f"got router.kind = {adapter['router']['kind']!r}" in str(info.value)


def test_an_override_rank_of_an_implicit_topk_pool_must_be_one():
    flylora = {"kind": "pool", "rank": 1, "down": {"kind": "sparse_random"}, "router": {"kind": "implicit_topk"}}
    data = {"sites": [{"target": {"roles": ["q"], "overrides": [{"layers": [0], "rank": 2}]}, "adapter": flylora}]}
    with pytest.raises(SpecError, match=r"target.overrides\[0\].rank = 2: an implicit_topk router routes single"):
        mf.AdapterSpec.model_validate(data)
    data["sites"][0]["target"]["overrides"][0]["rank"] = 1
    mf.AdapterSpec.model_validate(data)


@pytest.mark.parametrize("site, message", [
    ({"target": {"roles": ["q", "gate"]}, "adapter": {"kind": "pool"}}, r"target.roles \['q'\]: scope 'ffn_block'"),
    ({"target": {"roles": ["k", "v", "o"]}, "adapter": {"kind": "pool"}}, r"adapt k, v, o with a second site"),
    ({"target": {"roles": ["up"]}, "adapter": {"kind": "lora"}}, "needs an adapter of kind 'pool'"),
    ({"target": {"roles": ["up"]}, "adapter": {"kind": "pool", "down": {"kind": "shared"}}}, "their own A and B"),
    ({"target": {"roles": ["up"]}, "adapter": {"kind": "pool", "up": "shared"}}, "their own A and B"),
    ({"target": {"roles": ["up"]}, "adapter": {"kind": "pool", "shared_expert": {"kind": "lora"}}},
     "their own A and B"),
], ids=["q", "kvo", "lora", "shared-down", "shared-up", "shared-expert"])
def test_ffn_block_sites_are_checked_in_the_spec(site, message):
    with pytest.raises(SpecError, match=message) as info:
        mf.AdapterSpec.model_validate({"sites": [{**site, "scope": "ffn_block"}]})
    assert info.value.problems[0][0] == "sites[0]"
