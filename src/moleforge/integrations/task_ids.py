"""The model input ``task_ids`` (one integer per batch row) of adapters that route by task or
take MeteoRA's supervised routing loss: taken out of the model call (the model itself does not
take it) and handed to the sites as each token's sample type for that call."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from ..errors import InputError
from ..ir import AuxLoss, Graph, TaskContrastive, TaskEmbed, TaskScale, TaskScores
from .inject import AuxCollector

__all__ = ["TaskIds", "reads_task_ids", "task_id_hooks"]

_NOT_SET = object()


def reads_task_ids(graphs: Mapping[str, Graph]) -> bool:
    """Whether a site routes by task, reads task embeddings or factors (EPT) or takes a supervised
    routing loss."""
    return any(isinstance(n, (TaskScores, TaskEmbed, TaskScale, TaskContrastive))
               or (isinstance(n, AuxLoss) and n.kind == "task_routing")
               for g in graphs.values() for n in g.nodes)


def _task_ids(value) -> torch.Tensor:
    ids = torch.as_tensor(value)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 1:
        raise InputError(f"task_ids must be integers of shape (batch,), got {ids.dtype} of shape {tuple(ids.shape)}")
    return ids.reshape(-1).long()


class TaskIds:
    """Moves a call's ``task_ids`` into the collector for the call (``begin`` / ``end``)."""

    def __init__(self, collector: AuxCollector, graphs: Mapping[str, Graph]):
        self.collector = collector
        self.reads = reads_task_ids(graphs)
        self._before: Any = _NOT_SET
        self._warned = False

    def begin(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The call's arguments without ``task_ids`` (``None``: unchanged); warns once when a
        training forward of an adapter that reads them comes without."""
        if "task_ids" not in kwargs:
            if module.training and torch.is_grad_enabled() and self.reads and not self._warned:
                self._warned = True
                warnings.warn("this adapter routes by task or has a supervised routing loss, and the model was "
                              "called in training without task_ids: the routing loss is 0 in this forward; pass "
                              "task_ids=(batch,) (the HF Trainer: a 'task_ids' column with "
                              "remove_unused_columns=False)", stacklevel=4)
            return None
        kwargs = dict(kwargs)
        self._before = self.collector.sample_types
        self.collector.sample_types = _task_ids(kwargs.pop("task_ids"))
        return args, kwargs

    def end(self, module, args, output) -> None:
        """The call is over: its task ids go."""
        if self._before is not _NOT_SET:
            self.collector.sample_types, self._before = self._before, _NOT_SET


def task_id_hooks(model: torch.nn.Module, collector: AuxCollector, graphs: Mapping[str, Graph]) -> list:
    """Forward hooks on ``model`` that take each call's ``task_ids`` to the sites (registered after
    the handle's own, so they run after it in both directions)."""
    tasks = TaskIds(collector, graphs)
    return [model.register_forward_pre_hook(tasks.begin, with_kwargs=True), model.register_forward_hook(tasks.end)]
