"""Put generated site modules into a HuggingFace model, reversibly and atomically.

``AdaptedLinear`` wraps the original ``nn.Linear`` / GPT-2 ``Conv1D`` (kept as
``base_layer``, untouched) and adds the site's ``Δy``. ``swap_modules`` replaces modules
by name and puts every one back if any replacement fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as torch_module

from ..backends.runtime.ops import in_backward
from ..backends.runtime.ops_decode import decode_step
from ..errors import InjectionError
from ..ir import Routing, TreeRouting
from .quantized import dequantized

__all__ = ["AdaptedLinear", "AuxCollector", "linear_dims", "swap_modules", "get_submodule_parent", "logged_routes",
           "FROZEN_WEIGHT"]


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``; ``None`` otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight  # Conv1D stores (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None


class AuxCollector:
    """Collects the aux losses of one model forward (reset by a pre-hook on the model), and
    holds that forward's padding mask for the sites."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []
        self.sample_types: torch.Tensor | None = None
        self.routing_log: list[tuple[str, dict]] | None = None
        """When a list, every site appends ``(module name, routes)`` of each forward."""
        self.padding_mask: torch.Tensor | None = None
        """The model call's ``attention_mask`` as bool ``(batch, seq)`` (``True`` = real token)
        while the call runs, when it marks padding; ``None`` otherwise (no mask, or no padding)."""

    def reset(self) -> None:
        self.terms = []

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which tokens of a site input ``x (..., d)`` are real, flattened as the site flattens
        them: ``(T,)`` bool; ``None`` without padding.

        The mask applies to the inputs whose tokens are the batch's positions: ``x`` of shape
        ``(batch, seq, d)``, or ``(batch·seq, d)``. A site that sees other tokens (a decoding
        step with a cache, packed or resampled sequences) gets ``None`` and counts all of them.
        """
        mask = self.padding_mask
        if mask is None:
            return None
        lead = x.shape[:-1]
        if lead != mask.shape and not (len(lead) == 1 and lead[0] == mask.numel()):
            return None
        return mask.reshape(-1).to(x.device)

    def total(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        out = self.terms[0]
        for t in self.terms[1:]:
            out = out + t.to(out.device)
        return out


_OUTPUT_NOT_SAVED = frozenset({"MmBackward0", "AddmmBackward0", "UnsafeViewBackward0"})
"""Backward functions of a frozen linear's output that do not read that output."""


def _accumulable(out: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the site may add ``Δy`` into the frozen layer's output ``out`` in place: a
    contiguous tensor of the adapter's dtype, not a view, that no backward reads."""
    if torch.compiler.is_compiling():  # the compiled graph adds out of place (``linear_into``)
        return out.dtype == dtype
    if out.dtype != dtype or out._base is not None or not out.is_contiguous():
        return False
    return out.grad_fn is None or type(out.grad_fn).__name__ in _OUTPUT_NOT_SAVED


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own, or a global one) would run on calling ``module``."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


@contextmanager
def _drawing_from(gen: torch.Generator | None, state: torch.Tensor | None) -> Iterator[None]:
    """Draws from ``gen`` as from ``state`` (a recomputation replays the first run's routing
    noise), then leaves the generator where it was; nothing when either is ``None``."""
    if gen is None or state is None:
        yield
        return
    after = gen.get_state()
    gen.set_state(state)
    try:
        yield
    finally:
        gen.set_state(after)


FROZEN_WEIGHT = "W"
"""The frozen input of a linear site whose adapter reads the frozen weight (DoRA): the base layer's
``W (d_out, d_in)``, read in place (a GPT-2 ``Conv1D``'s weight transposed)."""


class AdaptedLinear(nn.Module):
    """``y = base_layer(x) + Δy(x)``, ``Δy`` computed by the generated ``site`` module."""

    def __init__(self, base_layer: nn.Module, site: fx.GraphModule, collector: AuxCollector,
                 uses_samples: bool = False, site_name: str = "", reads_weight: bool = False):
        super().__init__()
        dims = linear_dims(base_layer)
        if dims is None:
            raise InjectionError(f"cannot adapt a {type(base_layer).__name__}: only nn.Linear and Conv1D")
        self.in_features, self.out_features = dims
        self.base_layer = base_layer
        self.site = site
        self._collector = collector
        self._uses_samples = uses_samples
        self.site_name = site_name
        """The adapted module's path in the model (the key of its routing log entries)."""
        self._reads_weight = reads_weight
        """Whether the site reads the frozen weight (its graph's frozen input ``W``: DoRA)."""
        self._first_run: tuple = (None, None, None)
        """``(samples, token mask, noise generator state)`` of the last forward: activation
        checkpointing recomputes the forward during backward, after the model call (and a
        ``sample_types`` block around it) ended, and must run the same computation."""

    bypass = False
    """Set while X-LoRA's first pass runs with scalings 0: the frozen layer alone, nothing computed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base_layer(x)
        tokens = x.reshape(-1, self.in_features)
        base = self.base_layer
        # on the token matrix, an nn.Linear's output is the GEMM's own tensor, not a view of it;
        # a GPT-2 Conv1D returns its GEMM's output under a view of the same shape
        if type(base) is nn.Linear and not _hooked(base):  # the module call costs as much as a decoding GEMV
            out = F.linear(tokens, base.weight, base.bias)
        else:
            out = base(tokens)
            if out._base is not None and out._base.shape == out.shape and type(base).__name__ == "Conv1D":
                out = out._base
        if not self.training and not torch.is_grad_enabled():
            y = self._decode_form(tokens, out)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        dtype = self._dtype(x)
        flat = tokens if tokens.dtype == dtype else tokens.to(dtype)  # (T, d_in)
        shape = (*x.shape[:-1], self.out_features)
        if _accumulable(out, dtype):
            return self._run(x, flat, out).view(shape)
        delta = self._run(x, flat, None)
        return out.view(shape) + delta.view(shape).to(out.dtype)

    def _decode_form(self, tokens: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """``out + Δy`` from the site's decode form (``runtime/ops_decode.py``), when it has one that
        the kernel policy takes here and nothing else is asked of the forward (a routing log, aux
        losses in evaluation, a hook on the site); else ``None``."""
        site = self.site
        form = site.__dict__.get("decode_form")
        if form is None or site.eval_aux or self._collector.routing_log is not None or _hooked(site):
            return None
        dtype = self._dtype(tokens)
        if tokens.dtype != dtype or not _accumulable(out, dtype):
            return None
        return decode_step(site, tokens, out)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        """The adapter's dtype: its first own parameter's (a lookup, not a walk of the module tree)."""
        for p in self.site._parameters.values():
            if p is not None:
                return p.dtype
        p = next(self.site.parameters(), None)
        return p.dtype if p is not None else x.dtype

    def _run(self, x: torch.Tensor, flat: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """The site on ``flat``; with ``acc``, its output added to ``acc`` (see ``lower``)."""
        if not self.training and not torch.is_grad_enabled() and not getattr(self.site, "eval_aux", False):
            return self._run_inference(x, flat, acc)
        gen = getattr(self.site, "noise_generator", None)
        recompute = in_backward()
        if not recompute:
            self._first_run = (self._samples(x) if self._uses_samples else None, self._collector.token_mask(x),
                               None if gen is None else gen.get_state())
        samples, mask, noise_state = self._first_run
        with _drawing_from(gen, noise_state if recompute else None):
            y, aux, routes = self.site(flat, samples, acc=acc, mask=mask, **self._frozen())
        # The aux loss and routing of this token batch were collected by the first run; keep
        # them counted once.
        if not recompute:
            if aux is not None:
                self._collector.terms.append(aux)
            if self._collector.routing_log is not None and routes:
                self._collector.routing_log.append((self.site_name, logged_routes(routes, mask)))
        return y

    def _frozen(self) -> dict:
        """The site's frozen inputs as keyword arguments: the weight for DoRA, nothing otherwise."""
        return {"frozen": {FROZEN_WEIGHT: self._weight()}} if self._reads_weight else {}

    def _weight(self) -> torch.Tensor:
        """The frozen ``W (d_out, d_in)`` (a view; a ``Conv1D`` stores it ``(d_in, d_out)``)."""
        w = dequantized(self.base_layer)
        return w if isinstance(self.base_layer, nn.Linear) else w.t()

    def _run_inference(self, x: torch.Tensor, flat: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """Evaluation mode without autograd (generation, evaluation), no aux loss asked for
        (``handle.eval_aux``): no samples and no padding mask; nothing to replay in a backward.
        The mask is read only for a routing log, which counts real tokens."""
        log = self._collector.routing_log
        mask = self._collector.token_mask(x) if log is not None else None
        samples = self._samples(x) if self._uses_samples else None  # task ids, sample types
        # the generated forward itself unless a hook watches the site: the module-call wrappers
        # cost as much as a decoding step's adapter arithmetic
        site = self.site
        call = site if _hooked(site) else site.forward
        y, _, routes = call(flat, samples, acc=acc, mask=mask, **self._frozen())
        if log is not None and routes:
            log.append((self.site_name, logged_routes(routes, mask)))
        return y

    def _samples(self, x: torch.Tensor):
        # sample index per token for (batch, seq, d) inputs; one sample otherwise
        B = x.shape[0] if x.dim() == 3 else 1
        per = x.numel() // (x.shape[-1] * B)
        idx = torch.arange(B, device=x.device).repeat_interleave(per)
        types = self._collector.sample_types
        if types is not None:
            if types.numel() != B:
                raise InjectionError(f"sample types have {types.numel()} entries for a batch of {B}")
            types = types.to(x.device).repeat_interleave(per)
        return idx, types

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def logged_routes(routes: dict, mask: torch.Tensor | None) -> dict:
    """Detached copies of a site's routings for the routing log; with a token ``mask (T,)``,
    of the real tokens' rows only (every routing tensor is token-major), so that the logged
    statistics count real tokens."""
    return _detach(routes, mask)


def _detach(v, mask: torch.Tensor | None):
    if isinstance(v, torch.Tensor):
        return v.detach() if mask is None else v.detach()[mask]
    if isinstance(v, TreeRouting):  # its smooth load is per routed context, not per token: not logged
        return TreeRouting(_detach(v.indices, mask), _detach(v.weights, mask), _detach(v.probs, mask), v.gate)
    if isinstance(v, Routing):
        return Routing(*(_detach(x, mask) for x in v))
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x, mask) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x, mask) for k, x in v.items()}
    return v


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module],
                 check: Callable[[str, nn.Module], None] | None = None) -> dict[str, nn.Module]:
    """Replace each named module; return the originals. All or nothing."""
    done: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            parent, child = get_submodule_parent(model, name)
            old = getattr(parent, child)
            if check is not None:
                check(name, old)
            setattr(parent, child, new)
            done[name] = old
    except Exception as e:
        for name, old in done.items():
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, old)
        if isinstance(e, InjectionError):
            raise
        raise InjectionError(f"could not replace module {name!r}: {e}; the model was left as it was") from e
    return done
