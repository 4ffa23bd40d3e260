"""Routers and auxiliary losses of flat expert pools.

Every router maps a token to a gate vector ``g ∈ R^E`` (zero outside the active set); its ``k`` is
the number of experts each token uses (``None`` for the dense and static routers). The aux
losses and the balancing routers' selection counts run over the tokens of a forward; in a padded
batch (the model call's ``attention_mask``) over its real tokens only.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt

from .base import MAX_BIAS_RATE, MAX_LOSS_WEIGHT, MIN_TEMPERATURE, SpecModel
from .mixer import DenseTrainTopKRouter, RSLLoss
from .task_routing import TaskEmbeddingRouter, TaskRouter, TaskRoutingLoss
from .xlora import XLoRARouter

__all__ = [
    "TopKRouter",
    "DenseRouter",
    "SigmoidTopKRouter",
    "ImplicitTopKRouter",
    "StaticRouter",
    "TopPRouter",
    "Router",
    "SwitchLoadBalance",
    "CV2ImportanceLoad",
    "LocalizedBalance",
    "TsallisEntropy",
    "SoftLoadBalance",
    "RouterZLoss",
    "AuxLoss",
    "check_entropy_loss",
]


class TopKRouter(SpecModel):
    """``g = renorm(topk_k(softmax(x W_g / τ)))`` (MoLA, MixLoRA, Mixtral)."""

    kind: Literal["topk"] = "topk"
    k: PositiveInt = 2
    """Number of experts each token uses."""
    renormalize: bool = True
    """Rescale the kept probabilities to sum to 1 (``False``: keep the raw softmax values)."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    """Softmax temperature τ."""
    jitter: float = Field(0.0, ge=0, lt=1)
    """Training-time multiplicative input noise ``x·U(1-ε, 1+ε)`` of the router input (MixLoRA)."""


class DenseRouter(SpecModel):
    """``g = softmax(x W_g / τ)``: every expert active (HydraLoRA, LoRAMoE)."""

    kind: Literal["dense"] = "dense"
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)

    @property
    def k(self) -> None:
        """Experts per token: ``None``, every expert."""
        return None


class SigmoidTopKRouter(SpecModel):
    """SMoRA: ``u = sigmoid(x W_g)``; keep the top-k of ``u + b`` (``b`` a non-trainable
    balancing bias); gates are the kept ``u + b`` renormalised to sum to 1, times k.
    After each optimizer step ``b_j += rate · sign(mean(c) - c_j)`` with ``c_j`` the
    number of tokens that selected expert j since the last update."""

    kind: Literal["sigmoid_topk"] = "sigmoid_topk"
    k: PositiveInt = 8
    bias_update_rate: float = Field(1e-5, ge=0, le=MAX_BIAS_RATE)


class ImplicitTopKRouter(SpecModel):
    """FlyLoRA: the pool's frozen down-projection is the router. ``h = x A``; a binary mask
    keeps the k ranks with the largest ``|h + d|`` (``d`` a non-trainable balancing bias,
    updated like SMoRA's). No router parameters. Needs a rank-1 pool."""

    kind: Literal["implicit_topk"] = "implicit_topk"
    k: PositiveInt = 8
    bias_update_rate: float = Field(1e-3, ge=0, le=MAX_BIAS_RATE)


class StaticRouter(SpecModel):
    """Learned input-independent weights: ``g = w`` for every token, ``w ∈ R^E`` one vector per
    adapted module, starting at 1 (the sum of the experts). CAT / LoRA Soups' per-layer
    concatenation weights; X-LoRA with frozen scalings. A pool with a static router is a
    fixed low-rank update, so it merges into the base weights and exports as one PEFT LoRA
    of rank ``E·r``."""

    kind: Literal["static"] = "static"
    trainable: bool = True
    """``False`` keeps the weights fixed (a buffer), e.g. a fixed sum of imported adapters."""
    start: Literal["sum", "mean"] = "sum"
    """The weights' starting value: ``sum`` 1 (the sum of the experts), ``mean`` ``1/E`` (their
    average, a uniform soup: composing task LoRAs trained apart, the sum overshoots)."""

    @property
    def k(self) -> None:
        """Experts per token: ``None``, every expert."""
        return None


class TopPRouter(SpecModel):
    """DynMoLE's hybrid router (Li et al. 2025, arXiv 2504.00661). ``p = softmax(x W_g)``; a token
    keeps the smallest set of its most probable experts whose probabilities sum to at least
    ``p`` (top-p), united with its ``k`` most probable (top-k); when the normalised Tsallis
    entropy ``H_q(p) = (1 - Σ_i p_i^q) / (1 - E^{1-q})`` (Shannon's ``-Σ p_i ln p_i / ln E`` at
    ``q = 1``) exceeds ``entropy_threshold`` it uses every expert. Gates are the kept
    probabilities, not renormalised. The number of experts per token varies from ``k`` to E;
    sparse pools run exactly the kept ones.

    The official code (mikecovlee/DynMoLE) keeps the prefix whose cumulative probability stays
    at or below ``p``; here the prefix reaches ``p`` (the usual nucleus rule), which keeps one more
    expert where the two differ."""

    kind: Literal["top_p"] = "top_p"
    p: float = Field(0.75, gt=0, le=1)
    """Probability mass the kept experts reach."""
    k: PositiveInt = 2
    """The least number of experts a token uses (the official ``keep_top_k``)."""
    entropy_index: float = Field(1.1, gt=0, le=10)
    """Tsallis index q (1: Shannon entropy)."""
    entropy_threshold: float = Field(0.9, ge=0, le=1)
    """A token whose normalised entropy exceeds it uses every expert (1: never)."""


Router = Annotated[
    Union[TopKRouter, DenseRouter, SigmoidTopKRouter, ImplicitTopKRouter, StaticRouter, TopPRouter, TaskRouter,
          TaskEmbeddingRouter, DenseTrainTopKRouter, XLoRARouter],
    Field(discriminator="kind"),
]


class SwitchLoadBalance(SpecModel):
    """Switch/Mixtral load balance ``weight · E · Σ_i f_i P_i``; ``f_i`` the fraction of
    (token, slot) assignments to expert i (sums to k), ``P_i`` the mean router probability."""

    kind: Literal["switch_lb"] = "switch_lb"
    weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)


class CV2ImportanceLoad(SpecModel):
    """Shazeer's ``weight · (CV²(importance) + CV²(load))``: importance = summed gate values,
    load = number of tokens with a non-zero gate, ``CV²(v) = Var(v) / (Mean(v)² + 1e-10)``
    with the unbiased variance."""

    kind: Literal["cv2_importance_load"] = "cv2_importance_load"
    weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)


class LocalizedBalance(SpecModel):
    """LoRAMoE's localized balancing constraint ``weight · CV²(vec(I ⊙ Q))``.

    ``Q[m, i]`` sums expert i's router probability over the tokens of sample m, for every
    sample (batch row) that holds a token (a real one, in a padded batch); experts
    are split into ``groups`` consecutive groups, and ``I[m, i] = 1 + delta`` when expert
    i's group equals sample m's type label (set with ``handle.sample_types(...)``),
    ``1 - delta`` otherwise. Without type labels every ``I`` is 1."""

    kind: Literal["localized_balance"] = "localized_balance"
    weight: float = Field(0.1, ge=0, le=MAX_LOSS_WEIGHT)
    delta: float = Field(0.1, ge=0, lt=1)
    groups: PositiveInt = 2


class TsallisEntropy(SpecModel):
    """DynMoLE's entropy loss ``weight · mean_t H_q(p_t)``: the mean over tokens of the normalised
    Tsallis entropy of the router probabilities, with the ``top_p`` router's ``entropy_index``
    (it needs that router). Lowering it sharpens the routing."""

    kind: Literal["tsallis_entropy"] = "tsallis_entropy"
    weight: float = Field(0.01, ge=0, le=MAX_LOSS_WEIGHT)


class SoftLoadBalance(SpecModel):
    """DynMoLE's load balance with soft counts ``weight · E · Σ_i f̃_i P_i``: ``f̃_i`` the mean of
    expert i's gate values over the tokens (the kept probabilities, zero where not kept),
    ``P_i`` its mean router probability."""

    kind: Literal["soft_lb"] = "soft_lb"
    weight: float = Field(0.001, ge=0, le=MAX_LOSS_WEIGHT)


class RouterZLoss(SpecModel):
    """ST-MoE's router z-loss ``weight · mean_t (log Σ_i exp z_ti)²`` on the router logits
    ``z = x W_g`` (before the temperature): keeps the logits small. Needs a router with logits
    (``topk``, ``dense``, ``sigmoid_topk``)."""

    kind: Literal["z_loss"] = "z_loss"
    weight: float = Field(1e-3, ge=0, le=MAX_LOSS_WEIGHT)


AuxLoss = Annotated[
    Union[SwitchLoadBalance, CV2ImportanceLoad, LocalizedBalance, TsallisEntropy, SoftLoadBalance, TaskRoutingLoss,
          RSLLoss, RouterZLoss],
    Field(discriminator="kind"),
]


def check_entropy_loss(router, aux_losses: list) -> None:
    """``tsallis_entropy`` takes its index q from the ``top_p`` router: it needs that router."""
    for j, aux in enumerate(aux_losses):
        if isinstance(aux, TsallisEntropy) and not isinstance(router, TopPRouter):
            raise ValueError(f"aux_losses[{j}].kind = 'tsallis_entropy' reads the entropy index of a 'top_p' router, "
                             f"got router.kind = {router.kind!r}: set router.kind = 'top_p' or remove the loss")
