"""Which kernel runs each routed hot spot: the explicit kernel policy.

A :class:`KernelPolicy` is decided once, before lowering (``KernelPolicy.from_env()`` reads the
environment, the only place that does), and lowering stores it on the generated module as the
constant attribute ``kernel_policy``. The runtime ops that have a kernel choice receive it as an
argument and ask it with their tensor's device and dtype only, so a forward reads no environment
variable, builds nothing and keeps no global state: the same module and inputs run the same
kernel whatever ran before, eagerly or under ``torch.compile``.

Op families and their kernels:

- sparse pools (``ops.grouped_mix``): the Triton grouped low-rank op (``backends/triton/grouped.py``),
  the compiled C++ CPU kernel (``backends/cpu/pool_sparse.py``, forward and backward) or torch ops;
- residual trees (``ops_tree_prop.propagate_all``): the Triton node-mix op
  (``backends/triton/tree.py``) or torch ops; at decode sizes without autograd, the compiled C++
  CPU kernel routes and propagates (``backends/cpu/tree_decode.py``);
- routed FFN blocks (``ops_block.routed_ffn``): the compiled C++ CPU kernel (``backends/cpu``) or
  torch ops;
- routed LoRA pools at decode sizes without autograd (``ops_decode.decode_step``): the compiled
  C++ CPU kernel (``backends/cpu/pool_decode.py``) or the generated forward.

``auto`` picks a kernel on a device only once its tests have passed there (``-m gpu`` for CUDA,
results committed): :data:`TRITON_VERIFIED_DEVICES` lists those devices, none yet, so CUDA runs
the torch ops unless Triton is asked for (``MOLEFORGE_TRITON=1``). The CPU kernel is verified on
CPUs and is chosen there for float32 and float64 once it has been built, which lowering does
(:meth:`KernelPolicy.with_cpu_build`), never a forward.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Collection, Literal, Mapping

import torch

from .. import cpu as cpu_kernels
from .. import triton as triton_backend

__all__ = ["KernelPolicy", "TORCH_OPS", "DECODE_TOKENS", "TRITON_VERIFIED_DEVICES", "TRITON_DTYPES",
           "CPU_KERNEL_DTYPES", "INTERPRETER_EXCLUDED_DTYPES", "Setting"]

Setting = Literal["auto", "on", "off"]

TRITON_VERIFIED_DEVICES: frozenset[str] = frozenset()
"""Device types on which the Triton kernels' tests (``pytest -m gpu``) have passed, with the
results committed; ``auto`` runs them there only. Empty: they have run in Triton's CPU
interpreter only, so CUDA runs the torch ops by default."""

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes of the Triton grouped low-rank op (the tree op takes any floating dtype)."""

CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
"""Dtypes of the compiled CPU kernel."""

INTERPRETER_EXCLUDED_DTYPES = (torch.bfloat16,)
"""Dtypes Triton's CPU interpreter gets wrong (NumPy has no bfloat16: the grouped op returns
garbage, the tree op raises), so CPU tensors of them run the torch ops even with ``"on"``."""

DECODE_TOKENS = 16
"""Default :attr:`KernelPolicy.decode_tokens`: at up to 16 tokens a site's fixed costs (sorting,
gathers, kernel launches) outweigh the dense form's extra ``T·(E - k)·r·(d_in + d_out)``
multiply-adds for every pool of the presets (``benchmarks/generate.py``)."""

_SETTINGS = ("auto", "on", "off")
_ENV_VALUES: Mapping[str, Setting] = {"": "auto", "auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}
_ENV_MEANING = {
    "MOLEFORGE_TRITON": "1 (the Triton kernels on every device they can run on), 0 (never), or auto / unset "
                        "(only on devices where their tests have passed)",
    "MOLEFORGE_CPU_KERNELS": "1 (the CPU kernel, a failed build is an error), 0 (never, nothing is built), or "
                             "auto / unset (the CPU kernel when it builds, else one warning and the torch ops)",
}


def _from_env(env: Mapping[str, str], name: str) -> Setting:
    raw = env.get(name, "")
    value = _ENV_VALUES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"{name}={raw!r} is not a valid value; use {_ENV_MEANING[name]}")
    return value


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


@dataclass(frozen=True)
class KernelPolicy:
    """Which kernels the generated modules run: a constant of each module (``gm.kernel_policy``).

    Attributes:
        triton: ``"on"``: the Triton kernels on CUDA tensors, and on CPU tensors in Triton's
            interpreter (``interpret``); ``"off"``: never; ``"auto"``: on the devices of
            :data:`TRITON_VERIFIED_DEVICES` only (none yet).
        cpu: the compiled CPU kernel of routed FFN blocks: ``"auto"``: when it builds, ``"on"``:
            a failed build is an error, ``"off"``: never (nothing is built).
        interpret: Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, as in the tests),
            so ``"on"`` also runs the Triton kernels on CPU tensors.
        has_triton: Triton can be imported (found once when the policy is made).
        cpu_built: the CPU kernel's build outcome: ``None`` until :meth:`with_cpu_build` (at
            lowering) tried it, then whether it is loaded. Only a built kernel is chosen.
        decode_tokens: the decode path runs at a site that sees at most this many tokens (rows
            of its input; one per sequence in a decoding step): sparse pools compute all
            experts in one dense GEMM and gate afterwards (no sort, gather or scatter); with
            autograd off, weight-only tensors are kept between calls (``packed.py``). ``0``: never.
    """

    triton: Setting = "auto"
    cpu: Setting = "auto"
    interpret: bool = False
    has_triton: bool = field(default_factory=triton_backend.available)
    cpu_built: bool | None = None
    decode_tokens: int = DECODE_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.decode_tokens, int) or self.decode_tokens < 0:
            raise ValueError(f"KernelPolicy.decode_tokens={self.decode_tokens!r}; expected a token count >= 0 "
                             f"(0 turns the decode path off)")
        for name in ("triton", "cpu"):
            value = getattr(self, name)
            if value not in _SETTINGS:
                raise ValueError(f"KernelPolicy.{name}={value!r}; expected one of {', '.join(_SETTINGS)}")
        if self.triton == "on" and not self.has_triton:
            raise ValueError("the kernel policy asks for the Triton kernels (MOLEFORGE_TRITON=1 or triton='on') "
                             "but Triton is not installed; install it or leave MOLEFORGE_TRITON unset")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, has_triton: bool | None = None) -> KernelPolicy:
        """The policy the environment asks for: ``MOLEFORGE_TRITON``, ``MOLEFORGE_CPU_KERNELS``
        (each ``1``, ``0``, ``auto`` or unset) and Triton's ``TRITON_INTERPRET``. Read here once;
        lowering calls this when it is given no policy. ``env`` defaults to ``os.environ``;
        ``has_triton`` to whether Triton can be imported.

        Raises:
            ValueError: a variable has another value; the message names it, its value and the
                allowed ones.
        """
        env = os.environ if env is None else env
        return cls(triton=_from_env(env, "MOLEFORGE_TRITON"), cpu=_from_env(env, "MOLEFORGE_CPU_KERNELS"),
                   interpret=env.get("TRITON_INTERPRET", "") == "1",
                   has_triton=triton_backend.available() if has_triton is None else has_triton)

    # ---- decisions: pure functions of the policy, a device and a dtype ----------------------

    def triton_on(self, device: torch.device | str) -> bool:
        """Whether the Triton kernels run on tensors of ``device`` (any dtype they take)."""
        if self.triton == "off" or not self.has_triton:
            return False
        kind = _device_type(device)
        if self.triton == "auto":
            return kind in TRITON_VERIFIED_DEVICES
        return kind == "cuda" or (kind == "cpu" and self.interpret)

    def _triton_for(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        if dtype in INTERPRETER_EXCLUDED_DTYPES and _device_type(device) == "cpu":
            return False
        return self.triton_on(device)

    def grouped_kernel(self, device: torch.device | str, dtype: torch.dtype) -> Literal["triton", "cpu", "torch"]:
        """The sparse pool's kernel (``ops.grouped_mix``) for ``x`` on ``device`` of ``dtype``: Triton
        where it runs, else the compiled CPU kernel on CPU float32/float64 once built
        (``backends/cpu/pool_sparse.py``), else torch ops."""
        if dtype in TRITON_DTYPES and self._triton_for(device, dtype):
            return "triton"
        return "cpu" if self.routed_ffn_kernel(device, dtype) == "cpu" else "torch"

    def plans_cpu_pools(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether sparse pools on ``device`` of ``dtype`` will run the compiled CPU kernel once
        lowering has built it: what the planner prices their grouped form by
        (``passes.ChoosePoolKernels.kernel``), before the build."""
        if self.cpu_built is False or not cpu_kernels.supported():
            return False
        return dataclasses.replace(self, cpu_built=True).grouped_kernel(device, dtype) == "cpu"

    def tree_kernel(self, device: torch.device | str, dtype: torch.dtype) -> Literal["triton", "torch"]:
        """The residual tree's node step (``ops_tree_prop.propagate_all``) for hidden states on
        ``device`` of ``dtype``."""
        return "triton" if dtype.is_floating_point and self._triton_for(device, dtype) else "torch"

    def routed_ffn_kernel(self, device: torch.device | str, dtype: torch.dtype) -> Literal["cpu", "torch"]:
        """The routed FFN block's kernel (``ops_block.routed_ffn``) for frozen projections on
        ``device`` of ``dtype``: the CPU kernel on CPU float32/float64 once built."""
        usable = self.cpu != "off" and self.cpu_built is True
        return "cpu" if usable and _device_type(device) == "cpu" and dtype in CPU_KERNEL_DTYPES else "torch"

    def decode_kernel(self, device: torch.device | str, dtype: torch.dtype,
                      tokens: int) -> Literal["cpu", "torch"]:
        """The decode kernels' choice without autograd at ``tokens`` tokens: a residual tree's routing
        and propagation (``backends/cpu/tree_decode.py``) and a routed LoRA pool's decode form
        (``backends/cpu/pool_decode.py``) run the CPU kernel on CPU float32/float64 at decode sizes
        once built; else the torch ops (the generated forward)."""
        return "cpu" if self.decode(tokens) and self.routed_ffn_kernel(device, dtype) == "cpu" else "torch"

    def decode(self, tokens: int) -> bool:
        """Whether a site seeing ``tokens`` tokens takes the decode path."""
        return tokens <= self.decode_tokens

    # ---- the CPU kernel's build, at lowering -------------------------------------------------

    def wants_cpu_build(self) -> bool:
        """Whether a module with routed FFN blocks that may run on a CPU should have the CPU
        kernel built when it is lowered (it is not built yet and not turned off)."""
        return self.cpu != "off" and self.cpu_built is None

    def with_cpu_build(self) -> KernelPolicy:
        """This policy with the CPU kernel built (once per process, cached on disk) and the
        outcome recorded in ``cpu_built``. Called by lowering, never in a forward.

        A failed build warns once and the torch ops run; with ``cpu="on"`` it raises
        :class:`moleforge.backends.cpu.KernelBuildError`.
        """
        if not self.wants_cpu_build():
            return self
        return dataclasses.replace(self, cpu_built=cpu_kernels.build(required=self.cpu == "on"))

    # ---- for explain ----------------------------------------------------------------------------

    def describe(self, families: Collection[str] | None = None) -> list[str]:
        """One line per op family: the kernel on CPU and on CUDA tensors and how to change it,
        e.g. ``sparse pools: torch ops (Triton opt-in: MOLEFORGE_TRITON=1; not yet verified on
        CUDA)``. ``families``: some of ``"grouped"`` (sparse pools), ``"tree"`` (residual trees),
        ``"routed_ffn"`` (routed FFN blocks), ``"decode"`` (the decode path), in that order;
        default all."""
        lines = {"grouped": f"sparse pools: {self._grouped_text()}",
                 "tree": f"residual trees: {self._triton_text('floating dtypes')}",
                 "routed_ffn": f"routed FFN blocks: {self._cpu_text()}",
                 "decode": f"decode path: {self._decode_text()}"}
        unknown = set(families or ()) - lines.keys()
        if unknown:
            raise ValueError(f"unknown op families {sorted(unknown)}; expected some of {list(lines)}")
        return [line for key, line in lines.items() if families is None or key in families]

    def _triton_text(self, dtypes: str) -> str:
        unverified = sorted({"cuda"} - TRITON_VERIFIED_DEVICES)
        note = f"; not yet verified on {', '.join(d.upper() for d in unverified)}" if unverified else ""
        if self.triton == "off":
            return f"torch ops (Triton off: MOLEFORGE_TRITON=0{note})"
        if not self.has_triton:
            return "torch ops (Triton is not installed)"
        on = [d.upper() for d in ("cuda", "cpu") if self.triton_on(d)]
        if not on:
            return f"torch ops (Triton opt-in: MOLEFORGE_TRITON=1{note})"
        where = " and ".join(on) + (" (Triton's interpreter, not bfloat16)" if "CPU" in on else "")
        why = "MOLEFORGE_TRITON=1" if self.triton == "on" else "verified"
        return f"Triton kernels on {where} tensors of {dtypes} ({why}{note}), torch ops elsewhere"

    def _grouped_text(self) -> str:
        triton = self._triton_text("float32, float16 and bfloat16")
        if self.cpu == "off" or self.cpu_built is False:
            return triton
        return f"{triton}; where Triton does not run, the compiled CPU kernel on CPU float32/float64 tensors " \
               "(forward and backward)"

    def _decode_text(self) -> str:
        packed = ("without autograd, weights packed once and kept between calls; no aux losses in evaluation "
                  "mode without autograd (handle.eval_aux asks for them)")
        if self.decode_tokens == 0:
            return f"off (decode_tokens=0): sparse pools in their planned form at every size; {packed}"
        trees = ("; residual trees routed and propagated, and routed LoRA pools (softmax top-k or dense gate) "
                 "routed and mixed over each token's selected experts, by the compiled CPU kernel on CPU "
                 "float32/float64" if self.cpu != "off" and self.cpu_built is not False else "")
        return (f"sparse pools at <= {self.decode_tokens} tokens per site as one dense GEMM of all experts, gated "
                f"after (no sort, gather or scatter), in their planned form above{trees}; {packed}")

    def _cpu_text(self) -> str:
        if self.cpu == "off":
            return "torch ops (CPU kernel off: MOLEFORGE_CPU_KERNELS=0)"
        state = {None: "built when a routed FFN block, a residual tree or a routed LoRA pool is lowered for a CPU",
                 True: "built",
                 False: "its build failed"}[self.cpu_built]
        if self.cpu_built is False:
            return f"torch ops (the compiled CPU kernel: {state})"
        return f"compiled CPU kernel on CPU float32/float64 tensors ({state}), torch ops elsewhere"


TORCH_OPS = KernelPolicy(triton="off", cpu="off", decode_tokens=0)
"""The policy that runs the torch ops everywhere, each op in the form it names at every size (no
decode path): the default of a runtime op called directly."""
