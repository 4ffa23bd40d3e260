"""MoRA-CL's growing pool of rank-1 experts (Lu et al. 2025, arXiv 2506.21035; METHODS.md §11)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from .base import MAX_ALPHA, MIN_TEMPERATURE, SpecModel

__all__ = ["RankTasks", "with_one_more_task"]


class RankTasks(SpecModel):
    """MoRA-CL: rank-1 experts ``(a_j, b_j)``, ``ranks_per_task`` of them per task; the experts of
    every task but the last are frozen (buffers), so training a new task leaves the earlier ones
    as they were. ``handle.add_task()`` adds one task's experts in place.

    Self-activated routing (no router parameters): expert j's relevance comes from its own
    activation ``h_j = a_j · x``, ``w = softmax(|h| / temperature)`` over all ``R = tasks ·
    ranks_per_task`` experts. Training keeps the ``k`` largest ``w`` (the activation budget);
    evaluation keeps every expert with ``w_j >= threshold`` (from none to all R). ``Δy = s ·
    Σ_{j kept} w_j h_j b_j``, ``s = alpha / ranks_per_task``. The normalisation and threshold
    forms are assumed (METHODS.md §11: the official code was not available)."""

    kind: Literal["rank_tasks"] = "rank_tasks"
    ranks_per_task: PositiveInt = 8
    tasks: PositiveInt = 1
    """Tasks the adapter holds (the last one trains)."""
    k: PositiveInt = 4
    """Experts each token uses in training."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    threshold: float = Field(0.1, ge=0, le=1)
    """Evaluation keeps the experts whose score reaches it."""
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """``None``: alpha = ranks_per_task (s = 1)."""

    @model_validator(mode="after")
    def _check(self) -> "RankTasks":
        if self.k > self.ranks_per_task:
            raise ValueError(f"k = {self.k} exceeds ranks_per_task = {self.ranks_per_task}: the first task must "
                             "fill the activation budget; use k <= ranks_per_task")
        return self

    @property
    def experts(self) -> int:
        return self.tasks * self.ranks_per_task


def with_one_more_task(spec):
    """``spec`` (an :class:`~moleforge.specs.AdapterSpec`) with every ``rank_tasks`` site holding
    one more task. Raises ``ValueError`` when it has none."""
    sites = [s.model_copy(update={"adapter": s.adapter.model_copy(update={"tasks": s.adapter.tasks + 1})})
             if isinstance(s.adapter, RankTasks) else s for s in spec.sites]
    if sites == list(spec.sites):
        raise ValueError(f"spec {spec.name!r} has no 'rank_tasks' site: add_task grows MoRA-CL adapters only")
    return spec.model_copy(update={"sites": sites})
