"""Find sibling sites on a model: adapted linears that read the same tensor (q/k/v of an
attention block, gate/up of a gated MLP), so ``fuse_sibling_sites`` can give them one GEMM.

Siblings are a fact of the model's dataflow, not of module names. Two ways to observe it, both
on the model's own ``dummy_inputs``, neither changing the model:

- ``"hooks"`` (default, milliseconds): one forward in eval mode without gradients; a pre-hook
  on each candidate linear records the input tensor it receives; linears that receive the very
  same tensor object are siblings.
- ``"export"`` (seconds): non-strict ``torch.export``; ``aten.linear`` calls are grouped by
  their input node and mapped back to modules through their weight parameters.

Linears reading different tensors are never grouped; and since the runtime group checks the
tensor identity on every call, a grouping can only cost speed, never change a result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

__all__ = ["SiblingReport", "find_siblings"]


@dataclass(frozen=True)
class SiblingReport:
    groups: list[list[str]] = field(default_factory=list)
    """Module names per group, in model order; each group has at least two."""
    note: str = ""
    """Why no groups were looked for, when that is the case."""


def find_siblings(model: nn.Module, names: Sequence[str], method: Literal["hooks", "export"] = "hooks"
                  ) -> SiblingReport:
    """Groups of ``names`` (module names of linears) that read the same tensor in ``model``."""
    by_width: dict[int, list[str]] = defaultdict(list)
    for name in names:
        by_width[_in_features(model.get_submodule(name))].append(name)
    if all(len(v) < 2 for v in by_width.values()):
        return SiblingReport(note="no two adapted linears have the same input width")
    inputs = getattr(model, "dummy_inputs", None)
    if not isinstance(inputs, dict) or not inputs:
        return SiblingReport(note=f"{type(model).__name__} has no dummy_inputs to trace")
    try:
        seen = _by_hooks(model, names, inputs) if method == "hooks" else _by_export(model, names, inputs)
    except Exception as e:  # noqa: BLE001 - discovery is an optimisation; say why it was skipped
        return SiblingReport(note=f"tracing {type(model).__name__} with its dummy_inputs failed: {e}")
    order = {n: i for i, n in enumerate(names)}
    groups = [part for g in seen for part in _same_placement(model, sorted(set(g), key=order.__getitem__))]
    return SiblingReport(groups=sorted((g for g in groups if len(g) > 1), key=lambda g: order[g[0]]))


def _same_placement(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Split a group by the device and dtype of its weights (one GEMM needs one of each)."""
    parts: dict[tuple, list[str]] = defaultdict(list)
    for n in names:
        w = model.get_submodule(n).weight
        parts[(w.device, w.dtype)].append(n)
    return list(parts.values())


def _in_features(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or w is None:
        return getattr(module, "in_features", -1)
    return int(w.shape[0])  # GPT-2 Conv1D stores (in, out)


def _device_inputs(model: nn.Module, inputs: dict) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _by_hooks(model: nn.Module, names: Sequence[str], inputs: dict) -> list[list[str]]:
    received: dict[int, list[str]] = defaultdict(list)
    alive: list[torch.Tensor] = []  # keeps every seen input alive so ids stay unique

    def hook(name):
        def record(module, args):
            alive.append(args[0])
            received[id(args[0])].append(name)
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(**_device_inputs(model, inputs))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return list(received.values())


def _by_export(model: nn.Module, names: Sequence[str], inputs: dict) -> list[list[str]]:
    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, kwargs: dict):
            out = self.inner(**kwargs)
            return out[0] if isinstance(out, tuple) else out.to_tuple()[0]

    wanted = {f"inner.{n}.weight": n for n in names}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            program = torch.export.export(_Logits(model), (_device_inputs(model, inputs),), strict=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    params = program.graph_signature.inputs_to_parameters
    readers: dict[str, list[str]] = defaultdict(list)
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            module = wanted.get(params.get(node.args[1].name, ""))
            if module is not None:
                readers[node.args[0].name].append(module)
    return list(readers.values())
