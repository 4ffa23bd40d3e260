"""moleforge: compile declarative Mixture-of-LoRA-Experts specs into fast, trainable
adapters inside HuggingFace models.

    import moleforge as mf
    adapter = mf.compile(mf.presets.load("smore"), model)
    out = model(input_ids, labels=input_ids)   # out.loss includes the aux losses
    mf.save(adapter, "run/adapter")
"""

from . import specs
from .compiler import Plan, compile, count_parameters, explain, plan, structural_flexibility
from .errors import (
    CheckpointError,
    InjectionError,
    IRVerificationError,
    LoweringError,
    MoleforgeError,
    NotMergeableError,
    PassError,
    SpecError,
)
from .integrations.handle import AdapterHandle
from .interop.checkpoint import load, save
from .interop.mixlora import import_mixlora
from .interop.mixlora_export import export_mixlora
from .interop.peft import export_merged, export_peft, from_peft
from .interop.smore_official import import_smore_official
from .specs import (
    AdapterSpec,
    CorePool,
    CV2ImportanceLoad,
    DenseRouter,
    DenseTrainTopKRouter,
    ExpertPool,
    ImplicitTopKRouter,
    Init,
    KroneckerPool,
    LayerOverride,
    LocalizedBalance,
    LoRA,
    PreserveLoss,
    RankPartition,
    RankTasks,
    ResidualTree,
    RouterZLoss,
    RSLLoss,
    Shared,
    SharedExperts,
    SigmoidTopKRouter,
    Site,
    SoftLoadBalance,
    SparseRandom,
    StaticRouter,
    SwitchLoadBalance,
    Target,
    TaskContrastiveLoss,
    TaskEmbeddingRouter,
    TaskRouter,
    TaskRoutingLoss,
    TopKRouter,
    TopPRouter,
    TreeLevel,
    TreeRouter,
    TsallisEntropy,
    XLoRARouter,
    presets,
)

__version__ = "0.1.0"

__all__ = [
    "compile", "plan", "Plan", "explain", "save", "load", "presets", "count_parameters", "structural_flexibility",
    "AdapterHandle",
    "AdapterSpec", "Site", "Target", "LayerOverride", "Init", "LoRA", "ExpertPool", "RankPartition",
    "ResidualTree", "TreeLevel", "TreeRouter", "Shared", "SparseRandom", "TopKRouter", "DenseRouter",
    "SigmoidTopKRouter", "ImplicitTopKRouter", "SwitchLoadBalance", "CV2ImportanceLoad", "LocalizedBalance",
    "RouterZLoss", "SharedExperts",
    "MoleforgeError", "SpecError", "IRVerificationError", "PassError", "LoweringError", "InjectionError",
    "NotMergeableError", "CheckpointError", "specs", "__version__",
    "from_peft", "export_peft", "export_merged", "StaticRouter", "MoleforgeTrainerCallback",
    "import_smore_official", "import_mixlora", "export_mixlora", "TaskRouter", "TaskEmbeddingRouter", "TaskRoutingLoss",
    "DenseTrainTopKRouter", "RSLLoss", "XLoRARouter",
    "TopPRouter", "TsallisEntropy", "SoftLoadBalance", "CorePool", "RankTasks", "KroneckerPool",
    "TaskContrastiveLoss", "MoleforgeTrainer", "PreserveLoss",
]


def __getattr__(name: str):
    # The Trainer callback imports transformers' trainer machinery (seconds): load it on first use.
    if name == "MoleforgeTrainerCallback":
        from .integrations.trainer import MoleforgeTrainerCallback
        return MoleforgeTrainerCallback
    if name == "MoleforgeTrainer":
        from .integrations.resumable_trainer import MoleforgeTrainer
        return MoleforgeTrainer
    raise AttributeError(f"module 'moleforge' has no attribute {name!r}")
