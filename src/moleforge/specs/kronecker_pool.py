"""EPT's Kronecker-product experts over a shared meta-knowledge subspace (Zhang et al. 2026,
arXiv 2603.12577; METHODS.md §15, §20.13), with task embeddings and their contrastive loss."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from .base import MAX_ALPHA, MAX_LOSS_WEIGHT, MIN_TEMPERATURE, SpecModel
from .routing import CV2ImportanceLoad, DenseRouter, RouterZLoss, StaticRouter, SwitchLoadBalance, TopKRouter

__all__ = ["KroneckerPool", "TaskContrastiveLoss", "KroneckerAuxLoss", "KroneckerRouter"]


class TaskContrastiveLoss(SpecModel):
    """EPT's contrastive loss on the task embeddings ``e_j ∈ R^{d_in}`` of a site:
    ``weight · mean_t CE(cos(x_t, e_j) / τ over j, task_t)``, an InfoNCE of each (real) token
    against every task's embedding with its own task as the positive. The paper states
    ``L = L_gen + 0.1 · L_con`` without the form; this is the official code's form (cosine
    similarity at τ = 0.05, cross-entropy against the task id), taken over every token
    instead of the first token of each sequence only. A call without ``task_ids`` adds 0."""

    kind: Literal["task_contrastive"] = "task_contrastive"
    weight: float = Field(0.1, ge=0, le=MAX_LOSS_WEIGHT)
    temperature: float = Field(0.05, ge=MIN_TEMPERATURE)


KroneckerRouter = Annotated[Union[TopKRouter, DenseRouter, StaticRouter], Field(discriminator="kind")]

KroneckerAuxLoss = Annotated[Union[SwitchLoadBalance, CV2ImportanceLoad, RouterZLoss, TaskContrastiveLoss],
                             Field(discriminator="kind")]


class KroneckerPool(SpecModel):
    """EPT: experts ``ΔW_i = (Z^(i) ⊗ K_i)[:d_out, :d_in]`` (``[d_out, d_in]``) from one shared meta-seed.

    With ``h_i = ⌈d_out/s_i⌉`` and ``w_i = ⌈d_in/s_i⌉``, ``B_m (h_max, R)`` and ``A_m (R, w_max)``
    (Gaussian; sized for the smallest kernel) are shared; expert i with kernel ``s_i`` slices
    ``Z^(i) = B_m[:h_i] A_m[:, :w_i]`` and owns ``K_i (s_i × s_i)`` (zero at first, as LoRA's B).
    ``Z^(i) ⊗ K_i`` is ``(h_i·s_i, w_i·s_i)``; where a kernel does not divide a width it is cut to
    ``(d_out, d_in)``, as the official code truncates and pads: the token is zero-padded to
    ``w_i·s_i`` entries and the output cut to ``d_out``, so any width works. With ``X (w_i, s_i)``
    the padded token's rows (``X[b, d] = x[b·s_i + d]``), ``x ΔW_iᵀ = vec(B (A (X K_iᵀ)))[:d_out]``:
    never the d_out × d_in matrix. ``rank(ΔW_i) ≤ R·s_i``: the kernels build a pyramid of ranks.

    ``y = x W + c_t · Σ_i g_i · s · x ΔW_iᵀ`` with ``g = topk(softmax(z / τ))``, ``z = (x + e_t) W_r``
    when ``tasks`` is set (``e_t ∈ R^{d_in}`` the task embedding of the sample's task) and
    ``z = x W_r`` otherwise, ``s`` the scaling of ``alpha`` and ``rank``, and ``c_t`` the task's
    frequency compensation ``d_t / T`` (``task_frequencies``; 1 without). A call without
    ``task_ids`` routes on the token alone, with ``c_t = 1`` and no contrastive loss (a training
    forward without them warns once); ids outside ``[0, tasks)`` are an error. Parameters per
    adapted linear ``R·(⌈d_in/s_min⌉ + ⌈d_out/s_min⌉) + Σ s_i² + E·d_in`` (+ ``tasks·d_in``)."""

    kind: Literal["kronecker_pool"] = "kronecker_pool"
    kernels: list[PositiveInt] = Field([2, 2, 4, 4, 6, 6, 8, 8], min_length=1, max_length=64)
    """Kernel (and stride) ``s_i`` of each expert: one expert per entry."""
    rank: PositiveInt = 8
    """R, the rank of the shared meta-seed ``Z = B_m A_m``."""
    alpha: float | None = Field(None, gt=0, le=MAX_ALPHA)
    """``None``: alpha = rank."""
    scaling: Literal["alpha_over_rank", "rslora"] = "alpha_over_rank"
    router: KroneckerRouter = TopKRouter(k=2, temperature=0.05)
    tasks: PositiveInt | None = None
    """Number of task ids ``[0, tasks)`` with a learned embedding each (``N(0, 1/d_in)`` at first),
    read from the model call's ``task_ids``."""
    task_frequencies: list[Annotated[float, Field(gt=0, le=1e3)]] | None = None
    """``d_t / T`` per task: the factor of task t's adapter output (needs ``tasks`` entries)."""
    aux_losses: list[KroneckerAuxLoss] = []

    @property
    def experts(self) -> int:
        return len(self.kernels)

    @model_validator(mode="after")
    def _check(self) -> "KroneckerPool":
        r = self.router
        if r.k is not None and r.k > self.experts:
            raise ValueError(f"router.k = {r.k} exceeds the {self.experts} experts (one per kernel); "
                             "use k <= len(kernels)")
        if isinstance(r, StaticRouter) and self.tasks is not None:
            raise ValueError("tasks: the task embeddings feed the router logits, and a 'static' router has none; "
                             "use router.kind = 'topk' or 'dense', or remove tasks")
        if self.task_frequencies is not None and len(self.task_frequencies) != (self.tasks or 0):
            raise ValueError(f"task_frequencies has {len(self.task_frequencies)} entries for tasks = {self.tasks}; "
                             "give one d_t/T per task and set tasks")
        for j, aux in enumerate(self.aux_losses):
            self._check_aux(j, aux)
        return self

    def _check_aux(self, j: int, aux) -> None:
        r = self.router
        if isinstance(aux, TaskContrastiveLoss) and self.tasks is None:
            raise ValueError(f"aux_losses[{j}].kind = 'task_contrastive' contrasts the task embeddings: set tasks")
        if isinstance(aux, SwitchLoadBalance) and not isinstance(r, TopKRouter):
            raise ValueError(f"aux_losses[{j}].kind = 'switch_lb' needs router.kind = 'topk'")
        if isinstance(aux, (RouterZLoss, CV2ImportanceLoad)) and isinstance(r, StaticRouter):
            raise ValueError(f"aux_losses[{j}].kind = {aux.kind!r}: a 'static' router has no logits or load; "
                             "remove the loss")
