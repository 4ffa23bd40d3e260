"""Gate kinds: how a router turns its scores into gate values. Each carries the facts its
consumers ask instead of testing kinds: ``k`` (experts per token, ``None`` when dense),
``sparse``, ``balances`` (a balancing bias updated from selection counts) and
``input_independent`` (the scores are not read)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union, get_args

from .params import ParamRef

__all__ = ["GateKind", "SoftmaxTopK", "DenseSoftmax", "SigmoidTopK", "AbsTopK", "StaticGate", "TopPTsallis",
           "SelfActivated", "DenseTrainTopK", "XLoRAScale", "Gate", "GATE_KINDS"]


class GateKind:
    """Base of the gate kinds. Facts: ``k`` (experts per token, ``None`` when dense; a field of
    the top-k gates), ``sparse``, ``balances`` (a balancing bias ``balance`` updated from the
    selection counts) and ``input_independent`` (the scores are not read)."""

    __slots__ = ()
    balances: ClassVar[bool] = False
    input_independent: ClassVar[bool] = False
    variable: ClassVar[bool] = False
    """Whether the number of experts per token depends on the token (``k`` is then the least, or
    for a mode-dependent gate the training count)."""
    mode_dependent: ClassVar[bool] = False
    """Whether training and evaluation select differently (the rule takes ``training``)."""

    @property
    def sparse(self) -> bool:
        return self.k is not None  # type: ignore[attr-defined]

    def typical_k(self, experts: int) -> int | None:
        """Experts a token typically uses, for cost models: ``k`` (``None`` when dense)."""
        return self.k  # type: ignore[attr-defined]

    def in_mode(self, training: bool) -> "GateKind":
        """The gate a forward in this mode computes (itself, unless it differs between training
        and evaluation)."""
        return self


@dataclass(frozen=True, slots=True)
class SoftmaxTopK(GateKind):
    """``p = softmax(z/τ)``; keep the k largest p; renormalise them to sum 1 if asked."""

    k: int
    renormalize: bool = True
    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class DenseSoftmax(GateKind):
    """``g = p = softmax(z/τ)``."""

    temperature: float = 1.0

    @property
    def k(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class SigmoidTopK(GateKind):
    """SMoRA: ``u = σ(z) + b``; keep top-k of u; ``g = k · u_kept / Σ u_kept``."""

    k: int
    balance: ParamRef
    balances: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class AbsTopK(GateKind):
    """FlyLoRA: binary mask of the k largest ``|z + d|``; ``g ∈ {0, 1}``."""

    k: int
    balance: ParamRef
    balances: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class StaticGate(GateKind):
    """Input-independent gates: ``g_t = w`` for every token t, ``w (E,)`` a stored tensor; the
    router's scores are not read (its ``src`` only gives the token count). Router probabilities
    (for statistics) are ``|w| / Σ|w|``."""

    weights: ParamRef
    input_independent: ClassVar[bool] = True

    @property
    def k(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class TopPTsallis(GateKind):
    """DynMoLE: ``p = softmax(z)``; per token keep the smallest prefix of the experts sorted by
    ``p`` (descending, ties to the lower index) whose sum reaches ``top_p``, and at least its top
    ``k``; every expert when the normalised Tsallis entropy ``H_q(p)`` exceeds ``threshold``.
    ``g = p`` on the kept experts (no renormalisation), 0 elsewhere. Variable: ``k`` to E experts."""

    k: int
    top_p: float
    q: float
    threshold: float
    variable: ClassVar[bool] = True

    def typical_k(self, experts: int) -> int:
        """``max(k, ⌈top_p · E⌉)``: near-uniform probabilities (a fresh router) keep about
        ``top_p · E`` experts; a sharp router fewer, a broadcast all."""
        return min(experts, max(self.k, math.ceil(self.top_p * experts)))


@dataclass(frozen=True, slots=True)
class SelfActivated(GateKind):
    """MoRA-CL: the scores are the experts' own activations ``h``; ``w = softmax(|h| / τ)``.
    Training keeps the ``k`` largest w; evaluation every expert with ``w >= threshold``. ``g = w``
    on the kept experts (not renormalised), 0 elsewhere."""

    k: int
    temperature: float
    threshold: float
    variable: ClassVar[bool] = True
    mode_dependent: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class DenseTrainTopK(GateKind):
    """LoRA-Mixer: ``g = softmax(z/τ)`` (every expert) in training; in evaluation the top
    ``infer_k`` of it, renormalised if asked (a :class:`SoftmaxTopK`). Dense as a whole
    (``k = None``): lowered forms must hold every expert."""

    infer_k: int
    renormalize: bool = True
    temperature: float = 1.0

    @property
    def k(self) -> None:
        return None

    def in_mode(self, training: bool) -> GateKind:
        if training:
            return DenseSoftmax(temperature=self.temperature)
        return SoftmaxTopK(k=self.infer_k, renormalize=self.renormalize, temperature=self.temperature)


@dataclass(frozen=True, slots=True)
class XLoRAScale(GateKind):
    """X-LoRA (PEFT's ``XLoraLayer.get_maybe_topk_scalings``): the scores are the site's
    scalings ``s (T, E)`` (:class:`~moleforge.ir.xlora_nodes.LayerScalings`). With ``top_k`` keep
    the k largest per token (ties to the lower index), 0 elsewhere; with ``softmax_topk`` replace
    the non-zero kept ones by their softmax (zeros stay 0); ``g = weight · s'``. Probabilities:
    ``s``. Dense as a whole (``k = None``): every expert is computed, as in PEFT."""

    top_k: int | None = None
    softmax_topk: bool = False
    weight: float = 1.0

    @property
    def k(self) -> None:
        return None


Gate = Union[SoftmaxTopK, DenseSoftmax, SigmoidTopK, AbsTopK, StaticGate, TopPTsallis, SelfActivated, DenseTrainTopK,
             XLoRAScale]

GATE_KINDS: tuple[type, ...] = get_args(Gate)
"""Every gate kind."""
