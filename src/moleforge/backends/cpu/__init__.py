"""Compiled CPU kernels: the routed FFN-block experts fused token by token
(``routed_ffn.cpp``, custom ops ``moleforge_cpu::routed_ffn`` and its backward).

The source ships with the package and is compiled with ``torch.utils.cpp_extension`` the first
time a CPU block runs (about half a minute; the build is cached in torch's extensions directory,
``TORCH_EXTENSIONS_DIR``). Loops over a row of the FFN width are vectorised by the compiler,
with glibc's vector math library for ``exp`` and ``erf``; on x86-64 CPUs with AVX2 they are
built for AVX2 and FMA.

``MOLEFORGE_CPU_KERNELS=0`` turns the kernels off (the runtime ops then run torch ops, same
values); ``=1`` makes a failed build an error instead of a warning. Without a compiler, or on
a platform the build does not support, the torch ops run and one warning says why.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

__all__ = ["enabled", "load", "KernelBuildError"]

_SOURCE = Path(__file__).with_name("routed_ffn.cpp")


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded."""


def _flags() -> tuple[str, list[str]]:
    """The extension's name (one per instruction set, so builds for different CPUs never mix)
    and its compiler flags."""
    flags = ["-O3", "-fopenmp", "-fopenmp-simd", "-fno-math-errno"]
    isa = "generic"
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
        isa = "avx2"
    return f"moleforge_cpu_{isa}", flags


_state: dict[str, bool | None] = {"usable": None}
"""Whether the kernels are built and loaded: ``None`` until the first CPU block asks."""


@functools.cache
def load() -> None:
    """Compile (once per machine) and load the kernels, registering the ``moleforge_cpu`` ops and
    their fake (shape) implementations for ``torch.compile``.

    Raises:
        KernelBuildError: the build or the load failed; the message carries the compiler's.
    """
    if sys.platform != "linux":
        raise KernelBuildError(f"the CPU kernels are built on Linux only (this is {sys.platform})")
    from torch.utils import cpp_extension

    name, flags = _flags()
    scripts = sysconfig.get_path("scripts")  # the environment's ninja, when it is not on PATH
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([path, scripts]) if path else scripts
    try:
        cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                           extra_ldflags=["-fopenmp", "-lmvec"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - compilers fail in many ways; report them as one
        raise KernelBuildError(f"building the moleforge CPU kernels ({_SOURCE.name}) failed: "
                               f"{type(e).__name__}: {e}") from e
    from .routed_ffn import register_fakes

    register_fakes()
    _state["usable"] = True


def _try_load(flag: str) -> bool:
    try:
        load()
    except KernelBuildError as e:
        if flag == "1":
            raise
        warnings.warn(f"{e}\nmoleforge runs the routed FFN blocks with torch ops instead (same values, slower). "
                      "Set MOLEFORGE_CPU_KERNELS=0 to skip the build and this warning.", RuntimeWarning,
                      stacklevel=4)
        _state["usable"] = False
    return bool(_state["usable"])


def enabled(x: torch.Tensor) -> bool:
    """Whether the runtime ops should run ``x``'s block with the CPU kernels: float32 or float64
    CPU tensors, unless ``MOLEFORGE_CPU_KERNELS`` is ``0`` or the build failed. The first such
    block builds the kernels; under ``torch.compile`` tracing they are used once built (a model
    compiled before any eager step runs the torch ops)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    flag = os.environ.get("MOLEFORGE_CPU_KERNELS", "")
    if flag == "0":
        return False
    usable = _state["usable"]
    if usable is None:
        if torch.compiler.is_compiling():
            return False
        usable = _try_load(flag)
    return usable
