"""The spec language: pure data (pydantic v2, frozen, ``extra="forbid"``), no torch."""

from .adapters import (
    CorePool,
    ExpertPool,
    Init,
    LoRA,
    PerExpert,
    RankPartition,
    RankTasks,
    ResidualTree,
    Shared,
    SharedExperts,
    SparseRandom,
    TreeLevel,
    TreeRouter,
    lora_scale,
)
from .base import SpecModel
from .kronecker_pool import KroneckerPool, TaskContrastiveLoss
from .mixer import DenseTrainTopKRouter, RSLLoss
from .preserve import PreserveLoss
from .presets import as_spec
from .rank_tasks import with_one_more_task
from .routing import (
    CV2ImportanceLoad,
    DenseRouter,
    ImplicitTopKRouter,
    LocalizedBalance,
    RouterZLoss,
    SigmoidTopKRouter,
    SoftLoadBalance,
    StaticRouter,
    SwitchLoadBalance,
    TopKRouter,
    TopPRouter,
    TsallisEntropy,
)
from .sources import LoRASource
from .spec import ROLES, AdapterSpec, LayerOverride, Site, Target
from .task_routing import TaskEmbeddingRouter, TaskRouter, TaskRoutingLoss
from .xlora import XLoRARouter

__all__ = [
    "AdapterSpec", "as_spec", "Site", "Target", "LayerOverride", "ROLES", "SpecModel", "Init",
    "LoRA", "ExpertPool", "RankPartition", "ResidualTree", "TreeLevel", "TreeRouter",
    "PerExpert", "Shared", "SharedExperts", "SparseRandom", "lora_scale",
    "TopKRouter", "DenseRouter", "SigmoidTopKRouter", "ImplicitTopKRouter", "StaticRouter",
    "SwitchLoadBalance", "CV2ImportanceLoad", "LocalizedBalance", "LoRASource", "RouterZLoss",
    "TaskRouter", "TaskEmbeddingRouter", "TaskRoutingLoss", "DenseTrainTopKRouter", "RSLLoss",
    "TopPRouter", "TsallisEntropy", "SoftLoadBalance", "CorePool", "RankTasks",
    "with_one_more_task", "XLoRARouter", "KroneckerPool", "TaskContrastiveLoss", "PreserveLoss",
]
