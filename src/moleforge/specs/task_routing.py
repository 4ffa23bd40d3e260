"""Routing by task: a per-sample task id (the model input ``task_ids``, one integer per batch row,
as the HF Trainer passes an extra column, or the ``task`` field of ``moleforge train``'s JSONL)
that routers read instead of, or besides, the token, and MeteoRA's supervised routing loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from .base import MAX_LOSS_WEIGHT, MIN_TEMPERATURE, SpecModel

__all__ = ["TaskRouter", "TaskEmbeddingRouter", "TaskRoutingLoss"]


class TaskRouter(SpecModel):
    """Hard routing by task: every token of a sample of task ``t`` goes to expert ``t``
    (``g = onehot(t)``); no router parameters. Task ids run over ``[0, experts)``."""

    kind: Literal["task"] = "task"

    @property
    def k(self) -> int:
        """Experts per token: 1."""
        return 1


class TaskEmbeddingRouter(SpecModel):
    """A learned score vector per task, ``e_t ∈ R^E`` (zero at first), added to the token's
    router logits (``reads = "token_and_task"``: ``z = x W_g + e_t``) or alone (``"task"``:
    ``z = e_t``, every token of a sample routed alike); then softmax top-k (``k``) or dense
    softmax (``k = None``) at ``temperature``."""

    kind: Literal["task_embedding"] = "task_embedding"
    tasks: PositiveInt | None = None
    """Number of task ids, ``[0, tasks)`` (``None``: one task per expert)."""
    reads: Literal["token_and_task", "task"] = "token_and_task"
    k: PositiveInt | None = 2
    renormalize: bool = True
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)


class TaskRoutingLoss(SpecModel):
    """MeteoRA's supervised routing loss: ``weight · mean_t CE(softmax(log p_t / τ), task_t)``,
    ``p_t`` the router's softmax probabilities of token t and ``task_t`` its sample's task id (the
    label of expert ``task_t``), over the real tokens. It reads ``task_ids`` from the model call;
    a call without them (inference, generation) has no labels and adds 0 (a training forward
    without them warns once)."""

    kind: Literal["task_routing"] = "task_routing"
    weight: float = Field(0.1, ge=0, le=MAX_LOSS_WEIGHT)
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
