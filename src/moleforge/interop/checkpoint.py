"""``save`` / ``load`` of compiled adapters in moleforge's own format (``load`` compiles the saved
spec; ``save`` lives beside the format, so the handle can save without the compiler)."""

from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from ..compiler.compile import compile
from ..errors import CheckpointError, MoleforgeError
from ..integrations.handle import AdapterHandle, dtype_mismatches
from ..passes import Pass
from ..specs import AdapterSpec
from .own_format import read_adapter, save

__all__ = ["save", "load"]


def load(model: nn.Module, directory: str | os.PathLike, *, passes: Sequence[Pass] | None = None) -> AdapterHandle:
    """Compile the saved spec into ``model`` and load the saved tensors.

    Raises:
        CheckpointError: missing or damaged files, or the model does not fit the adapter
            (other modules or shapes); the message lists every mismatch. The model is left
            untouched.
    """
    config, tensors = read_adapter(directory)
    try:
        spec = AdapterSpec.model_validate(config["spec"])
    except (KeyError, MoleforgeError) as e:
        raise CheckpointError(f"{directory}: the saved spec is not valid: {e}") from None
    saved_sites: dict = config.get("sites", {})
    handle = compile(spec, model, passes=passes, read_sources=False)
    problems = _mismatches(handle, saved_sites, tensors)
    if problems:
        handle.remove()
        raise CheckpointError(f"the adapter in {directory} (made for {config.get('base_model')}) does not fit this "
                              f"{type(model).__name__}:\n  - " + "\n  - ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    handle.load_state_dict(tensors)
    return handle


def _mismatches(handle: AdapterHandle, saved_sites: dict, tensors: dict) -> list[str]:
    problems = []
    here = set(handle.modules)
    there = set(saved_sites)
    for name in sorted(there - here):
        problems.append(f"saved site {name!r} has no matching module in this model")
    for name in sorted(here - there):
        problems.append(f"module {name!r} gets the adapter here but has no saved tensors")
    own = handle.state_dict()
    for key, t in own.items():
        if key.split(".")[-1] and key in tensors and tuple(tensors[key].shape) != tuple(t.shape):
            problems.append(f"{key}: saved shape {tuple(tensors[key].shape)}, this model needs {tuple(t.shape)}")
        elif key not in tensors and key.rsplit(".", 1)[0] in there:
            problems.append(f"{key}: missing from the saved tensors")
    return problems + dtype_mismatches(own, tensors)
