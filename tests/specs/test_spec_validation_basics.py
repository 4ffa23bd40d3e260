"""Dropout, capacity, z-loss, per-expert ranks and shared-expert groups: each bad value gives a
SpecError naming its field path, the value and the fix."""

from __future__ import annotations

import re

import pytest

import moleforge as mf
from moleforge.errors import SpecError


def _site(**adapter) -> dict:
    return {"sites": [{"target": {"roles": ["q"]}, "adapter": adapter}]}


BAD = [
    (_site(kind="lora", dropout=1.0), r"sites\[0\]\.adapter\.lora\.dropout", "less than 1"),
    (_site(kind="pool", dropout=-0.1), r"sites\[0\]\.adapter\.pool\.dropout", "greater than or equal to 0"),
    (_site(kind="pool", router={"kind": "dense"}, capacity_factor=1.0), r"sites\[0\]\.adapter\.pool",
     "capacity_factor = 1.0 limits the tokens of top-k experts; router.kind = 'dense'"),
    (_site(kind="pool", capacity_factor=0), r"sites\[0\]\.adapter\.pool\.capacity_factor", "greater than 0"),
    (_site(kind="pool", router={"kind": "static"}, aux_losses=[{"kind": "z_loss"}]), r"sites\[0\]\.adapter\.pool",
     "aux_losses\\[0\\].kind = 'z_loss' reads router logits; router.kind = 'static' has none"),
    (_site(kind="pool", rank=1, down={"kind": "sparse_random"}, router={"kind": "implicit_topk", "k": 2},
           aux_losses=[{"kind": "z_loss"}]), r"sites\[0\]\.adapter\.pool", "reads router logits"),
    (_site(kind="rank_partition", router={"kind": "static"}, aux_losses=[{"kind": "z_loss"}]),
     r"sites\[0\]\.adapter\.rank_partition", "reads router logits"),
    (_site(kind="residual_tree", aux_losses=[{"kind": "z_loss"}]), r"sites\[0\]\.adapter\.residual_tree",
     "aux loss 'z_loss' is not defined for residual trees"),
    (_site(kind="pool", experts=3, ranks=[1, 2]), r"sites\[0\]\.adapter\.pool",
     "ranks has 2 entries for experts = 3: give one rank per expert"),
    (_site(kind="pool", experts=2, ranks=[1, 2], up="shared"), r"sites\[0\]\.adapter\.pool",
     "ranks \\(one per expert\\) needs per-expert factors"),
    (_site(kind="pool", experts=2, ranks=[1, 2], scaling="alpha_over_active_rank"), r"sites\[0\]\.adapter\.pool",
     "scaling = 'alpha_over_active_rank' is not defined with ranks"),
    (_site(kind="pool", experts=2, ranks=[1, 0]), r"sites\[0\]\.adapter\.pool\.ranks\[1\]", "greater than 0"),
    (_site(kind="pool", shared_expert={"kind": "shared_experts", "count": 0}),
     r"sites\[0\]\.adapter\.pool\.shared_expert\.shared_experts\.count", "greater than 0"),
    (_site(kind="pool", shared_expert={"kind": "lora", "dropout": 0.1}), r"sites\[0\]\.adapter\.pool",
     "shared_expert.dropout = 0.1: a shared expert reads the pool's input; set the pool's dropout"),
    (_site(kind="pool", rank=1, down={"kind": "sparse_random"}, router={"kind": "implicit_topk", "k": 2},
           dropout=0.1), r"sites\[0\]\.adapter\.pool", "an implicit_topk router routes on x A"),
    (_site(kind="residual_tree", levels=[{"scaling": "dora"}]),
     r"sites\[0\]\.adapter\.residual_tree\.levels\[0\]\.scaling", "rslora"),
    ({"sites": [{"target": {"roles": ["q"], "overrides": [{"layers": [0], "rank": 2}]},
                 "adapter": {"kind": "pool", "experts": 2, "ranks": [1, 2]}}]}, r"sites\[0\]",
     "changes experts or rank of a pool with one rank per expert"),
    ({"sites": [{"target": {"roles": ["up"]}, "scope": "ffn_block",
                 "adapter": {"kind": "pool", "experts": 2, "ranks": [1, 2]}}]},
     r"sites\[0\]", "adapter.ranks: one rank per expert is defined for scope 'linear' pools"),
]


@pytest.mark.parametrize("data,path,message", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_option_names_its_path_and_fix(data, path, message):
    with pytest.raises(SpecError) as info:
        mf.AdapterSpec.model_validate(data)
    assert any(re.fullmatch(path, p) for p, _ in info.value.problems), info.value.problems
    assert any(re.search(message, m) for _, m in info.value.problems), info.value.problems


def test_good_options_round_trip_through_json():
    spec = mf.AdapterSpec.model_validate(_site(
        kind="pool", experts=3, ranks=[1, 2, 4], dropout=0.1, capacity_factor=1.25,
        aux_losses=[{"kind": "z_loss", "weight": 0.001}, {"kind": "switch_lb"}],
        shared_expert={"kind": "shared_experts", "count": 2, "rank": 4, "scaling": "rslora"}))
    assert mf.AdapterSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.sites[0].adapter.expert_ranks() == [1, 2, 4]


def test_ffn_block_experts_take_dropout():
    """MixLoRA's lora_dropout: an ``ffn_block`` pool keeps its ``dropout`` through JSON."""
    spec = mf.AdapterSpec.model_validate({"sites": [{"target": {"roles": ["gate", "up", "down"]}, "scope": "ffn_block",
                                                     "adapter": {"kind": "pool", "dropout": 0.05}}]})
    assert mf.AdapterSpec.model_validate_json(spec.model_dump_json()).sites[0].adapter.dropout == 0.05

