"""Runtime op of LoRA-Mixer's ``L_preserve`` (``ir/preserve_nodes.py``); agrees with the
interpreter's rule in ``ir/interpret.py``."""

from __future__ import annotations

from torch import Tensor

from .ops_decode import aux_wanted

__all__ = ["preserve_loss"]


def preserve_loss(current: tuple[Tensor, ...], start: tuple[Tensor, ...], weight: float, training: bool = False,
                  eval_aux: bool = True) -> Tensor | None:
    """``weight · Σ_j ‖current_j − start_j‖²``; ``None`` in evaluation mode without autograd unless
    ``eval_aux`` (as every aux loss)."""
    if not aux_wanted(training, eval_aux):
        return None
    return weight * sum((c - s).square().sum() for c, s in zip(current, start))
