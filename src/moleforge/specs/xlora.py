"""X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148; PEFT's ``XLoraConfig``): a model-scope
router. A first pass of the base model (the adapters' scalings set to ``scaling_pass_value``; 0:
the adapters are skipped), a classifier on its last hidden state that emits per token one
scaling per adapted linear and expert, then the adapted pass, where each adapted linear mixes
its experts with its scalings. Every site with this router shares the one classifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from .base import MIN_TEMPERATURE, SpecModel

__all__ = ["XLoRARouter", "check_xlora_pool", "check_xlora_sites"]


class XLoRARouter(SpecModel):
    """``g = weight · topk_softmax(s_ℓ)``, ``s = softmax(C(h) / τ)`` of the classifier ``C`` on the
    base model's last hidden state ``h``, at the site's layer ℓ (the position of the adapted
    linear among the model's adapted linears, in module order, as PEFT counts them).

    ``C`` is PEFT's: ``depth = 1`` a linear ``hidden → E`` (``layerwise``: ``hidden → L·E``); else
    ``Linear(hidden, size)``, ReLU, dropout, ``depth - 2`` more ``Linear(size, size)``, ReLU, dropout,
    and the last linear from ``size``. Its parameters belong to the adapter (saved and loaded
    with it); they are the only trainable ones when the experts are frozen."""

    kind: Literal["xlora"] = "xlora"
    depth: PositiveInt = 1
    """``xlora_depth``: linear layers of the classifier."""
    size: PositiveInt = 2048
    """``xlora_size``: width of its hidden layers (read when ``depth > 1``)."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """``xlora_dropout_p``: dropout after each hidden ReLU, in training."""
    layerwise: bool = False
    """``layerwise_scalings``: one output per adapted linear (``False``: one, broadcast to all)."""
    softmax: bool = True
    """``enable_softmax``: softmax of the classifier's logits over the experts."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    """``softmax_temperature`` τ."""
    top_k: PositiveInt | None = None
    """``top_k_lora``: keep each token's k largest scalings per layer (``None``: every expert)."""
    softmax_topk: bool = False
    """``enable_softmax_topk``: a softmax over the kept (non-zero) scalings."""
    scaling_pass_value: float = 0.0
    """The scalings of the first pass (0: the adapters are skipped there, the plain base model)."""
    global_scaling_weight: float = 1.0
    """``global_scaling_weight`` γ: multiplies every expert's output."""

    @property
    def k(self) -> None:
        """Experts per token: ``None``; every expert is computed (``top_k`` zeroes scalings)."""
        return None


def check_xlora_pool(pool) -> None:
    """A pool with an ``xlora`` router: no aux losses, ``top_k <= experts``, and no top-k of the
    first pass's equal scalings."""
    r = pool.router
    if not isinstance(r, XLoRARouter):
        return
    if pool.aux_losses:
        raise ValueError("aux_losses: X-LoRA's classifier is trained by the model's loss alone; remove aux_losses")
    if r.top_k is not None and r.top_k > pool.experts:
        raise ValueError(f"router.top_k = {r.top_k} exceeds experts = {pool.experts}; use top_k <= experts or None")
    if r.top_k is not None and r.scaling_pass_value != 0:
        raise ValueError(f"router.scaling_pass_value = {r.scaling_pass_value} with top_k = {r.top_k}: the first "
                         "pass gives every expert the same scaling, so top_k would pick among ties; set "
                         "scaling_pass_value = 0 or top_k = null")
    if pool.capacity_factor is not None or pool.shared_expert is not None or pool.ranks is not None:
        raise ValueError("an xlora router mixes a pool of whole LoRAs: capacity_factor, shared_expert and ranks are "
                         "not defined for it; remove them")


def check_xlora_sites(sites: list) -> None:
    """Every site with an ``xlora`` router shares the one classifier: the same router settings and
    the same number of experts, on linear sites."""
    found = [(i, s) for i, s in enumerate(sites) if isinstance(getattr(s.adapter, "router", None), XLoRARouter)]
    if not found:
        return
    i0, s0 = found[0]
    for i, s in found:
        if s.adapter.kind != "pool":
            raise ValueError(f"sites[{i}].adapter.kind = {s.adapter.kind!r}: an xlora router mixes the experts of a "
                             "pool; use adapter.kind = 'pool'")
        if s.scope != "linear":
            raise ValueError(f"sites[{i}].scope = {s.scope!r}: X-LoRA mixes the LoRAs of single linears; set scope "
                             "= 'linear'")
        if s.adapter.router != s0.adapter.router:
            raise ValueError(f"sites[{i}].adapter.router differs from sites[{i0}].adapter.router: the sites of an "
                             "X-LoRA adapter share one classifier; give them the same xlora router")
        if s.adapter.experts != s0.adapter.experts:
            raise ValueError(f"sites[{i}].adapter.experts = {s.adapter.experts}, sites[{i0}] has "
                             f"{s0.adapter.experts}: the X-LoRA classifier emits one scaling per expert for every "
                             "layer; give every site the same experts")
