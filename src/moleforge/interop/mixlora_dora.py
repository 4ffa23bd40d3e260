"""MixLoRA's ``use_dora`` in the ``mixlora`` package's format, in and out.

The package's ``LoraLinear`` (``mixlora/lora_linear.py``) keeps DoRA's absolute magnitude
``m = magnitude_vector_ (out,)`` of every LoRA (each expert's gate, up and down LoRAs and the
attention LoRAs) and computes ``m / ‖W + s B A‖ ⊙ (base(u) + s B A u)``; moleforge stores the offset
``M = m - ‖W‖`` (``ir/block_nodes.py``, ``specs/pool_magnitude.py``). The tensors are read and written
under the key of that parameter in the ``LoraLinear``'s state dict, beside its ``lora_A.weight``::

    mixlora.layers.{i}.mlp.{proj}.experts.{e}.magnitude_vector_
    mixlora.layers.{i}.self_attn.{proj}.magnitude_vector_

The package's own loader (``LoraLinear.reset_parameters``) reads no magnitude: it sets
``m = ‖W + s B A‖`` from the loaded factors (``c = 1``). A file without magnitude tensors is read
the same way, so its logits are the package's; a file with them (``export_mixlora`` writes them)
keeps its trained magnitudes here, which the package's loader would reset.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["MAGNITUDE_KEY", "package_scale", "row_norms", "magnitude_offsets", "absolute_magnitudes", "block_linear",
           "biased_dora"]

MAGNITUDE_KEY = "magnitude_vector_"
"""The name of ``LoraLinear``'s magnitude parameter, its key below the LoRA's prefix."""


def block_linear(handle, name: str, path: str) -> nn.Module:
    """The linear ``path`` of the FFN block ``name`` as the model holds it (``nn.Linear`` or ``Conv1D``, whose
    class says how ``W`` is stored): the routed block reads its weights in place, and its own submodule
    at ``path`` only holds them."""
    return handle._originals[name].get_submodule(path)


def package_scale(config: dict[str, Any]) -> float:
    """The package's LoRA scale ``s``: ``lora_alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora", False) else r)


def _weight(module: nn.Module) -> torch.Tensor:
    """``W (out, in)`` of a linear (a ``Conv1D`` stores it transposed), float64."""
    w = module.weight.detach().to(torch.float64)
    return w if isinstance(module, nn.Linear) else w.t()


def row_norms(module: nn.Module) -> torch.Tensor:
    """``‖W‖`` per output row of a linear, ``(out,)``, float64."""
    return torch.linalg.vector_norm(_weight(module), dim=1)


def biased_dora(name: str, module: nn.Module) -> list[str]:
    """The problem of an attention LoRA with DoRA on a linear with a non-zero bias: the package scales
    the bias by the DoRA factor, a moleforge LoRA site (PEFT's DoRA) does not, so the logits would differ."""
    bias = getattr(module, "bias", None)
    if bias is None or not bias.detach().any():
        return []
    return [f"{name}: use_dora on a projection with a bias; the mixlora package scales the bias by the DoRA "
            "factor, a LoRA site with magnitude (PEFT's DoRA) does not: import the adapter into a model whose "
            "attention projections have no bias, or one without use_dora"]


def magnitude_offsets(module: nn.Module, a: torch.Tensor, b: torch.Tensor, s: float, keys: Sequence[str],
                      peek: Callable[[str], torch.Tensor | None]) -> torch.Tensor | None:
    """``M = m - ‖W‖`` of the LoRAs ``A (E, r, in)``, ``B (E, out, r)`` on linear ``module``: ``(E, out)``,
    ``m`` expert e's tensor ``peek(keys[e])``, or where the file has none what the package's loader sets,
    ``‖W + s B_e A_e‖``. ``None`` when the factors do not fit ``W`` (the importer's shape check names them).

    Raises:
        CheckpointError: a magnitude of another shape than ``(out,)``, naming its key.
    """
    w = _weight(module)
    out_dim, in_dim = w.shape
    if a.shape[2] != in_dim or b.shape[1] != out_dim:
        return None
    norm = row_norms(module)  # (out,)
    rows = []
    for e, key in enumerate(keys):
        m = peek(key)
        if m is None:
            m = torch.linalg.vector_norm(w + s * (b[e].to(w) @ a[e].to(w)), dim=1)
        elif tuple(m.shape) != (out_dim,):
            raise CheckpointError(f"{key}: shape {tuple(m.shape)}, the magnitude of this model's linear needs "
                                  f"({out_dim},), one per output row")
        rows.append(m.to(torch.float64) - norm)
    return torch.stack(rows).to(a.dtype)


def absolute_magnitudes(module: nn.Module, offsets: torch.Tensor) -> torch.Tensor:
    """The package's ``m = ‖W‖ + M`` of offsets ``M (..., out)`` on linear ``module``, in ``M``'s dtype."""
    return (row_norms(module) + offsets.detach().to(torch.float64)).to(offsets.dtype)
