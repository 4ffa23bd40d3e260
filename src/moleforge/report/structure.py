"""Structural flexibility Γ (METHODS.md §1.7): how many distinct structures the function of one
adapted linear can take for one token, over every routing choice.

Γ counts the paper's way: the router is ideal (it can pick any allowed children) and its gates
are binary masks, so two routings count as one structure when they give the same function of the
experts' parameters. What "the same" means depends on what the propagation can tell apart:

- A flat top-k pool: the set of active experts, ``C(E, k)``; a dense or static router (and a
  plain LoRA): 1. Always-on shared experts add no choice; experts of their own ranks (FlexMoRE)
  are still told apart by their set. With expert capacity a token may lose any of its k experts,
  so every set of at most k experts is reachable: ``Σ_{i=0}^{k} C(E, i)``.
- An S'MoRE tree with a nonlinear activation on the whole message (``activation_position =
  "all"``; node ``Σ_p σ(u_{e_p} + W h_child(p))``): every child keeps its expert paired with its
  own subtree, and σ keeps the pairs apart, so a structure is a whole tree up to the order of
  siblings. A node of level l+1 picks a set of ``f_l`` experts and, for each, one of the ``Γ_l``
  subtrees below it: ``Γ_{l+1} = C(s_l, f_l) · Γ_l^{f_l}``, i.e. Theorem 3.4,
  ``Γ = Π_l C(s_l, f_l)^{F_{l+1}}``, ``F_{l+1} = Π_{j>l} f_j`` the nodes choosing from pool l.
- ``activation_position = "child_v2"`` (S'MoRE*, node ``Σ_p w_p (u_{e_p} + W σ(h_child(p)))``)
  and ``"child"`` (``Σ_p (w_p u_{e_p} + W σ(h_child(p)))``): with binary gates both nodes are
  ``Σ_p u_{e_p} + W Σ_p σ(h_child(p))``, the same function, so they count the same. The sums
  forget which expert sits above which subtree: a node is a set of ``f_l`` experts and a
  *multiset* of ``f_l`` subtrees (the children may repeat a subtree), Corollary 3.5:
  ``Γ_{l+1} = C(s_l, f_l) · C(Γ_l + f_l − 1, f_l)``, ``Γ_0 = 1`` (leaves: ``Σ_p u``, a set).
- ``activation = "identity"`` (any position): the tree is linear in the residuals and collapses
  to a flat mixture of all pools' experts under the path-aggregated gates (METHODS.md §20.6);
  as for any flat mixture, a structure is the set of active experts, per pool the union of the
  children sets of the ``F_{l+1}`` nodes above it: any ``i`` experts, ``f_l ≤ i ≤ min(F_l,
  s_l)``. How often an expert is reached only changes its (continuous) aggregated gate. That is
  the bound of Theorem 3.3 (MoMOR), which these unions attain:
  ``Γ = Π_l Σ_{i=f_l}^{min(F_l, s_l)} C(s_l, i)``.

For the ``smore`` preset's shape (2 levels of 4 experts, fanout 2-2): 216 (``all``), 126
(``child``, ``child_v2``), 66 (identity). The dense gate (fanout = experts) gives 1 in every case.

Γ grows fast (``C(10^9, 10^6)`` has millions of digits): it is computed exactly, as an ``int``,
up to ``10^EXACT_DIGITS``; above that it is a :class:`GammaEstimate` from ``math.lgamma``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..specs import (
    CorePool,
    ExpertPool,
    KroneckerPool,
    LoRA,
    RankPartition,
    RankTasks,
    ResidualTree,
    TopPRouter,
    as_spec,
)

__all__ = ["EXACT_DIGITS", "GammaEstimate", "format_gamma", "pool_gamma", "variable_pool_gamma", "tree_gamma",
           "tree_gamma_text",
           "adapter_gamma", "structural_flexibility"]

EXACT_DIGITS = 300
"""Γ up to ``10^EXACT_DIGITS`` is an exact ``int``; above, a :class:`GammaEstimate`."""

_LN10 = math.log(10)
_EXACT_LN = EXACT_DIGITS * _LN10
_FLOAT_LN = math.log(2.0) * 1024 - 1e-6  # e^x overflows a float past this


class GammaEstimate(float):
    """A Γ too large to compute exactly (above ``10^EXACT_DIGITS``): ``ln`` is its natural log
    (from ``math.lgamma``); as a float it is ``e^ln`` (``math.inf`` past the float range).
    Prints as ``≈ 1.23 × 10^6226614``, whatever the format spec."""

    ln: float

    def __new__(cls, ln: float) -> "GammaEstimate":
        self = super().__new__(cls, math.exp(ln) if ln < _FLOAT_LN else math.inf)
        self.ln = float(ln)
        return self

    def __getnewargs__(self) -> tuple[float]:  # type: ignore[override]
        return (self.ln,)

    @property
    def log10(self) -> float:
        return self.ln / _LN10

    def __str__(self) -> str:
        if math.isinf(self.ln):
            return "> 10^(10^308)"
        if self.log10 >= 1e15:  # the mantissa is lost in the exponent's rounding
            return f"≈ 10^{self.log10:.6g}"
        exponent = math.floor(self.log10)
        mantissa = 10 ** (self.log10 - exponent)
        if mantissa >= 9.995:  # rounds up to 10.00
            mantissa, exponent = 1.0, exponent + 1
        return f"≈ {mantissa:.2f} × 10^{exponent}"

    def __repr__(self) -> str:
        return f"GammaEstimate(ln={self.ln!r})"

    def __format__(self, spec: str) -> str:
        return str(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GammaEstimate):
            return self.ln == other.ln
        return False if isinstance(other, int) and not isinstance(other, bool) else float.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(("GammaEstimate", self.ln))


def format_gamma(value: int | float) -> str:
    """``216`` → ``"216"``, ``279936`` → ``"279,936"``, an estimate → ``"≈ 1.23 × 10^6226614"``."""
    if isinstance(value, GammaEstimate):
        return str(value)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value):,}"


# ---- logarithms of the counts ----------------------------------------------------------------

def _ln_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _times(count: int, x: float) -> float:
    """``count · x`` for a count that may not fit a float."""
    if x == 0:
        return 0.0
    try:
        return float(count) * x
    except OverflowError:
        return math.inf


def _ln_multichoose(ln_g: float, f: int) -> float:
    """``ln C(G + f − 1, f)`` (multisets of ``f`` out of ``G`` kinds) from ``ln G``."""
    if ln_g > math.log(1e8 * f):  # G ≫ f: G^f / f! (1 + f(f−1)/2G + …); also for G past the float range
        return f * ln_g - math.lgamma(f + 1) + f * (f - 1) / 2 * math.exp(-ln_g)
    g = math.exp(ln_g)
    return math.lgamma(g + f) - math.lgamma(g) - math.lgamma(f + 1)


def _ln_binom_sum(s: int, a: int, b: int) -> float:
    """``ln Σ_{i=a}^{b} C(s, i)`` in O(a few thousand) steps for any ``s``.

    ``ln C(s, i)`` is concave in ``i`` with its top at ``s // 2``: walk out from the largest term
    on both sides, in blocks over which the log-term is linear to within ``1e-4`` (width
    ``0.01 / sqrt(curvature)``; each block a geometric sum), until the terms fall ``e^80`` below
    the largest."""
    top = min(max(s // 2, a), b)
    ln_top = _ln_comb(s, top)
    total = 0.0
    for step in (1, -1):
        i = top if step == 1 else top - 1
        while a <= i <= b:
            rel = _ln_comb(s, i) - ln_top
            if rel < -80:
                break
            curvature = 1 / (i + 1) + 1 / (s - i + 1)
            m = min(max(1, int(0.01 / math.sqrt(curvature))), b - i + 1 if step == 1 else i - a + 1)
            block = 1.0
            if m > 1:  # then 0 < i < s
                slope = math.log((s - i) / (i + 1)) if step == 1 else math.log(i / (s - i + 1))
                block = m if abs(slope) < 1e-15 else math.expm1(m * slope) / math.expm1(slope)
            total += math.exp(rel) * block
            i += step * m
    return ln_top + math.log(total)


def _result(ln: float, exact: Callable[[], int]) -> int | GammaEstimate:
    return exact() if ln <= _EXACT_LN else GammaEstimate(ln)


# ---- Γ per adapter kind ------------------------------------------------------------------------

def pool_gamma(experts: int, k: int | None) -> int | GammaEstimate:
    """A flat pool: ``C(E, k)`` expert sets for top-k routing; 1 for a dense or static router (``k=None``)."""
    if k is None:
        return 1
    return _result(_ln_comb(experts, k), lambda: math.comb(experts, k))


def variable_pool_gamma(experts: int, k: int) -> int | GammaEstimate:
    """A flat pool whose tokens use from ``k`` to all E experts (DynMoLE's top-p ∪ top-k with
    entropy broadcast: every set of at least k experts is the kept prefix of some ordering):
    ``Σ_{j=k}^{E} C(E, j)`` expert sets."""
    return _result(_ln_binom_sum(experts, k, experts),
                   lambda: sum(math.comb(experts, j) for j in range(k, experts + 1)))


def capacity_pool_gamma(experts: int, k: int) -> int | GammaEstimate:
    """A top-k pool with expert capacity: every set of at most ``k`` experts, ``Σ_{i=0}^{k} C(E, i)``."""
    return _result(_ln_binom_sum(experts, 0, k), lambda: sum(math.comb(experts, i) for i in range(k + 1)))


def _parents(fanouts: Sequence[int]) -> list[int]:
    """``F_{l+1} = Π_{j>l} f_j``: the tree nodes that choose children from pool l."""
    out, F = [0] * len(fanouts), 1
    for l in reversed(range(len(fanouts))):
        out[l] = F
        F *= fanouts[l]
    return out


def _kind(activation: str, position: str) -> str:
    if activation == "identity":
        return "flat"
    if position in ("child", "child_v2"):
        return "multiset"
    if position == "all":
        return "tree"
    raise ValueError(f"unknown activation_position {position!r}")


def tree_gamma(levels: Sequence[tuple[int, int]], activation: str = "tanh",
               position: str = "all") -> int | GammaEstimate:
    """Γ of an S'MoRE tree with pools ``levels = [(s_l, f_l), …]`` (leaves first; ``f_l = s_l``
    for the dense gate); see the module docstring for each case's formula and why.

    - ``activation = "identity"`` (any position): ``Π_l Σ_{i=f_l}^{min(F_l, s_l)} C(s_l, i)``;
    - ``position = "child"`` or ``"child_v2"``: ``Γ_{l+1} = C(s_l, f_l) · C(Γ_l + f_l − 1, f_l)``, ``Γ_0 = 1``;
    - ``position = "all"``: ``Π_l C(s_l, f_l)^{F_{l+1}}``;

    with ``F_{l+1} = Π_{j>l} f_j`` and ``F_l = f_l F_{l+1}``.
    """
    s = [e for e, _ in levels]
    f = [k for _, k in levels]
    parents = _parents(f)
    kind = _kind(activation, position)
    if kind == "tree":
        ln = sum(_times(parents[l], _ln_comb(s[l], f[l])) for l in range(len(s)))
        return _result(ln, lambda: math.prod(math.comb(s[l], f[l]) ** parents[l] for l in range(len(s))))
    if kind == "flat":
        tops = [min(parents[l] * f[l], s[l]) for l in range(len(s))]
        ln = sum(_ln_binom_sum(s[l], f[l], tops[l]) for l in range(len(s)))
        return _result(ln, lambda: math.prod(sum(math.comb(s[l], i) for i in range(f[l], tops[l] + 1))
                                             for l in range(len(s))))
    ln = 0.0
    for l in range(len(s)):
        ln = _ln_comb(s[l], f[l]) + _ln_multichoose(ln, f[l])

    def exact() -> int:
        g = 1
        for l in range(len(s)):
            g = math.comb(s[l], f[l]) * math.comb(g + f[l] - 1, f[l])
        return g

    return _result(ln, exact)


def tree_gamma_text(levels: Sequence[tuple[int, int]], activation: str = "tanh", position: str = "all") -> str:
    """Γ of a tree with its formula, top pool first, for ``mf.explain``."""
    s = [e for e, _ in levels]
    f = [k for _, k in levels]
    parents = _parents(f)
    kind = _kind(activation, position)
    value = format_gamma(tree_gamma(levels, activation, position))
    top_first = list(reversed(range(len(s))))
    if kind == "tree":
        terms = " x ".join(f"C({s[l]},{f[l]})^{parents[l]}" for l in top_first)
        return f"{value} = {terms} routing structures per token"
    if kind == "flat":
        terms = []
        for l in top_first:
            top = min(parents[l] * f[l], s[l])
            terms.append(f"C({s[l]},{f[l]})" if top == f[l] else f"Σ_{{i={f[l]}..{top}}} C({s[l]},i)")
        return (f"{value} = {' x '.join(terms)} sets of active experts per token (identity activation: "
                "a flat mixture of the pools' experts under path-aggregated gates)")
    steps = []
    for l in range(len(s)):
        below = format_gamma(tree_gamma(levels[:l], activation, position)) if l else "1"
        here = format_gamma(tree_gamma(levels[:l + 1], activation, position))
        steps.append(f"Γ_{l + 1} = C({s[l]},{f[l]}) x C({below}+{f[l] - 1},{f[l]}) = {here}")
    return (f"{value} routing structures per token (σ on the child messages: children count as a set "
            f"of experts and a multiset of subtrees): {'; '.join(steps)}")


def adapter_gamma(adapter: Any, experts: int | None = None) -> int | GammaEstimate:
    """Γ of one site's adapter (``experts``: a per-layer override of a pool's expert count)."""
    match adapter:
        case LoRA():
            return 1
        case RankPartition():
            return adapter_gamma(adapter.as_pool())
        case ExpertPool() if isinstance(adapter.router, TopPRouter):
            return variable_pool_gamma(experts or adapter.experts, adapter.router.k)
        case ExpertPool() if adapter.capacity_factor is not None and adapter.router.k is not None:
            return capacity_pool_gamma(experts or adapter.experts, adapter.router.k)
        case ExpertPool():
            return pool_gamma(experts or adapter.experts, adapter.router.k)
        case CorePool():
            return pool_gamma(experts or adapter.experts, adapter.router.k)
        case KroneckerPool():  # EPT: C(E, k) of the E Kronecker experts
            return pool_gamma(adapter.experts, adapter.router.k)
        case RankTasks():  # training's budget: k of the R rank-1 experts
            return pool_gamma(adapter.experts, adapter.k)
        case ResidualTree():
            levels = [(lv.experts, fan) for lv, fan in zip(adapter.levels, adapter.fanouts())]
            return tree_gamma(levels, adapter.activation, adapter.activation_position)
    raise TypeError(adapter)


def structural_flexibility(spec: Any) -> int | GammaEstimate | dict[str, int | GammaEstimate]:
    """Γ (METHODS.md §1.7): distinct routing structures per token at one adapted linear.

    ``Π_l C(s_l, f_l)^{F_{l+1}}`` for an S'MoRE tree (216 for the ``smore`` preset); with
    ``activation_position`` ``"child"``/``"child_v2"`` the multiset count of Corollary 3.5 (126),
    with an identity activation the flat-mixture count of Theorem 3.3 (66) — see
    :mod:`moleforge.report.structure`; ``C(E, k)`` for a top-k pool, 1 for dense or static
    routing or plain LoRA. An ``int`` up to ``10^300``, above that a :class:`GammaEstimate`
    (a float that prints ``≈ m × 10^e``). A spec whose sites (or per-layer overrides) differ
    gives ``{"sites[i]" or "sites[i].overrides[j]": Γ}``.
    """
    spec = as_spec(spec)
    values: dict[str, int | GammaEstimate] = {}
    for i, site in enumerate(spec.sites):
        values[f"sites[{i}]"] = adapter_gamma(site.adapter)
        for j, ov in enumerate(site.target.overrides):
            if ov.experts is not None:
                values[f"sites[{i}].overrides[{j}]"] = adapter_gamma(site.adapter, ov.experts)
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values
