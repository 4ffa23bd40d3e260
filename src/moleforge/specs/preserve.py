"""LoRA-Mixer's ``L_preserve`` (Li et al. 2025, METHODS.md §12): keep the experts that train on
from PEFT LoRA folders near the folders' values.

``L_preserve = weight · Σ_{i ∈ C} (‖A_i − A_i⁰‖² + ‖B_i − B_i⁰‖²)`` (squared Frobenius norms), ``C``
the trainable experts of the pool's ``experts_from``, ``θ⁰`` their folders' factors as the pool
stores them (zero-padded to the pool's rank; a folder's scale folded into ``B`` where the pool
folds it). The starting values are kept beside the experts as buffers (``A_start`` or
``A_<start>_<stop>_start``) and saved with the adapter, so a loaded adapter keeps its anchor.
Like every aux loss it is added to the model's loss times ``aux_loss_coef``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import Field

from .base import MAX_LOSS_WEIGHT, SpecModel
from .routing import AuxLoss

__all__ = ["PreserveLoss", "PoolAuxLoss", "check_preserve"]


class PreserveLoss(SpecModel):
    """LoRA-Mixer's ``L_preserve``: ``weight · Σ_i ‖θ_i − θ_i⁰‖²`` over the trainable experts read
    from ``experts_from`` folders, ``θ⁰`` the folders' values (their A and B)."""

    kind: Literal["preserve"] = "preserve"
    weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)


PoolAuxLoss = Annotated[Union[(*get_args(get_args(AuxLoss)[0]), PreserveLoss)],  # type: ignore[valid-type]
                        Field(discriminator="kind")]
"""The aux losses of an expert pool: those of every router, and ``preserve``."""


def check_preserve(pool) -> None:
    """``preserve`` anchors trainable experts read from PEFT LoRA folders: the pool needs some."""
    found = [j for j, aux in enumerate(pool.aux_losses) if isinstance(aux, PreserveLoss)]
    if len(found) > 1:
        raise ValueError(f"aux_losses{found}: one 'preserve' loss per pool anchors its trainable experts; "
                         "keep one (its weight sets the strength)")
    for j, aux in enumerate(pool.aux_losses):
        if isinstance(aux, PreserveLoss) and not any(s.trainable for s in pool.experts_from):
            raise ValueError(f"aux_losses[{j}].kind = 'preserve' keeps experts that train on from PEFT LoRA folders "
                             "near the folders' values; this pool has none (experts_from with trainable = true): "
                             "set trainable on some experts_from folders or remove the loss")
