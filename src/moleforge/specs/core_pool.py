"""CoMoL's core-space experts (Cao et al. 2026, arXiv 2603.00573; METHODS.md §9, §20.4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from .base import MAX_ALPHA, SpecModel
from .routing import AuxLoss, DenseRouter, Router, SwitchLoadBalance, TopKRouter, check_entropy_loss

__all__ = ["CorePool"]


class CorePool(SpecModel):
    """CoMoL: E experts that share one down-projection A (r × d_in) and one up-projection B
    (d_out × r) and differ by an r × r core ``M_i``: expert i is the LoRA ``s · B M_i A``. The
    router reads the token in the core space, ``h = A x`` (``z = W_g h``, ``W_g`` E × r), and the
    experts' mixture is computed as one soft-merged core per token:

        Δy = Σ_i g_i s B M_i h = s B (Σ_i g_i M_i) h

    (the ``merge_cores`` pass proves the two forms equal). Parameters per adapted linear
    ``r·(d_in + d_out) + E·r² + E·r``. Cores start random (U(±1/√r)), B at zero."""

    kind: Literal["core_pool"] = "core_pool"
    experts: PositiveInt = 8
    rank: PositiveInt = 8
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """``None``: alpha = rank."""
    scaling: Literal["alpha_over_rank", "rslora"] = "alpha_over_rank"
    router: Router = DenseRouter()
    """Softmax over the core-space logits: ``dense`` (CoMoL's soft merge) or ``topk``."""
    aux_losses: list[AuxLoss] = []

    @model_validator(mode="after")
    def _check(self) -> "CorePool":
        r = self.router
        if not isinstance(r, (DenseRouter, TopKRouter)):
            raise ValueError(f"router.kind = {r.kind!r}: core-space experts take a softmax router on A x "
                             "(router.kind = 'dense', CoMoL's soft merge, or 'topk')")
        if r.k is not None and r.k > self.experts:
            raise ValueError(f"router.k = {r.k} exceeds experts = {self.experts}; use k <= experts or a dense router")
        for j, aux in enumerate(self.aux_losses):
            if isinstance(aux, SwitchLoadBalance) and not isinstance(r, TopKRouter):
                raise ValueError(f"aux_losses[{j}].kind = 'switch_lb' needs router.kind = 'topk'; use "
                                 "cv2_importance_load or soft_lb with a dense router")
        check_entropy_loss(r, self.aux_losses)
        return self
