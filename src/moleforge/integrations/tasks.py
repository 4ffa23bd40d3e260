"""MoRA-CL's continual learning on the handle: ``handle.add_task()`` grows every ``rank_tasks``
site by one task's rank-1 experts, the earlier ones frozen, keeping the handle object."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import InjectionError
from ..specs import with_one_more_task

__all__ = ["ContinualTasks"]


class ContinualTasks:
    """The continual-learning method of :class:`~moleforge.integrations.handle.AdapterHandle`.
    ``_recompile`` is ``moleforge.compile``, which sets it on the handles it makes (this package
    does not import the compiler)."""

    _recompile: Callable[..., Any] | None = None

    def add_task(self) -> None:
        """Add one task to every ``rank_tasks`` site (MoRA-CL): the adapter is compiled again with
        ``tasks + 1`` into the same model, every earlier task's experts copied over and frozen
        (buffers), the new task's trainable (A random, B zero: the model's output is unchanged).
        The handle stays the same object; build a new optimizer over its
        ``trainable_parameters()``. Saving keeps every task.

        Raises:
            InjectionError: the handle was removed, or the spec has no ``rank_tasks`` site.
        """
        handle: Any = self
        if not handle.active or self._recompile is None:
            raise InjectionError("add_task: this adapter was removed (or not made by moleforge.compile); "
                                 "compile the spec again")
        try:
            spec = with_one_more_task(handle.spec)
        except ValueError as e:
            raise InjectionError(f"add_task: {e}") from None
        tensors = handle.state_dict()
        training = handle.model.training
        siblings = bool(handle.plan.sibling_groups)
        model = handle.remove()
        grown = self._recompile(spec, model, passes=handle.plan.pipeline, siblings=siblings,
                                policy=handle.plan.policy)
        grown.load_state_dict(tensors)
        model.train(training)
        for h in grown._hooks:  # the grown handle's state becomes this one's, with hooks bound here
            h.remove()
        vars(self).update(vars(grown))
        handle._hooks = [model.register_forward_pre_hook(handle._pre_hook, with_kwargs=True),
                         model.register_forward_hook(handle._post_hook)]
        if handle._own_save:
            model.save_pretrained = handle._save_pretrained
