"""The routed FFN block a model runs: the traced block with its expert region replaced by a
call of the lowered adapter.

For a Llama MLP the generated ``forward`` reads::

    def forward(self, x):
        flatten_tokens = moleforge_..._flatten_tokens(x, torch.float32)
        gate_proj_weight = self.gate_proj.weight
        ...
        token_mask = self.token_mask(x)
        site = self.site(flatten_tokens, None, {'W_gate': gate_proj_weight, ...}, mask = token_mask)
        report = self.report(site[1], site[2], token_mask)
        unflatten_tokens = moleforge_..._unflatten_tokens(site[0], x)
        return unflatten_tokens

The block references the model's own weights (no copies); the original module is kept by the
caller and put back by ``remove()``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..backends.runtime.ops import in_backward, jitter
from ..errors import InjectionError
from .ffn_trace import TracedBlock
from .inject import AuxCollector, logged_routes
from .quantized import dequantized, is_quantized

__all__ = ["MoleforgeBlock", "BlockInput", "build_block_module", "frozen_names", "flatten_tokens",
           "unflatten_tokens"]


def frozen_names(role: str) -> tuple[str, str]:
    """Names of a block linear's frozen weight and bias in the IR: ``W_<role>``, ``b_<role>``."""
    return f"W_{role}", f"b_{role}"


class MoleforgeBlock(fx.GraphModule):
    """An FFN block rewritten into routed experts (``.code`` shows it); ``site`` holds the
    adapter's parameters, ``linears`` maps each role (gate, up, down) to its module path below
    the traced root."""

    linears: dict[str, str]


class BlockInput(nn.Module):
    """Stands in for the first half of a split FFN (BERT's ``intermediate``): its work moved
    into the routed block, so it passes its input through."""

    def forward(self, x, *args, **kwargs):
        return x


class _Report(nn.Module):
    """Hands a block's aux loss and routing (its real tokens' rows, given a token mask) to the
    model-wide collector."""

    def __init__(self, collector: AuxCollector, site_name: str):
        super().__init__()
        self.collector = collector
        self.site_name = site_name

    def forward(self, aux, routes, mask: torch.Tensor | None = None) -> None:
        if in_backward():
            return  # activation checkpointing recomputes the block: the first run reported it
        if aux is not None:
            self.collector.terms.append(aux)
        if self.collector.routing_log is not None and routes:
            self.collector.routing_log.append((self.site_name, logged_routes(routes, mask)))


class _TokenMask(nn.Module):
    """Which tokens of the block input are real (:meth:`AuxCollector.token_mask`): ``(T,)``
    bool or ``None``. Activation checkpointing recomputes the block after the model call ended;
    the recomputation takes the first run's mask, so that it runs the same computation."""

    def __init__(self, collector: AuxCollector):
        super().__init__()
        self.collector = collector
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not in_backward():
            self.last = self.collector.token_mask(x)
        return self.last


class _Samples(nn.Module):
    """Sample index (and type labels) of each token of a ``(batch, seq, d)`` input. A
    recomputation under activation checkpointing (after a ``sample_types`` block may have
    ended) takes the first run's."""

    def __init__(self, collector: AuxCollector):
        super().__init__()
        self.collector = collector
        self.last: tuple | None = None

    def forward(self, x: torch.Tensor):
        if not in_backward():
            self.last = self._samples(x)
        return self.last

    def _samples(self, x: torch.Tensor):
        B = x.shape[0] if x.dim() == 3 else 1
        per = x.numel() // (x.shape[-1] * B)
        idx = torch.arange(B, device=x.device).repeat_interleave(per)
        types = self.collector.sample_types
        if types is not None:
            if types.numel() != B:
                raise InjectionError(f"sample types have {types.numel()} entries for a batch of {B}")
            types = types.to(x.device).repeat_interleave(per)
        return idx, types


class _NoiseReplay(nn.Module):
    """Makes a recomputation under activation checkpointing draw the first run's routing noise
    from the site's noise generator (``handle.seed_noise``; torch's global generator is replayed
    by ``torch.utils.checkpoint`` itself): ``forward("begin")`` before the site call records the
    generator's state, or in a recomputation sets it back to the recorded one;
    ``forward("end", ...)`` after it puts the generator back where the recomputation found it."""

    def __init__(self, site: nn.Module):
        super().__init__()
        self._site = [site]  # not a submodule: the block owns the site
        self._first: torch.Tensor | None = None
        self._after: torch.Tensor | None = None

    def forward(self, phase: str, *_after_these) -> None:
        gen = getattr(self._site[0], "noise_generator", None)
        if gen is None:
            return
        if phase == "begin":
            if not in_backward():
                self._first = gen.get_state()
            elif self._first is not None:
                self._after = gen.get_state()
                gen.set_state(self._first)
        elif self._after is not None:
            gen.set_state(self._after)
            self._after = None


def _draws_noise(site: fx.GraphModule) -> bool:
    """Whether the site's code draws routing noise (a jittered router input)."""
    return any(n.op == "call_function" and n.target is jitter for n in site.graph.nodes)


def flatten_tokens(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(..., d) -> (T, d)`` in the adapter's dtype."""
    return x.reshape(-1, x.shape[-1]).to(dtype)


def unflatten_tokens(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(T, d_out) -> (..., d_out)`` in the dtype of the block input ``like``."""
    return y.reshape(*like.shape[:-1], y.shape[-1]).to(like.dtype)


def _frozen_inputs(g: fx.Graph, tb: TracedBlock, dtype: torch.dtype) -> dict[str, fx.Node]:
    """``{W_role / b_role: node}`` reading the block's own weights, as ``[out, in]`` views."""
    out = {}
    for role, lin in tb.linears.items():
        module = tb.root.get_submodule(lin.target)
        w_name, b_name = frozen_names(role)
        w = g.get_attr(f"{lin.target}.weight")
        if is_quantized(module.weight):  # run as the quantised linear would: W in floating point
            w = g.call_function(dequantized, (g.get_attr(lin.target),))
        if lin.transposed:
            w = g.call_method("t", (w,))
        if module.weight.dtype != dtype:
            w = g.call_method("to", (w, dtype))
        out[w_name] = w
        if lin.bias:
            b = g.get_attr(f"{lin.target}.bias")
            out[b_name] = b if module.bias.dtype == dtype else g.call_method("to", (b, dtype))
    return out


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_block_module(tb: TracedBlock, site: fx.GraphModule, collector: AuxCollector, *,
                       uses_samples: bool = False, dtype: torch.dtype = torch.float32
                       ) -> dict[str, nn.Module]:
    """The modules to put into the model: ``{tb.name: MoleforgeBlock}`` plus a
    :class:`BlockInput` for each pass-through path of a split FFN."""
    g = fx.Graph()
    vmap: dict[fx.Node, fx.Node] = {}
    g.output(g.graph_copy(tb.graph, vmap))
    x, down = vmap[tb.x], vmap[tb.down]
    extras = {"site": site, "report": _Report(collector, tb.name), "samples": _Samples(collector),
              "token_mask": _TokenMask(collector)}
    noisy = _draws_noise(site)
    if noisy:
        extras["noise"] = _NoiseReplay(site)
    clash = [k for k in extras if hasattr(tb.root, k)]
    if clash:
        raise InjectionError(f"FFN block {tb.name!r} already has attribute(s) {clash}; cannot route it")
    with g.inserting_before(down):
        flat = g.call_function(flatten_tokens, (x, dtype))
        frozen = _frozen_inputs(g, tb, dtype)
        samples = g.call_module("samples", (x,)) if uses_samples else None
        mask = g.call_module("token_mask", (x,))
        if noisy:
            g.call_module("noise", ("begin",))
        result = g.call_module("site", (flat, samples, frozen), {"mask": mask})
        if noisy:
            g.call_module("noise", ("end", result))
        mixed = g.call_function(operator.getitem, (result, 0))
        g.call_module("report", (g.call_function(operator.getitem, (result, 1)),
                                 g.call_function(operator.getitem, (result, 2)), mask))
        y = g.call_function(unflatten_tokens, (mixed, x))
    down.replace_all_uses_with(y)
    for n in reversed([vmap[n] for n in tb.region]):
        g.erase_node(n)
    g.lint()
    attrs = {n.target: extras[n.target] if n.target in extras else _attr(tb.root, n.target)
             for n in g.nodes if n.op in ("get_attr", "call_module")}
    block = MoleforgeBlock(attrs, g, class_name="MoleforgeBlock")
    block.linears = {role: lin.target for role, lin in tb.linears.items()}
    block.training = tb.root.training
    site.train(tb.root.training)
    out: dict[str, nn.Module] = {tb.name: block}
    out.update({p: BlockInput() for p in tb.passthrough})
    return out
