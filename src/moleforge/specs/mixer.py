"""LoRA-Mixer (Li et al. 2025, arXiv 2507.00029): a router that is dense while training and
top-k at inference, and its routing-specialisation loss (RSL)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from .base import MAX_LOSS_WEIGHT, MIN_TEMPERATURE, SpecModel

__all__ = ["DenseTrainTopKRouter", "RSLLoss"]


class DenseTrainTopKRouter(SpecModel):
    """``g = softmax(x W_g / τ)`` over every expert in training; the top-``k`` of it (renormalised
    if asked) in evaluation (LoRA-Mixer's soft training, sparse inference)."""

    kind: Literal["dense_train_topk"] = "dense_train_topk"
    k: PositiveInt = 3
    """Experts per token in evaluation."""
    renormalize: bool = True
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)


class RSLLoss(SpecModel):
    """LoRA-Mixer's RSL, as the paper prints it: ``weight · Σ_i P_i f_i - entropy · mean_t H(p_t)``
    with ``P_i`` expert i's mean router probability, ``f_i`` its share of the top-k selections
    (k of the router; 1 for a dense one) and ``H(p) = -Σ_i p_i log p_i``. With ``entropy > 0``
    (the printed sign) minimising the loss raises the routing entropy; a negative ``entropy``
    sharpens the routing instead (the "peaked routing" the paper describes)."""

    kind: Literal["rsl"] = "rsl"
    weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)
    """α, the weight of the load term."""
    entropy: float = Field(0.0, ge=-MAX_LOSS_WEIGHT, le=MAX_LOSS_WEIGHT)
    """λ of ``- λ · mean_t H(p_t)`` (signed: see above)."""
