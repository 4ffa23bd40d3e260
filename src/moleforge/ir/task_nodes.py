"""Router scores from each token's task: the per-sample task id (a model input, ``task_ids``)
reaches the site as the sample type of each token (``samples[1]``, ``(T,)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .kinds import NodeKind, operand
from .params import ParamRef
from .types import TensorType, ValueType

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["TaskScores", "task_labels"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskScores(NodeKind):
    """Scores ``z (T, E)`` of each token from its task ``t ∈ [0, tasks)``:
    ``z = base + table[t]`` with ``base = src`` when ``token_scores`` (the router's token logits)
    and 0 otherwise (``src`` is then the site input, read for ``T`` only); without a ``table``,
    ``z = base + onehot(t, E)`` (hard routing by task: a top-1 gate picks expert ``t``)."""

    id: str
    src: str = operand()
    experts: int
    tasks: int
    table: ParamRef | None = None
    """``(tasks, E)``: one learned score vector per task (task embeddings of the router)."""
    token_scores: bool = False
    origin: str = ""

    def result_type(self, graph: "Graph") -> ValueType:
        return TensorType(self.experts)


def task_labels(samples, bound: int, what: str) -> torch.Tensor:
    """Each token's task id ``(T,)`` from the site's ``samples`` (sample index, sample type),
    checked to lie in ``[0, bound)``.

    Raises:
        InputError: no task ids reached the site, or one is out of range.
    """
    types = None if samples is None else samples[1]
    if types is None:
        raise InputError(f"{what} routes by task but the model was called without task ids: pass "
                         "task_ids=(batch,) integers to the model (the HF Trainer passes a 'task_ids' column with "
                         "remove_unused_columns=False; moleforge train reads the JSONL 'task' field)")
    if types.numel() and (int(types.min()) < 0 or int(types.max()) >= bound):
        raise InputError(f"{what}: task id {int(types.max()) if int(types.max()) >= bound else int(types.min())} "
                         f"is outside [0, {bound}); give ids below {bound} or a spec with more tasks")
    return types.long()
