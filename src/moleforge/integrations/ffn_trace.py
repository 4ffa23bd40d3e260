"""FFN blocks through ``torch.fx``: trace a model's MLP, recognise its linears and activation
from the graph, and rewrite it into routed experts.

``trace_block`` traces the smallest module holding a layer's FFN linears. When that module's
own ``forward`` traces (Llama, Qwen2, Mistral, GPT-2 MLPs), it is the block. When the FFN is
split across two children (BERT: ``intermediate`` then ``output``), the block is the method of
the parent that calls exactly those two children (BERT's ``feed_forward_chunk``); the first
child then becomes a pass-through and the second the routed block.

Recognition reads the traced graph only: the linears are ``nn.Linear`` / ``Conv1D`` calls;
the down projection is the one linear that does not read the block input; its input is
either ``act(gate(x)) * up(x)`` or ``act(up(x))``; the activation is the sub-graph between a
linear and that point, identified by evaluating it against ``moleforge.ir.BlockActivation``.
Whatever follows the down projection (dropout, residual add, LayerNorm) is kept and acts on
the mixture of experts.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import InjectionError
from ..ir import block_activation
from .inject import linear_dims

__all__ = ["BlockLinear", "TracedBlock", "trace_block", "ACTIVATION_NAMES"]

ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu", "quick_gelu")
_MUL = (operator.mul, torch.mul, torch.Tensor.mul)


@dataclass(frozen=True)
class BlockLinear:
    """One recognised linear of a block: ``target`` is its path below the block's root module."""

    role: str
    target: str
    d_in: int
    d_out: int
    bias: bool
    transposed: bool
    """GPT-2 ``Conv1D`` stores its weight ``[in, out]``; the IR reads ``[out, in]``."""


@dataclass
class TracedBlock:
    """A traced FFN block and where it sits in the model.

    Attributes:
        name: module path of the module the routed block replaces.
        root: the module the traced graph's targets resolve against (at ``root_path``).
        graph: the traced graph (block input, expert region, tail).
        linears: ``{"gate" | "up" | "down": BlockLinear}`` (no gate in a plain block).
        activation: one of ``ACTIVATION_NAMES``.
        x: the block input (a placeholder of ``graph``).
        region: the expert region's nodes (linears, activation, product), replaced by the experts.
        down: the down projection's node; its users read the mixture of experts.
        passthrough: module paths that become identity (the first half of a split FFN).
    """

    name: str
    root_path: str
    root: nn.Module
    graph: fx.Graph
    linears: dict[str, BlockLinear]
    activation: str
    x: fx.Node
    region: list[fx.Node]
    down: fx.Node
    passthrough: tuple[str, ...] = ()

    @property
    def d_model(self) -> int:
        return self.linears["up"].d_in

    def full_name(self, role: str) -> str:
        """Full module path of a recognised linear."""
        t = self.linears[role].target
        return f"{self.root_path}.{t}" if self.root_path else t


class _Tracer(fx.Tracer):
    """Leaves: torch.nn modules, ``Conv1D``-style linears and any ``leaves`` given."""

    def __init__(self, leaves: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # linear_dims reads weight shapes, which are proxies while tracing: test the class only
        linear = isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
        return linear or any(m is leaf for leaf in self.leaves) or super().is_leaf_module(m, qualname)


class _MethodRoot(nn.Module):
    """Makes a block's method traceable: ``forward(x) = block.<method>(x)``."""

    def __init__(self, block: nn.Module, method: str):
        super().__init__()
        self.block = block
        self._method = method

    def forward(self, x):
        return getattr(self.block, self._method)(x)


def _trace_method(block: nn.Module, method: str, leaves: tuple[nn.Module, ...] = ()) -> fx.Graph:
    graph = _Tracer(leaves).trace(_MethodRoot(block, method))
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            n.target = n.target.removeprefix("block.")
    return graph


# ---- finding the block -------------------------------------------------------------------

def trace_block(model: nn.Module, parent: str, linears: list[str]) -> TracedBlock:
    """Trace the FFN block of the linears ``linears`` (full names) whose smallest common
    ancestor is ``parent``.

    Raises:
        InjectionError: the block does not trace, or its graph is not an FFN of the supported
            shapes; the message names the block and what was found.
    """
    root = model.get_submodule(parent)
    try:
        graph = _Tracer().trace(root)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds; name the block
        error = InjectionError(f"FFN block {parent!r} ({type(root).__name__}) cannot be traced with "
                               f"torch.fx: {type(e).__name__}: {e}")
    else:
        x = next((n for n in graph.nodes if n.op == "placeholder"), None)
        try:
            if x is None:
                raise InjectionError(f"FFN block {parent!r} ({type(root).__name__}) takes no input")
            return _recognise(parent, parent, root, graph, x, ())
        except InjectionError as e:
            error = e
    owners = sorted({_child_of(parent, n) for n in linears})
    nested = any(_child_of(parent, n) != (n[len(parent) + 1:] if parent else n) for n in linears)
    if len(owners) == 2 and nested:
        return _trace_split(parent, root, owners, error)
    raise error


def _child_of(parent: str, name: str) -> str:
    rest = name[len(parent) + 1:] if parent else name
    return rest.split(".")[0]


def _trace_split(parent: str, root: nn.Module, owners: list[str], error: InjectionError) -> TracedBlock:
    """The FFN spans two children of ``root``: find the method calling ``first(x)`` then
    ``second(first(x), ...)``, and make the second child the routed block."""
    children = tuple(root.get_submodule(o) for o in owners)
    for method in _candidate_methods(root):
        try:
            wiring = _trace_method(root, method, children)
        except Exception:  # noqa: BLE001 - a method that does not trace is not the FFN path
            continue
        chain = _two_call_chain(wiring, owners)
        if chain is None:
            continue
        first, second, position = chain
        graph = _trace_method(root, method)
        x = next(n for n in graph.nodes if n.op == "placeholder")
        _take_signature(graph, x, root.get_submodule(second), position)
        join = (lambda c: f"{parent}.{c}") if parent else (lambda c: c)
        return _recognise(join(second), parent, root, graph, x, (join(first),))
    raise InjectionError(
        f"{error}\nIts FFN linears sit in the children {owners} of {parent!r}, and no method of "
        f"{type(root).__name__} that torch.fx can trace calls exactly those two one after the other; "
        "target the linears of one MLP module, or use scope 'linear'")


def _take_signature(graph: fx.Graph, x: fx.Node, module: nn.Module, position: int) -> None:
    """Give the graph the positional signature of ``module.forward``, ``x`` at ``position``;
    the other inputs are the same tensor as ``x`` in the traced method, so they go unread."""
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    x.target = params[position]
    with graph.inserting_before(x):
        for name in params[:position]:
            graph.placeholder(name)
    anchor = x
    for name in params[position + 1:]:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)


def _candidate_methods(root: nn.Module) -> list[str]:
    """Methods defined by the block's own class (not ``nn.Module``'s) taking one positional input."""
    out = []
    for cls in type(root).__mro__:
        if cls is nn.Module:
            break
        for name, fn in vars(cls).items():
            if name.startswith("_") or not inspect.isfunction(fn) or name in out:
                continue
            params = list(inspect.signature(fn).parameters.values())[1:]
            required = [p for p in params if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
            if len(required) == 1:
                out.append(name)
    return sorted(out, key=lambda n: n == "forward")


def _two_call_chain(graph: fx.Graph, owners: list[str]) -> tuple[str, str, int] | None:
    """``(first, second, position)`` when the graph is exactly ``y = second(..., first(x), ...)``
    with every other input of ``second`` being ``x`` itself."""
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    places = [n for n in graph.nodes if n.op == "placeholder"]
    if len(calls) != 2 or len(places) != 1 or any(n.op != "call_module" for n in calls):
        return None
    first, second = calls
    if sorted((first.target, second.target)) != owners or first.args != (places[0],) or first.kwargs:
        return None
    if second.kwargs or first not in second.args:
        return None
    if any(a is not first and a is not places[0] for a in second.args):
        return None
    if len(first.users) != 1:
        return None
    return first.target, second.target, second.args.index(first)


# ---- recognising the expert region --------------------------------------------------------

def _linear_info(root: nn.Module, node: fx.Node, role: str) -> BlockLinear:
    m = root.get_submodule(node.target)
    d_in, d_out = linear_dims(m)  # type: ignore[misc]
    return BlockLinear(role=role, target=node.target, d_in=d_in, d_out=d_out,
                       bias=getattr(m, "bias", None) is not None, transposed=not isinstance(m, nn.Linear))


def _recognise(name: str, root_path: str, root: nn.Module, graph: fx.Graph, x: fx.Node,
               passthrough: tuple[str, ...]) -> TracedBlock:
    def fail(why: str) -> InjectionError:
        return InjectionError(f"FFN block {name!r} ({type(root).__name__}) is not a supported FFN: {why}. "
                              f"Traced graph:\n{graph}")

    lin = [n for n in graph.nodes if n.op == "call_module" and linear_dims(root.get_submodule(n.target))]
    readers = [n for n in lin if n.args and n.args[0] is x and len(n.args) == 1 and not n.kwargs]
    others = [n for n in lin if n not in readers]
    if len(others) != 1 or not readers:
        raise fail(f"expected linears reading the block input and one down projection, found "
                   f"{[n.target for n in readers]} reading it and {[n.target for n in others]} not")
    down = others[0]
    h = down.args[0]
    product = (isinstance(h, fx.Node) and len(h.args) == 2 and all(isinstance(a, fx.Node) for a in h.args)
               and ((h.op == "call_function" and h.target in _MUL)
                    or (h.op == "call_method" and h.target == "mul")))
    if len(readers) == 2:
        direct = [a for a in h.args if a in readers] if product else []
        if len(direct) != 1:
            raise fail("two linears read the block input, but the down projection does not read "
                       "act(gate(x)) * up(x)")
        up = direct[0]
        gate = next(r for r in readers if r is not up)
        act_region = _unary_region(root, gate, next(a for a in h.args if a is not up), fail)
        region, linears = [gate, up, *act_region, h, down], {"gate": gate, "up": up, "down": down}
    else:
        if len(readers) != 1:
            raise fail(f"{len(readers)} linears read the block input; an FFN has one (up) or two (gate, up)")
        up = readers[0]
        act_region = _unary_region(root, up, h, fail)
        region, linears = [up, *act_region, down], {"up": up, "down": down}
    _check_closed(region, down, fail)
    activation = _identify(root, linears.get("gate", up), act_region, fail)
    info = {role: _linear_info(root, n, role) for role, n in linears.items()}
    return TracedBlock(name=name, root_path=root_path, root=root, graph=graph, linears=info,
                       activation=activation, x=x, region=region, down=down, passthrough=passthrough)


def _unary_region(root: nn.Module, start: fx.Node, end: fx.Node, fail) -> list[fx.Node]:
    """The nodes computing ``end`` from ``start`` alone (the activation), in graph order."""
    region, frontier = [], [end]
    while frontier:
        n = frontier.pop()
        if n is start or n in region:
            continue
        if n.op not in ("call_function", "call_method", "call_module"):
            raise fail(f"the activation reads {n.op} {n.target!r}, not only the linear {start.target!r}")
        if n.op == "call_module" and isinstance(root.get_submodule(n.target), nn.modules.dropout._DropoutNd):
            raise fail(f"dropout ({n.target}) inside the FFN: routed experts are defined without it")
        region.append(n)
        frontier.extend(a for a in n.all_input_nodes)
    if not region:
        raise fail(f"no activation after {start.target!r}")
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(region, key=order.__getitem__)


def _check_closed(region: list[fx.Node], down: fx.Node, fail) -> None:
    inside = set(region)
    for n in region:
        if n is not down and any(u not in inside for u in n.users):
            outside = [u.name for u in n.users if u not in inside]
            raise fail(f"{n.name} is also read outside the FFN ({outside})")


def _identify(root: nn.Module, start: fx.Node, region: list[fx.Node], fail) -> str:
    """Evaluate the activation sub-graph on probe values and name it from the closed set."""
    g = fx.Graph()
    env = {start: g.placeholder("v")}
    for n in region:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[region[-1]])
    fn = fx.GraphModule(root, g)
    gen = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.linspace(-8, 8, 161, dtype=torch.float64), 3 * torch.randn(64, generator=gen,
                                                                                        dtype=torch.float64)])
    try:
        with torch.no_grad():
            got = fn(probe.reshape(-1, 5))
    except Exception as e:  # noqa: BLE001 - an activation that cannot run on probes is not recognised
        raise fail(f"its activation cannot be evaluated ({type(e).__name__}: {e})") from None
    for name in ACTIVATION_NAMES:
        want = block_activation(name, probe.reshape(-1, 5))
        if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-9,
                                                                                         atol=1e-12):
            return name
    raise fail(f"its activation ({', '.join(str(n.target) for n in region)}) is none of {ACTIVATION_NAMES}")
