"""Gate kinds: how a router turns its scores into gate values. Each carries the facts its
consumers ask instead of testing kinds: ``k`` (experts per token, ``None`` when dense),
``sparse``, ``balances`` (a balancing bias updated from selection counts) and
``input_independent`` (the scores are not read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union, get_args

from .params import ParamRef

__all__ = ["GateKind", "SoftmaxTopK", "DenseSoftmax", "SigmoidTopK", "AbsTopK", "StaticGate", "DenseTrainTopK", "Gate",
           "GATE_KINDS"]


class GateKind:
    """Base of the gate kinds. Facts: ``k`` (experts per token, ``None`` when dense; a field of
    the top-k gates), ``sparse``, ``balances`` (a balancing bias ``balance`` updated from the
    selection counts) and ``input_independent`` (the scores are not read)."""

    __slots__ = ()
    balances: ClassVar[bool] = False
    input_independent: ClassVar[bool] = False

    @property
    def sparse(self) -> bool:
        return self.k is not None  # type: ignore[attr-defined]

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


Gate = Union[SoftmaxTopK, DenseSoftmax, SigmoidTopK, AbsTopK, StaticGate, DenseTrainTopK]

GATE_KINDS: tuple[type, ...] = get_args(Gate)
"""Every gate kind."""
