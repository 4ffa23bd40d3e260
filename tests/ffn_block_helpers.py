"""Shared by the FFN-block tests: a small routed expert pool, a spec putting it on every FFN
block, and the routed blocks of a model."""

from __future__ import annotations

from torch import nn

import moleforge as mf
from moleforge.backends.torch_fx.block_module import MoleforgeBlock
from moleforge.specs import ExpertPool, SwitchLoadBalance, TopKRouter

__all__ = ["POOL", "block_spec", "routed_blocks"]

POOL = ExpertPool(experts=3, rank=2, alpha=4.0, router=TopKRouter(k=2),
                  aux_losses=[SwitchLoadBalance(weight=0.1)])
"""Three rank-2 experts, top-2 softmax router, Switch load balance."""


def block_spec(init: mf.Init | None = None) -> mf.AdapterSpec:
    """:data:`POOL` as experts around every FFN block (gate, up and down carry LoRAs)."""
    init = init or mf.Init()
    return mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["gate", "up", "down"]), scope="ffn_block",
                                         adapter=POOL, init=init)])


def routed_blocks(model: nn.Module) -> dict[str, MoleforgeBlock]:
    """``{module name: routed block}`` of every FFN block the model now runs as experts."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoleforgeBlock)}
