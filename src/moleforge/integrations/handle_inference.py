"""What an adapter handle controls about forwards without autograd (generation, evaluation)."""

from __future__ import annotations

from typing import Mapping

from torch import nn

__all__ = ["InferenceControls"]


class InferenceControls:
    """A mixin of :class:`~moleforge.integrations.handle.AdapterHandle` (it holds ``modules``)."""

    modules: Mapping[str, nn.Module]

    def eval_aux(self, on: bool = True) -> None:
        """Compute the aux losses in evaluation mode without autograd too (``out.aux_loss`` of
        an evaluation under ``torch.no_grad()``). Off by default: generation and evaluation run
        no balancing statistics, which nothing differentiates there; training mode and forwards
        with autograd always compute them."""
        for mod in self.modules.values():
            mod.site.eval_aux = bool(on)

    @property
    def eval_aux_on(self) -> bool:
        """Whether :meth:`eval_aux` asked for aux losses in evaluation mode without autograd."""
        return any(getattr(mod.site, "eval_aux", False) for mod in self.modules.values())
