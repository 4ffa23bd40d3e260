"""The kernel policy (``backends/runtime/policy.py``): the environment read once with clear errors,
the decision per op family × device × dtype × setting, lowering baking it into the module, and a
forward that reads no environment variable."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import pytest
import torch

import moleforge as mf
from models import batch, tiny
from moleforge.backends.runtime import policy as policy_mod
from moleforge.backends.runtime.policy import TORCH_OPS, TRITON_VERIFIED_DEVICES, KernelPolicy
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.passes import group_pools

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# ---- reading the environment ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "setting"), [(None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "on"),
                                                ("on", "on"), ("0", "off"), ("off", "off"), (" OFF ", "off")])
def test_from_env_reads_both_variables(value, setting):
    env = {} if value is None else {"MOLEFORGE_TRITON": value, "MOLEFORGE_CPU_KERNELS": value}
    p = KernelPolicy.from_env(env, has_triton=True)
    assert (p.triton, p.cpu, p.interpret, p.cpu_built) == (setting, setting, False, None)


def test_from_env_reads_tritons_interpreter_flag():
    assert KernelPolicy.from_env({"TRITON_INTERPRET": "1"}).interpret
    assert not KernelPolicy.from_env({"TRITON_INTERPRET": "0"}).interpret


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MOLEFORGE_TRITON", "0")
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "1")
    p = KernelPolicy.from_env()
    assert (p.triton, p.cpu) == ("off", "on")


@pytest.mark.parametrize("name", ["MOLEFORGE_TRITON", "MOLEFORGE_CPU_KERNELS"])
@pytest.mark.parametrize("value", ["yes", "2", "true", "o n"])
def test_an_invalid_value_names_the_variable_its_value_and_the_allowed_ones(name, value):
    with pytest.raises(ValueError, match=rf"^{name}='{value}' is not a valid value; use 1 \(.*\), 0 \(.*\), or "
                                         r"auto / unset"):
        KernelPolicy.from_env({name: value})


def test_an_invalid_setting_is_refused():
    with pytest.raises(ValueError, match=r"KernelPolicy.cpu='maybe'; expected one of auto, on, off"):
        KernelPolicy(cpu="maybe")  # type: ignore[arg-type]


def test_triton_on_without_triton_is_an_error():
    with pytest.raises(ValueError, match="MOLEFORGE_TRITON=1.*Triton is not installed"):
        KernelPolicy(triton="on", has_triton=False)
    with pytest.raises(ValueError, match="Triton is not installed"):
        KernelPolicy.from_env({"MOLEFORGE_TRITON": "1"}, has_triton=False)


# ---- decisions ------------------------------------------------------------------------------

CUDA_TRITON_AUTO = "triton" if "cuda" in TRITON_VERIFIED_DEVICES else "torch"

# (triton setting, interpret, device, dtype) -> (grouped kernel, tree kernel)
TRITON_TABLE = [
    ("auto", False, "cuda", F32, CUDA_TRITON_AUTO, CUDA_TRITON_AUTO),
    ("auto", False, "cuda", BF16, CUDA_TRITON_AUTO, CUDA_TRITON_AUTO),
    ("auto", False, "cuda", F64, "torch", CUDA_TRITON_AUTO),
    ("auto", True, "cpu", F32, "torch", "torch"),
    ("auto", False, "cpu", F32, "torch", "torch"),
    ("on", False, "cuda", F32, "triton", "triton"),
    ("on", False, "cuda", F16, "triton", "triton"),
    ("on", False, "cuda", BF16, "triton", "triton"),
    ("on", False, "cuda", F64, "torch", "triton"),
    ("on", False, "cpu", F32, "torch", "torch"),
    ("on", True, "cpu", F32, "triton", "triton"),
    ("on", True, "cpu", F64, "torch", "triton"),
    ("on", True, "cpu", F16, "triton", "triton"),
    ("on", True, "cpu", BF16, "torch", "torch"),  # the interpreter gets bfloat16 wrong
    ("on", True, "meta", F32, "torch", "torch"),
    ("off", True, "cpu", F32, "torch", "torch"),
    ("off", False, "cuda", F32, "torch", "torch"),
    ("off", False, "cuda", BF16, "torch", "torch"),
]


@pytest.mark.parametrize(("setting", "interpret", "device", "dtype", "grouped", "tree"), TRITON_TABLE)
def test_triton_decisions(setting, interpret, device, dtype, grouped, tree):
    p = KernelPolicy(triton=setting, interpret=interpret, has_triton=True)
    assert p.grouped_kernel(torch.device(device), dtype) == grouped
    assert p.tree_kernel(device, dtype) == tree
    assert p.routed_ffn_kernel(device, dtype) == "torch"  # never built here


def test_cuda_runs_torch_ops_by_default_until_verified():
    """No Triton kernel has passed its tests on a GPU yet: ``auto`` runs the torch ops there."""
    assert TRITON_VERIFIED_DEVICES == frozenset()
    p = KernelPolicy.from_env({}, has_triton=True)
    assert p.grouped_kernel("cuda", F32) == p.tree_kernel("cuda", F32) == "torch"


def test_verified_devices_run_triton_under_auto(monkeypatch):
    monkeypatch.setattr(policy_mod, "TRITON_VERIFIED_DEVICES", frozenset({"cuda"}))
    p = KernelPolicy(has_triton=True)
    assert p.grouped_kernel("cuda", F32) == p.tree_kernel("cuda", BF16) == "triton"
    assert p.grouped_kernel("cpu", F32) == "torch"
    assert KernelPolicy(has_triton=False).grouped_kernel("cuda", F32) == "torch"
    assert "Triton kernels on CUDA" in p.describe()[0] and "verified" in p.describe()[0]


# (cpu setting, built) x (device, dtype) -> routed FFN kernel
@pytest.mark.parametrize(("setting", "built", "device", "dtype", "kernel"), [
    ("auto", True, "cpu", F32, "cpu"),
    ("auto", True, "cpu", F64, "cpu"),
    ("auto", True, "cpu", BF16, "torch"),
    ("auto", True, "cpu", F16, "torch"),
    ("auto", True, "cuda", F32, "torch"),
    ("auto", None, "cpu", F32, "torch"),  # not built: never built in a forward
    ("auto", False, "cpu", F32, "torch"),  # the build failed
    ("on", True, "cpu", F64, "cpu"),
    ("on", True, "cuda", F64, "torch"),
    ("off", True, "cpu", F32, "torch"),
])
def test_routed_ffn_decisions(setting, built, device, dtype, kernel):
    p = KernelPolicy(cpu=setting, cpu_built=built, has_triton=False)
    assert p.routed_ffn_kernel(torch.device(device), dtype) == kernel
    assert p.grouped_kernel(device, dtype) == kernel  # the sparse pools' CPU kernel: the same build, same choice
    assert p.tree_kernel(device, dtype) == "torch"


def test_with_cpu_build_records_the_outcome_once(monkeypatch):
    calls = []
    monkeypatch.setattr(policy_mod.cpu_kernels, "build", lambda required=False: calls.append(required) or True)
    built = KernelPolicy(cpu="on", has_triton=False).with_cpu_build()
    assert built.cpu_built is True and calls == [True]
    assert built.with_cpu_build() is built and calls == [True]
    assert KernelPolicy(cpu="off").with_cpu_build().cpu_built is None and calls == [True]
    assert KernelPolicy(cpu="auto").with_cpu_build().cpu_built is True and calls == [True, False]


def test_describe_one_line_per_op_family():
    lines = KernelPolicy(has_triton=True).describe()
    assert lines == [
        "sparse pools: torch ops (Triton opt-in: MOLEFORGE_TRITON=1; not yet verified on CUDA); where Triton does "
        "not run, the compiled CPU kernel on CPU float32/float64 tensors (forward and backward)",
        "residual trees: torch ops (Triton opt-in: MOLEFORGE_TRITON=1; not yet verified on CUDA)",
        "routed FFN blocks: compiled CPU kernel on CPU float32/float64 tensors (built when a routed FFN block, "
        "a residual tree or a routed LoRA pool is lowered for a CPU), torch ops elsewhere",
        "decode path: sparse pools at <= 16 tokens per site as one dense GEMM of all experts, gated after (no "
        "sort, gather or scatter), in their planned form above; residual trees routed and propagated, and routed "
        "LoRA pools (softmax top-k or dense gate) routed and mixed over each token's selected experts, by the "
        "compiled CPU kernel on CPU float32/float64; without autograd, weights packed once and kept "
        "between calls; no aux losses in evaluation mode without autograd (handle.eval_aux asks for them)",
    ]
    on = KernelPolicy(triton="on", cpu="off", has_triton=True).describe()
    assert on[0].startswith("sparse pools: Triton kernels on CUDA tensors of float32, float16 and bfloat16 "
                            "(MOLEFORGE_TRITON=1; not yet verified on CUDA), torch ops elsewhere")
    assert on[2] == "routed FFN blocks: torch ops (CPU kernel off: MOLEFORGE_CPU_KERNELS=0)"
    assert "Triton's interpreter" in KernelPolicy(triton="on", interpret=True, has_triton=True).describe()[1]
    assert KernelPolicy(triton="off").describe()[0].startswith("sparse pools: torch ops (Triton off")
    assert "compiled CPU kernel" not in KernelPolicy(cpu="off").describe()[0]
    assert "compiled CPU kernel" not in KernelPolicy(cpu_built=False).describe()[0]
    assert KernelPolicy(has_triton=False).describe()[1] == "residual trees: torch ops (Triton is not installed)"
    assert "(built)" in KernelPolicy(cpu_built=True).describe()[2]
    assert "by the compiled CPU kernel" in lines[3] and "routed LoRA pools" in lines[3]
    assert KernelPolicy(cpu_built=True).describe()[3] == lines[3]
    assert "compiled CPU kernel" not in KernelPolicy(cpu="off").describe()[3]
    assert "compiled CPU kernel" not in KernelPolicy(cpu_built=False).describe()[3]
    assert KernelPolicy(has_triton=True).describe(["routed_ffn", "grouped"]) == [lines[0], lines[2]]
    with pytest.raises(ValueError, match="unknown op families"):
        KernelPolicy().describe(["pools"])


# ---- lowering bakes the choice --------------------------------------------------------------

def _pool_graph():
    pool = mf.ExpertPool(experts=4, rank=2, alpha=4, router=mf.TopKRouter(k=2))
    return group_pools(build_graph(pool, SiteShape(label="site", d_in=8, d_out=6)))


def _store(graph):
    torch.manual_seed(0)
    store = ParamStore(graph.params, up="normal", std=0.3)
    return store


def test_lowering_keeps_the_policy_on_the_module_and_passes_it_to_the_ops():
    triton_on = KernelPolicy(triton="on", cpu="off", interpret=True, has_triton=True)
    gm = lower(_pool_graph(), _store(_pool_graph()), policy=triton_on)
    assert gm.kernel_policy is triton_on
    assert "grouped_mix(" in gm.code and "policy = kernel_policy" in gm.code
    assert "environ" not in gm.code


def test_lowering_without_a_policy_reads_the_environment_once(monkeypatch):
    reads = []
    real = KernelPolicy.from_env.__func__
    monkeypatch.setattr(KernelPolicy, "from_env", classmethod(lambda cls, *a, **k: reads.append(1) or real(cls)))
    monkeypatch.setenv("MOLEFORGE_TRITON", "0")
    gm = lower(_pool_graph(), _store(_pool_graph()))
    assert reads == [1] and gm.kernel_policy.triton == "off"


def _spy_grouped(monkeypatch) -> tuple[list, str]:
    """The Triton forward launches of the grouped op, recorded, and the device the kernels run on:
    CPU tensors in Triton's interpreter (the test conftest turns it on without CUDA), else CUDA."""
    from moleforge.backends.triton import grouped

    calls = []
    real = grouped.launch_forward
    monkeypatch.setattr(grouped, "launch_forward", lambda *a: calls.append(1) or real(*a))
    return calls, "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize(("setting", "launched"), [("off", False), ("on", True), ("auto", False)])
def test_lowering_with_an_explicit_policy_bakes_the_choice(monkeypatch, setting, launched):
    """Triton's interpreter is on (CPU tensors can run the kernels) and the environment says
    the opposite: the policy given to ``lower`` decides."""
    calls, device = _spy_grouped(monkeypatch)
    monkeypatch.setenv("MOLEFORGE_TRITON", "0" if launched else "1")
    graph = _pool_graph()
    policy = KernelPolicy(triton=setting, interpret=device == "cpu", decode_tokens=0)
    gm = lower(graph, _store(graph), policy=policy).to(device)
    gm(torch.randn(5, 8, device=device))
    assert bool(calls) == launched


class _Recording(MutableMapping):
    """``os.environ`` that records the names read."""

    def __init__(self, real):
        self.real, self.read = real, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.real[key]

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]

    def __iter__(self):
        return iter(self.real)

    def __len__(self):
        return len(self.real)

    def get(self, key, default=None):
        self.read.append(key)
        return self.real.get(key, default)

    def copy(self):
        return self.real.copy()


@pytest.mark.parametrize("flag", ["0", "1"])
def test_a_forward_reads_no_environment_variable_and_keeps_the_compile_time_choice(monkeypatch, flag):
    """Compiled with the kernels on (``1``) or off; the forward runs with the variables flipped
    and with ``os.environ`` recording: the choice made at compile time holds and no moleforge
    variable is read."""
    calls, _ = _spy_grouped(monkeypatch)  # CPU models: the kernels in Triton's interpreter
    from moleforge.backends.cpu import routed_ffn

    cpu_calls = []
    real_cpu = routed_ffn.token_routed_ffn
    monkeypatch.setattr("moleforge.backends.runtime.ops_block.token_routed_ffn",
                        lambda *a: cpu_calls.append(1) or real_cpu(*a))
    other = "0" if flag == "1" else "1"
    pool = mf.ExpertPool(experts=4, rank=4, alpha=8, router=mf.TopKRouter(k=2))
    monkeypatch.setenv("MOLEFORGE_TRITON", flag)
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", flag)
    pooled, blocks = tiny("llama", layers=1), tiny("llama", layers=1)
    mf.compile(mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), adapter=pool)]), pooled,
               passes=(group_pools,))
    mf.compile(mf.presets.load("mixlora"), blocks)
    monkeypatch.setenv("MOLEFORGE_TRITON", other)
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", other)
    recording = _Recording(os.environ)
    monkeypatch.setattr(os, "environ", recording)
    for model in (pooled, blocks):
        model(input_ids=batch(B=1, S=20)).logits.sum().backward()  # above the decode path's sizes
    monkeypatch.undo()
    assert bool(calls) == (flag == "1") and bool(cpu_calls) == (flag == "1")
    assert not [k for k in recording.read if k.startswith("MOLEFORGE_")], recording.read


def test_default_op_policy_runs_torch_ops():
    assert TORCH_OPS.grouped_kernel("cuda", F32) == TORCH_OPS.routed_ffn_kernel("cpu", F32) == "torch"
