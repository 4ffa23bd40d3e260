"""The spec language: pure data (pydantic v2, frozen, ``extra="forbid"``), no torch."""

from .adapters import (
    ExpertPool,
    Init,
    LoRA,
    PerExpert,
    RankPartition,
    ResidualTree,
    Shared,
    SharedExperts,
    SparseRandom,
    TreeLevel,
    TreeRouter,
    lora_scale,
)
from .base import SpecModel
from .presets import as_spec
from .routing import (
    CV2ImportanceLoad,
    DenseRouter,
    ImplicitTopKRouter,
    LocalizedBalance,
    RouterZLoss,
    SigmoidTopKRouter,
    StaticRouter,
    SwitchLoadBalance,
    TopKRouter,
)
from .spec import ROLES, AdapterSpec, LayerOverride, Site, Target

__all__ = [
    "AdapterSpec", "as_spec", "Site", "Target", "LayerOverride", "ROLES", "SpecModel", "Init",
    "LoRA", "ExpertPool", "RankPartition", "ResidualTree", "TreeLevel", "TreeRouter",
    "PerExpert", "Shared", "SharedExperts", "SparseRandom", "lora_scale",
    "TopKRouter", "DenseRouter", "SigmoidTopKRouter", "ImplicitTopKRouter", "StaticRouter",
    "SwitchLoadBalance", "CV2ImportanceLoad", "LocalizedBalance", "RouterZLoss",
]
