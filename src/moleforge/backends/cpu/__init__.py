"""Compiled CPU kernels: the routed FFN-block experts fused token by token
(``routed_ffn.cpp``, custom ops ``moleforge_cpu::routed_ffn`` and its backward), and a residual
tree's routing and propagation for the few tokens of a decoding step (``tree_decode.cpp``,
``moleforge_cpu::tree_route`` and ``tree_propagate``, no autograd), and a routed LoRA pool's
decode step (``pool_decode.cpp``, ``moleforge_cpu::pool_decode``, no autograd), and its sparse
training step (``pool_sparse.cpp``: ``moleforge_cpu::pool_sparse``, and ``routed_pool`` with the router
and its gate in the same op, each with its backward).

The source ships with the package and is compiled with ``torch.utils.cpp_extension`` when a
module with routed FFN blocks or residual trees is lowered under a kernel policy that may choose the kernel
(:meth:`moleforge.backends.runtime.policy.KernelPolicy.with_cpu_build`; about half a minute the
first time, then cached in torch's extensions directory, ``TORCH_EXTENSIONS_DIR``), never in a
forward. Loops over a row of the FFN width are vectorised by the compiler, with glibc's vector
math library for ``exp`` and ``erf``; on x86-64 CPUs with AVX2 they are built for AVX2 and FMA.

``MOLEFORGE_CPU_KERNELS=0`` (read by ``KernelPolicy.from_env``) turns the kernels off and nothing
is built (the runtime ops then run torch ops, same values); ``=1`` makes a failed build an error
instead of a warning. Without a compiler, or on a platform the build does not support, the
torch ops run and one warning says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["build", "load", "supported", "KernelBuildError"]

_SOURCES = [Path(__file__).with_name(name)
            for name in ("routed_ffn.cpp", "tree_decode.cpp", "pool_decode.cpp", "pool_sparse.cpp")]


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


_state: dict[str, object] = {"usable": None, "error": None}
"""The build's outcome in this process: ``usable`` is ``None`` until :func:`build` ran, then
whether the kernels are loaded; ``error`` the :class:`KernelBuildError` of a failed build."""


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``. When ``ninja`` is not on it
    but in this environment's scripts folder (a virtual environment used without activating it),
    that folder is appended for the build only and ``PATH`` is restored exactly afterwards."""
    scripts = sysconfig.get_path("scripts")
    old = os.environ.get("PATH")
    if shutil.which("ninja") is not None or not scripts or shutil.which("ninja", path=scripts) is None:
        yield
        return
    os.environ["PATH"] = os.pathsep.join([old, scripts]) if old else scripts
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


def supported() -> bool:
    """Whether this platform can build the kernels (Linux); a compiler may still be missing."""
    return sys.platform == "linux"


@functools.cache
def load() -> None:
    """Compile (once per machine) and load the kernels, registering the ``moleforge_cpu`` ops and
    their fake (shape) implementations for ``torch.compile``.

    Raises:
        KernelBuildError: the build or the load failed; the message carries the compiler's.
    """
    if not supported():
        raise KernelBuildError(f"the CPU kernels are built on Linux only (this is {sys.platform})")
    from torch.utils import cpp_extension

    name, flags = _flags()
    try:
        with _ninja_on_path():
            cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                               extra_ldflags=["-fopenmp", "-lmvec"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - compilers fail in many ways; report them as one
        raise KernelBuildError(f"building the moleforge CPU kernels ({', '.join(p.name for p in _SOURCES)}) failed: "
                               f"{type(e).__name__}: {e}") from e
    from . import pool_sparse, routed_ffn

    routed_ffn.register_fakes()
    pool_sparse.register_fakes()


def build(required: bool = False) -> bool:
    """Build and load the kernels once per process; whether they are usable.

    Called when a module is lowered (``KernelPolicy.with_cpu_build``), never in a forward. A
    failed build warns once (later calls return ``False`` quietly) unless ``required``
    (``MOLEFORGE_CPU_KERNELS=1``), which raises its :class:`KernelBuildError`, now or later.
    """
    if _state["usable"] is None:
        try:
            load()
            _state["usable"] = True
        except KernelBuildError as e:
            _state["usable"], _state["error"] = False, e
            if not required:
                warnings.warn(f"{e}\nmoleforge runs the routed FFN blocks, residual trees and sparse pools with "
                              "torch ops instead (same values, slower). Set MOLEFORGE_CPU_KERNELS=0 to skip the build "
                              "and this warning.",
                              RuntimeWarning, stacklevel=3)
    if not _state["usable"] and required:
        raise _state["error"]  # type: ignore[misc]
    return bool(_state["usable"])
