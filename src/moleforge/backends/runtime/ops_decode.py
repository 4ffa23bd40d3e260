"""The decode path's forms of the ops: few tokens per call (one per sequence in a decoding step).

At a handful of tokens a sparse pool's grouped form costs its fixed work (sorting the
(token, slot) pairs, gathers, a scatter, one small GEMM per expert) for a few numbers; computing
all ``E`` experts in one dense GEMM and gating afterwards costs ``T·(E - k)·r·(d_in + d_out)``
extra multiply-adds and none of that. The kernel policy says at how many tokens
(``KernelPolicy.decode_tokens``); the result is the same sum (unselected experts have gate 0),
up to the order of the floating-point additions.

Without autograd in evaluation mode a generated module computes no aux loss (:func:`aux_wanted`)
unless it is asked to (its ``eval_aux`` attribute, ``handle.eval_aux(True)``): nothing could
differentiate it.

A routed LoRA pool (router, softmax top-k or dense gate, the pool's mix; the plain IR of MoLoRA,
MoLA, HydraLoRA, LoRAMoE) has a second entry point, its decode form (:class:`PoolDecode`, the
generated module's ``decode_form``): without autograd at decode sizes on a CPU, one call of the
compiled kernel (``backends/cpu/pool_decode.py``) routes each token and applies its selected
experts' factors only, in place of the whole generated forward (:func:`decode_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cpu import pool_decode
from .packed import PackCache, packed

__all__ = ["dense_mix", "aux_wanted", "PoolDecode", "decode_step"]


def aux_wanted(training: bool, eval_aux: bool) -> bool:
    """Whether a forward computes its aux losses: in training mode, with autograd on, or when
    asked to (``eval_aux``)."""
    return training or eval_aux or torch.is_grad_enabled()


def _stacked(a: Tensor, b: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """``A (E|1, r, d_in)``, ``B (E|1, d_out, r)`` as ``(E·r, d_in)`` rows and ``(d_out, E·r)``
    columns, a factor stored once repeated for each expert."""
    _, r, d_in = a.shape
    d_out = b.shape[1]
    rows = a.expand(E, r, d_in).reshape(E * r, d_in)  # (E·r, d_in)
    cols = b.expand(E, d_out, r).permute(1, 0, 2).reshape(d_out, E * r)  # (d_out, E·r)
    return rows, cols


def dense_mix(x: Tensor, gates: Tensor, a: Tensor, b: Tensor, scale: float,
              cache: PackCache | None = None, name: str = "dense_mix") -> Tensor:
    """``Σ_e scale·g_e B_e A_e x`` over all experts: ``(x A_rowsᵀ ⊙ repeat(scale·g, r)) B_colsᵀ``.

    ``x (T, d_in)``, ``gates (T, E)`` (zero for unselected experts), ``a (E|1, r, d_in)``,
    ``b (E|1, d_out, r)`` -> ``(T, d_out)``. The stacked factors are kept by ``cache`` between
    calls without autograd.
    """
    T, E = gates.shape
    r = a.shape[1]
    rows, cols = packed(cache, name, (a, b), lambda: _stacked(a, b, E))  # type: ignore[misc]
    h = x @ rows.T  # (T, E·r)
    g = (h.view(T, E, r) * (gates * scale).unsqueeze(-1)).view(T, E * r)  # (T, E·r)
    return g @ cols.T  # (T, d_out)


@dataclass(frozen=True, slots=True)
class PoolDecode:
    """The decode form of a generated module whose plain IR is one routed LoRA pool:
    ``y = acc + Σ_e scale·g_e B_e A_e x`` with ``g = gate(x W_rᵀ)``. It names the module's
    tensors (read at each call, so loading, moving and training the module keep it current) and
    the gate's constants; lowering makes it (``torch_fx/lower_decode.py``)."""

    router_w: str
    a: str
    b: str
    gate: str
    """``"softmax_topk"`` or ``"dense_softmax"`` (``pool_decode.GATE_CODES``)."""
    k: int
    renormalize: bool
    temperature: float
    scale: float

    def __call__(self, site: nn.Module, x: Tensor, acc: Tensor | None) -> Tensor:
        """``acc + Δy`` (``Δy`` without ``acc``) for ``x (T, d_in)``, in the CPU kernel."""
        a, b = _tensor(site, self.a), _tensor(site, self.b)
        bt = packed(site.pack_cache, "decode_bt", (b,), lambda: b.transpose(-1, -2).contiguous())  # (E|1, r, d_out)
        return pool_decode.run(x, _tensor(site, self.router_w), a, bt, acc, self.gate, self.k, self.renormalize,
                               self.temperature, self.scale)


def _tensor(site: nn.Module, name: str) -> Tensor:
    """The module's stored tensor ``name`` (a parameter, or a buffer when frozen)."""
    t = site._parameters.get(name)
    return site._buffers[name] if t is None else t


def decode_step(site: nn.Module, x: Tensor, acc: Tensor | None) -> Tensor | None:
    """The generated module ``site``'s output on ``x`` through its decode form when the kernel
    policy takes it here (a CPU tensor of float32/float64 at decode sizes, the kernel built, no
    autograd, not under ``torch.compile``); ``None`` when the generated forward must run."""
    form = site.__dict__.get("decode_form")
    if form is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if site.kernel_policy.decode_kernel(x.device, x.dtype, x.shape[0]) != "cpu":
        return None
    return form(site, x, acc)
