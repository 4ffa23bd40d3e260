"""Triton kernels for fused routed low-rank nodes and residual-tree steps.

Layers, per kernel: the ``@triton.jit`` kernel, a launcher that validates shapes and picks
the grid, a ``torch.library.custom_op`` with fake (meta) and autograd registrations, and the
runtime op in ``backends/torch_fx`` that calls it when :func:`enabled` says so.

Kernels run on CUDA tensors. On a CPU they run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported), which is how the tests check them
against the torch ops; ``MOLEFORGE_TRITON=1`` makes :func:`enabled` choose them on any device
(for those tests), ``MOLEFORGE_TRITON=0`` never.

Kernels: ``grouped`` (launchers, custom ops ``moleforge::grouped_lowrank`` and its backward) with
``grouped_kernels`` (the ``@triton.jit`` code) for the sparse expert pool, which
``ops.grouped_mix`` calls for float32, float16 and bfloat16; ``tree`` (custom op
``moleforge::tree_node_mix``) with ``tree_kernels`` for a residual-tree level's node step, which
``ops_tree_prop.propagate_all`` calls. Those modules import Triton; they are imported only once
:func:`enabled` has said yes, so this package imports without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["available", "enabled", "check_device"]


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def enabled(x: torch.Tensor) -> bool:
    """Whether the runtime ops should run ``x``'s computation with the Triton kernels: on a
    CUDA tensor when Triton is installed, unless ``MOLEFORGE_TRITON`` is ``0``; anywhere when
    it is ``1``."""
    flag = os.environ.get("MOLEFORGE_TRITON", "")
    if flag == "0" or (flag != "1" and not x.is_cuda):
        return False
    return available()


def check_device(op: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``x`` is on a device the kernels cannot run on: they need a
    CUDA tensor, or Triton's CPU interpreter."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"{op}: the Triton kernels got a tensor on {x.device}; they run on CUDA tensors, or on the "
                     "CPU in Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported). Leave "
                     "MOLEFORGE_TRITON unset (or 0) to run the torch ops instead")
