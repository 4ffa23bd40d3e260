"""X-LoRA in the model: its classifier (PEFT's ``XLoraClassifier``), the two-pass forward and the
handle that owns the classifier.

A forward of the model first runs the base model (the backbone, without its head): the adapted
linears are bypassed when ``scaling_pass_value`` is 0 (nothing of the experts is computed), or
mix their experts with that constant scaling otherwise; no autograd, as in PEFT. The classifier
reads that pass's last hidden state ``(B, S, d)`` and emits the scalings ``(B, S, L, E)``; each
adapted linear ℓ gets ``scalings[:, :, ℓ]`` as its site's ``xlora_scalings`` for the model's own
(adapted) forward, which follows. The scalings stay set until the next forward, so activation
checkpointing recomputes with the same ones.

Generation with a KV cache: the first pass keeps a cache of its own, beside the model's, so a
decoding step runs the base model on the new tokens only; the scalings of token t depend on the
tokens up to t, as without a cache. (PEFT generates without a cache.) Beam search reorders the
model's cache and not this one: it is refused.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..specs.xlora import XLoRARouter
from .handle import AdapterHandle

__all__ = ["XLoRAClassifier", "XLoRAHandle", "xlora_router", "CLASSIFIER"]

CLASSIFIER = "xlora_classifier"
"""The classifier's attribute on the model while the adapter is injected (and its key prefix in
the adapter's tensors)."""

_BASE_PASS_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position")
_CACHE_KEYS = ("cache", "past_key_values")
"""How a model call passes its KV cache (transformers >= 5.2x: ``cache``; before: ``past_key_values``)."""


def xlora_router(spec) -> XLoRARouter | None:
    """The spec's X-LoRA router (every X-LoRA site has the same one), or ``None``."""
    for site in spec.sites:
        router = getattr(site.adapter, "router", None)
        if isinstance(router, XLoRARouter):
            return router
    return None


class XLoRAClassifier(nn.Module):
    """PEFT's classifier: ``layers`` (the same names, so PEFT's weights load as they are) maps the
    last hidden state ``(B, S, hidden)`` to logits; broadcast over the ``n_layers`` unless
    layerwise; softmax over the experts at the temperature. Output ``(B, S, n_layers, E)``."""

    def __init__(self, router: XLoRARouter, hidden: int, n_layers: int, experts: int, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        self.router, self.n_layers, self.experts = router, n_layers, experts
        out = experts * n_layers if router.layerwise else experts
        kw = {"dtype": dtype, "device": device}
        layers: list[nn.Module] = []
        width = hidden
        for _ in range(router.depth - 1):
            layers += [nn.Linear(width, router.size, **kw), nn.ReLU()]
            if router.dropout > 0:
                layers.append(nn.Dropout(router.dropout))
            width = router.size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out, **kw))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, S = hidden.shape[:2]
        p = self.layers[0].weight
        logits = self.layers(hidden.to(p.dtype))
        if not self.router.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(B, S, self.n_layers, self.experts)
        if self.router.softmax:
            scalings = torch.softmax(scalings / self.router.temperature, dim=-1)
        return scalings


class _TwoPass:
    """The model's forward pre-hook: the first pass, the classifier, the sites' scalings."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], classifier: XLoRAClassifier):
        self.model, self.layers, self.classifier = model, layers, classifier
        self.router = classifier.router
        self.latest: torch.Tensor | None = None
        """The last forward's scalings ``(B, S, L, E)`` (PEFT's ``get_latest_scalings``)."""
        self._cache: Any = None
        self._inside = False

    def __call__(self, module, args: tuple, kwargs: dict):
        if self._inside:
            return None
        hidden = self._base_pass(args, kwargs)
        scalings = self.classifier(hidden)
        self.latest = scalings
        E = self.classifier.experts
        for i, layer in enumerate(self.layers):
            layer.site.xlora_scalings = scalings[:, :, i, :].reshape(-1, E)
        return None

    def _base_pass(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The last hidden state of the base model (``scaling_pass_value`` scalings), no autograd."""
        call = {k: kwargs[k] for k in _BASE_PASS_INPUTS if kwargs.get(k) is not None}
        if args:
            call.setdefault("input_ids", args[0])
        if "input_ids" not in call and "inputs_embeds" not in call:
            raise InputError("an X-LoRA model is called with input_ids or inputs_embeds (its classifier reads the "
                             "base model's hidden states of those tokens)")
        backbone = getattr(self.model, "base_model", self.model)
        call.update(self._cache_inputs(kwargs, backbone))
        value = self.router.scaling_pass_value
        tokens = call.get("input_ids", call.get("inputs_embeds"))
        self._inside = True
        try:
            with torch.no_grad():
                for layer in self.layers:
                    layer.bypass = value == 0
                    if value != 0:
                        T = tokens.shape[0] * tokens.shape[1]
                        layer.site.xlora_scalings = torch.full((T, self.classifier.experts), float(value),
                                                               device=tokens.device)
                out = backbone(**call, return_dict=True)
        finally:
            self._inside = False
            for layer in self.layers:
                layer.bypass = False
        return out.last_hidden_state

    def _cache_inputs(self, kwargs: dict, backbone: nn.Module) -> dict:
        """The first pass's own KV cache when the model's call uses one, kept in step with it
        (``use_cache=False`` otherwise, for a backbone that takes it)."""
        key = next((k for k in _CACHE_KEYS if kwargs.get(k) is not None), _CACHE_KEYS[-1])
        cache = kwargs.get(key)
        use = kwargs.get("use_cache", getattr(getattr(self.model, "config", None), "use_cache", False))
        if cache is None or not use or not hasattr(cache, "get_seq_length"):
            self._cache = None
            return {"use_cache": False} if "use_cache" in inspect.signature(backbone.forward).parameters else {}
        past = cache.get_seq_length()
        if past == 0 or self._cache is None:
            if past != 0:
                raise InputError(f"an X-LoRA model got a KV cache of {past} tokens it did not fill itself: its first "
                                 "pass (the base model) needs its own cache of the same tokens; start generation "
                                 "from an empty cache, or call it with use_cache=False")
            from transformers import DynamicCache

            self._cache = DynamicCache(config=getattr(self.model, "config", None))
        elif self._cache.get_seq_length() != past:
            raise InputError(f"the X-LoRA first pass's cache holds {self._cache.get_seq_length()} tokens, the model's "
                             f"{past}: the model's cache was changed outside a plain decoding loop (beam search "
                             "reorders it); generate with greedy or sampled decoding, or use_cache=False")
        return {key: self._cache, "use_cache": True}


class XLoRAHandle(AdapterHandle):
    """An adapter handle with X-LoRA sites: it puts the classifier on the model (``model.xlora_classifier``,
    so optimizers built from ``model.parameters()`` and the HF Trainer train it) and runs the two passes;
    the classifier's tensors are part of the adapter's (``xlora_classifier.layers.N.weight``).
    ``remove()`` takes it out again."""

    def __init__(self, model: nn.Module, plan, modules: dict[str, nn.Module], *rest, **kw):
        super().__init__(model, plan, modules, *rest, **kw)
        router = xlora_router(plan.spec)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        names = sorted((n for n in modules if isinstance(getattr(plan.spec.sites[plan.site_of[n]].adapter, "router",
                                                                 None), XLoRARouter)), key=order.__getitem__)
        self.xlora_layers = names
        """The X-LoRA sites in the classifier's layer order (the model's module order, as PEFT)."""
        site = modules[names[0]].site
        held = next(iter([*site.parameters(), *site.buffers()]))
        experts = plan.spec.sites[plan.site_of[names[0]]].adapter.experts
        hidden = _hidden_size(model)
        self.classifier = XLoRAClassifier(router, hidden, len(names), experts, held.dtype, held.device)
        model.add_module(CLASSIFIER, self.classifier)
        self.classifier.train(model.training)
        self._two_pass = _TwoPass(model, [modules[n] for n in names], self.classifier)
        self._hooks.append(model.register_forward_pre_hook(self._two_pass, with_kwargs=True))

    def latest_scalings(self) -> torch.Tensor | None:
        """The last forward's scalings ``(B, S, n_layers, E)``."""
        return self._two_pass.latest

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_parameters()
        for name, p in self.classifier.named_parameters():
            if p.requires_grad:
                yield f"{CLASSIFIER}.{name}", p

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        out.update({f"{CLASSIFIER}.{k}": v for k, v in self.classifier.state_dict().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"{CLASSIFIER}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith(prefix)})
        if own:
            ref = self.classifier.state_dict()
            with torch.no_grad():
                for k, v in own.items():
                    if k not in ref or ref[k].shape != v.shape:
                        have = tuple(ref[k].shape) if k in ref else "no such tensor"
                        raise CheckpointError(f"{prefix}{k}: the saved X-LoRA classifier has shape {tuple(v.shape)}, "
                                              f"this adapter's: {have}")
                    ref[k].copy_(v.to(ref[k].dtype))

    def remove(self) -> nn.Module:
        if self.active and getattr(self.model, CLASSIFIER, None) is self.classifier:
            delattr(self.model, CLASSIFIER)
        return super().remove()


def model_hidden_size(model: nn.Module) -> int | None:
    """The width of ``model``'s hidden states from its config (``hidden_size``, ``n_embd`` or
    ``d_model``); ``None`` without one."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    return int(size) if size else None


def _hidden_size(model: nn.Module) -> int:
    size = model_hidden_size(model)
    if not size:
        raise InputError(f"X-LoRA's classifier reads the model's hidden states; {type(model).__name__} has no "
                         "config.hidden_size")
    return size
