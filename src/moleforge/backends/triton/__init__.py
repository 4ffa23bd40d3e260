"""Triton kernels for fused routed low-rank nodes and residual-tree steps.

Layers, per kernel: the ``@triton.jit`` kernel, a launcher that validates shapes and picks
the grid, a ``torch.library.custom_op`` with fake (meta) and autograd registrations, and the
runtime op in ``backends/runtime`` that calls it when the module's kernel policy
(``backends/runtime/policy.py``) chooses it.

Kernels run on CUDA tensors. On a CPU they run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported), which is how the tests check them
against the torch ops. They have not yet been verified on a GPU, so the policy runs them only
when asked (``MOLEFORGE_TRITON=1`` or ``KernelPolicy(triton="on")``): on CUDA tensors, and on CPU
tensors in the interpreter.

Kernels: ``grouped`` (launchers, custom ops ``moleforge::grouped_lowrank`` and its backward) with
``grouped_kernels`` (the ``@triton.jit`` code) for the sparse expert pool, which
``ops.grouped_mix`` calls for float32, float16 and bfloat16; ``tree`` (custom op
``moleforge::tree_node_mix``) with ``tree_kernels`` for a residual-tree level's node step, which
``ops_tree_prop.propagate_all`` calls. Those modules import Triton; they are imported only once
the policy has chosen them, so this package imports without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["available", "check_device"]


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def check_device(op: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``x`` is on a device the kernels cannot run on: they need a
    CUDA tensor, or Triton's CPU interpreter."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"{op}: the Triton kernels got a tensor on {x.device}; they run on CUDA tensors, or on the "
                     "CPU in Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported). Leave "
                     "MOLEFORGE_TRITON unset (or 0) to run the torch ops there instead")
