"""Frozen base weights that a quantisation library replaced by its own tensors: torchao's
(``quantize_(model, Int8WeightOnlyConfig())``, or transformers' ``TorchAoConfig`` in
``from_pretrained``: an ``Int8Tensor`` in the ``nn.Linear``) and bitsandbytes' (``Params4bit`` in a
``Linear4bit``, ``Int8Params`` in a ``Linear8bitLt``), as QLoRA trains.

A site on such a linear calls the quantised module itself for the frozen ``W x`` and adds the
adapter's update in the adapter's dtype, so nothing here is needed there. Code that reads ``W``
as a matrix (routed FFN blocks, which run the frozen projections themselves; DoRA's column norms;
the merged export) reads :func:`dequantized` instead: ``W`` as the quantised module computes with it,
in floating point."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_quantized", "dequantized", "quantized_modules"]

_LIBRARIES = ("torchao.", "bitsandbytes.")


def is_quantized(weight: torch.Tensor | None) -> bool:
    """Whether ``weight`` is a torchao or bitsandbytes quantised tensor (checked by the class's
    module, so neither library is imported here)."""
    return weight is not None and type(weight).__module__.startswith(_LIBRARIES)


def dequantized(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a plain floating-point tensor of its logical shape (the weight itself
    when it is not quantised). bitsandbytes' 8-bit linear keeps its row scales on the weight until
    its first forward and on ``module.state`` after, hence the module."""
    weight = module.weight
    if not is_quantized(weight):
        return weight
    name = type(weight).__name__
    if name == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if name == "Int8Params":
        scb = weight.SCB if weight.SCB is not None else module.state.SCB
        return weight.data.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) / 127.0)
    return weight.dequantize()


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` whose weight is quantised, by name."""
    return {name: mod for name, mod in model.named_modules() if is_quantized(getattr(mod, "weight", None))}
