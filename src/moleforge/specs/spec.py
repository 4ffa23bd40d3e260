"""The top of the spec language: where adapters go (targets, layers, per-layer
overrides) and the ``AdapterSpec`` a user writes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from .adapters import Adapter, ExpertPool, Init, LoRA, PerExpert, ResidualTree
from .base import MAX_LOSS_WEIGHT, SpecModel
from .routing import ImplicitTopKRouter, TopPRouter
from .sources import check_site_sources
from .xlora import check_xlora_sites

__all__ = ["Role", "ROLES", "LayerOverride", "Target", "Site", "AdapterSpec"]

Role = Literal["q", "k", "v", "o", "gate", "up", "down"]
"""Projections by their role, resolved on each model from its module structure:
attention query/key/value/output, FFN gate/up/down. On GPT-2, q, k and v all name the
fused ``c_attn``."""

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_FFN_ROLES = ("gate", "up", "down")


class LayerOverride(SpecModel):
    """Changes the adapter on a slice of the model's depth (MoLA's experts per layer).

    ``depth`` is a half-open fraction ``[start, end)`` of the layers (``[0.75, 1.0]`` is the
    top quarter); ``layers`` lists layer indices. Give exactly one."""

    depth: tuple[float, float] | None = None
    layers: list[NonNegativeInt] | None = None
    experts: PositiveInt | None = None
    rank: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> "LayerOverride":
        if (self.depth is None) == (self.layers is None):
            raise ValueError("give exactly one of depth (a fraction range) or layers (indices)")
        if self.depth is not None:
            lo, hi = self.depth
            if not (0.0 <= lo < hi <= 1.0):
                raise ValueError(f"depth = {self.depth} must satisfy 0 <= start < end <= 1")
        if self.experts is None and self.rank is None:
            raise ValueError("an override must change experts or rank")
        return self

    def covers(self, layer: int, num_layers: int) -> bool:
        if self.layers is not None:
            return layer in self.layers
        lo, hi = self.depth  # type: ignore[misc]
        pos = layer / num_layers
        return lo <= pos < hi or (hi == 1.0 and layer == num_layers - 1)


class Target(SpecModel):
    """Which linears of the model get the adapter: by ``roles`` and/or by ``modules``
    (regular expressions matched against the full module name), limited to ``layers``
    (``None``: every layer)."""

    roles: list[Role] = []
    modules: list[str] = []
    layers: list[NonNegativeInt] | None = None
    overrides: list[LayerOverride] = []

    @field_validator("modules")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"module pattern {pat!r} is not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "Target":
        if not self.roles and not self.modules:
            raise ValueError("name at least one role (q, k, v, o, gate, up, down) or module pattern")
        return self


class Site(SpecModel):
    """One adapter kind placed on a set of targets."""

    target: Target
    scope: Literal["linear", "ffn_block"] = "linear"
    adapter: Adapter = Field(default_factory=LoRA)
    init: Init = Init()

    @model_validator(mode="after")
    def _check(self) -> "Site":
        a = self.adapter
        for i, ov in enumerate(self.target.overrides):
            if ov.experts is not None and not isinstance(a, ExpertPool):
                raise ValueError(f"target.overrides[{i}].experts needs an adapter of kind 'pool' "
                                 f"(got {a.kind!r})")
            if ov.rank is not None and isinstance(a, ResidualTree):
                raise ValueError(f"target.overrides[{i}].rank: set ranks per level for residual trees")
            if ov.rank not in (None, 1) and isinstance(getattr(a, "router", None), ImplicitTopKRouter):
                raise ValueError(f"target.overrides[{i}].rank = {ov.rank}: an implicit_topk router routes single "
                                 "ranks; remove the override's rank or set it to 1")
            if isinstance(a, ExpertPool) and a.ranks is not None:
                raise ValueError(f"target.overrides[{i}] changes experts or rank of a pool with one rank per "
                                 "expert (ranks); give the ranks in a second site for those layers instead")
            if isinstance(a, ExpertPool) and ov.experts is not None:
                k = a.router.k
                if k is not None and k > ov.experts:
                    raise ValueError(f"target.overrides[{i}].experts = {ov.experts} is below router.k = {k}")
        if self.scope == "ffn_block":
            self._check_block_scope()
        check_site_sources(self)
        return self

    def _check_block_scope(self) -> None:
        """``ffn_block``: a pool of experts with their own A and B, over the FFN linears only."""
        a = self.adapter
        if not isinstance(a, ExpertPool):
            raise ValueError(f"adapter.kind = {a.kind!r}: scope 'ffn_block' routes whole FFN blocks and needs an "
                             "adapter of kind 'pool'; a plain LoRA on every FFN linear is scope 'linear'")
        if not isinstance(a.down, PerExpert) or a.up != "per_expert" or a.shared_expert is not None:
            raise ValueError("adapter: FFN-block experts have their own A and B on each linear (down.kind = "
                             "'per_expert', up = 'per_expert', no shared_expert); shared factors and shared experts "
                             "are not defined for scope 'ffn_block'")
        if isinstance(a.router, TopPRouter):
            raise ValueError("adapter.router.kind = 'top_p': FFN-block experts take a fixed number of experts per "
                             "token (topk, dense, sigmoid_topk, static); use scope 'linear' for DynMoLE's top-p "
                             "routing (per adapted linear, as the dynmole preset does)")
        if a.ranks is not None:
            raise ValueError("adapter.ranks: one rank per expert is defined for scope 'linear' pools; FFN-block "
                             "experts share one rank (their dropout and magnitude, MixLoRA's lora_dropout and "
                             "use_dora, are fine): remove ranks or use scope 'linear'")
        attention = [r for r in self.target.roles if r not in _FFN_ROLES]
        if attention:
            raise ValueError(f"target.roles {attention}: scope 'ffn_block' routes FFN blocks, whose linears are "
                             f"gate, up and down; adapt {', '.join(attention)} with a second site of scope "
                             "'linear' (as the mixlora preset does)")


class AdapterSpec(SpecModel):
    """A whole adapter: one or more sites. Round-trips through JSON.

    Example::

        AdapterSpec(sites=[Site(target=Target(roles=["gate", "up", "down"]),
                                adapter=ResidualTree())])
    """

    name: str = "adapter"
    description: str = ""
    sites: list[Site] = Field(min_length=1)
    aux_loss_coef: float = Field(1.0, ge=0, le=MAX_LOSS_WEIGHT)
    """Multiplies the sum of the sites' (already weighted) aux losses added to ``outputs.loss``."""

    @model_validator(mode="after")
    def _check(self) -> "AdapterSpec":
        check_xlora_sites(self.sites)
        return self

    def with_init(self, init: Init) -> "AdapterSpec":
        """The same spec with every site's initialisation replaced (tests use ``up='normal'``)."""
        return self.model_copy(update={"sites": [s.model_copy(update={"init": init}) for s in self.sites]})
