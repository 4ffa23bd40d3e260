"""moleforge: compile declarative Mixture-of-LoRA-Experts specs into fast, trainable
adapters inside HuggingFace models.

    import moleforge as mf
    adapter = mf.compile(mf.presets.load("smore"), model)
    out = model(input_ids, labels=input_ids)   # out.loss includes the aux losses
    mf.save(adapter, "run/adapter")
"""

from . import specs
from .compiler import AdapterHandle, compile, count_parameters, explain, load, save, structural_flexibility
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
from .specs import (
    AdapterSpec,
    CV2ImportanceLoad,
    DenseRouter,
    ExpertPool,
    ImplicitTopKRouter,
    Init,
    LayerOverride,
    LocalizedBalance,
    LoRA,
    RankPartition,
    ResidualTree,
    Shared,
    SigmoidTopKRouter,
    Site,
    SparseRandom,
    SwitchLoadBalance,
    Target,
    TopKRouter,
    TreeLevel,
    TreeRouter,
    presets,
)

__version__ = "0.1.0"

__all__ = [
    "compile", "explain", "save", "load", "presets", "count_parameters", "structural_flexibility", "AdapterHandle",
    "AdapterSpec", "Site", "Target", "LayerOverride", "Init", "LoRA", "ExpertPool", "RankPartition",
    "ResidualTree", "TreeLevel", "TreeRouter", "Shared", "SparseRandom", "TopKRouter", "DenseRouter",
    "SigmoidTopKRouter", "ImplicitTopKRouter", "SwitchLoadBalance", "CV2ImportanceLoad", "LocalizedBalance",
    "MoleforgeError", "SpecError", "IRVerificationError", "PassError", "LoweringError", "InjectionError",
    "NotMergeableError", "CheckpointError", "specs", "__version__",
]
