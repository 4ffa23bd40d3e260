"""The compiled CPU kernel for routed FFN blocks (``backends/cpu``) against the torch ops of
``ops_block.routed_ffn``: outputs and the gradients of every input on random routings (gated and
plain blocks, every activation, each low-rank part present or not, widths spanning several
column tiles, one and two threads, with and without LoRA dropout on the same masks), a tiny
MixLoRA Llama end to end, ``opcheck`` and ``torch.compile``, the launcher's errors, the build at
lowering (never in a forward, ``PATH`` left as it was) and the fallback when it fails. The kernel is
chosen by an explicit kernel policy. The lowered block against the float64 interpreter, kernel on and
off: ``test_ffn_block_rewrites.py`` (and in training, with dropout: ``test_lowering_training.py``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moleforge as mf
from ffn_block_helpers import F64, cpu_policy
from models import batch, tiny
from moleforge.backends import cpu
from moleforge.backends.cpu import routed_ffn
from moleforge.backends.runtime import ops_block
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.integrations.ffn_trace import ACTIVATION_NAMES
from tolerances import assert_close


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


PATH_BEFORE_THE_BUILD = os.environ.get("PATH")


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu.build(required=True)  # compiles once per machine; a failure here is the test's failure


@contextlib.contextmanager
def counting():
    """Counts the kernel's forward and backward calls inside the block, so a test knows it ran."""
    count = {"forward": 0, "backward": 0}
    real = routed_ffn.TokenRoutedFFN

    class Spy(real):
        @staticmethod
        def forward(ctx, *args):
            count["forward"] += 1
            return real.forward(ctx, *args)

        @staticmethod
        def backward(ctx, *grads):
            count["backward"] += 1
            return real.backward(ctx, *grads)

    routed_ffn.TokenRoutedFFN = Spy
    try:
        yield count
    finally:
        routed_ffn.TokenRoutedFFN = real


@st.composite
def blocks(draw):
    """A routed block's inputs: routing, shared frozen projections, low-rank factors."""
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, min(3, E)))
    T, d, F = draw(st.integers(1, 40)), draw(st.integers(1, 12)), draw(st.sampled_from([1, 7, 33, 512, 700]))
    gated, activation = draw(st.booleans()), draw(st.sampled_from(ACTIVATION_NAMES))
    ranks = {p: draw(st.sampled_from([0, 1, 3, 5])) for p in ("up", "gate", "down")}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).requires_grad_()

    scores = torch.randn(T, E, generator=gen, dtype=F64)
    index = scores.topk(k, -1).indices
    inputs = {
        "x": rnd(T, d), "probs": scores.softmax(-1).requires_grad_(), "up_base": rnd(T, F),
        "gate_base": rnd(T, F) if gated else None,
    }
    lin = {}
    for p in ("up", "gate"):
        r = ranks[p]
        lin[p] = (None, None, rnd(E, r, d, scale=0.5), rnd(E, F, r, scale=0.5), 1.5) if r else (None, None, None,
                                                                                                  None, 1.0)
    D = draw(st.integers(1, 20))
    down = (rnd(E, ranks["down"], F, scale=0.5), rnd(E, D, ranks["down"], scale=0.5)) if ranks["down"] else None
    return dict(inputs=inputs, index=index, lin=lin, gated=gated, activation=activation, down=down)


def _run(b, flag: str, dtype=F64, dropout: tuple[float, int] | None = None):
    """``routed_ffn`` with the kernel on (``"1"``) or off, its outputs and every input's gradient; with
    ``dropout = (p, seed)`` in training with LoRA dropout, the masks drawn from a generator of that seed."""
    cast = {n: None if t is None else t.detach().to(dtype).requires_grad_() for n, t in b["inputs"].items()}
    lin = {p: tuple(v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v for v in args)
           for p, args in b["lin"].items()}
    down_a, down_b = (None, None) if b["down"] is None else (t.detach().to(dtype).requires_grad_() for t in b["down"])
    plan = ops_block.slot_plan(cast["probs"], b["index"])
    drop = None if dropout is None else (dropout[0], True, torch.Generator().manual_seed(dropout[1]))
    y, yd = ops_block.routed_ffn(cast["x"], plan, lin["up"], lin["gate"] if b["gated"] else None, cast["up_base"],
                                 cast["gate_base"], b["activation"], down_a, down_b, 0.75, policy=cpu_policy(flag),
                                 drop=drop)
    assert (yd is None) == (down_a is None)
    outs = [y] if yd is None else [y, yd]
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=F64).to(dtype)).sum() for t in outs)
    leaves = [t for t in (*cast.values(), *lin["up"][2:4], *lin["gate"][2:4], down_a, down_b) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [*outs, *[torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]]


@given(b=blocks())
def test_kernel_matches_torch_ops_float64(b):
    with counting() as calls:
        ref = _run(b, "0")
        assert calls["forward"] == 0
        got = _run(b, "1")
    assert calls == {"forward": 1, "backward": 1}
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close(g, r, msg=f"output/gradient #{i}")


@given(b=blocks())
def test_kernel_matches_torch_ops_float32_on_two_threads(b):
    with counting() as calls:
        ref = _run(b, "1")  # float64
        with threads(2):
            got = _run(b, "1", torch.float32)
    assert calls["forward"] == 2
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        scale = max([1.0, *r.abs().flatten().tolist()])  # sums over up to 700 columns
        assert_close(g / scale, r / scale, "float32", msg=f"output/gradient #{i}")


@given(b=blocks(), p=st.floats(0.05, 0.85), seed=st.integers(0, 2**16))
def test_kernel_matches_torch_ops_with_lora_dropout(b, p, seed):
    """Training with LoRA dropout: the kernel (the down LoRA's mask applied inside it) and the torch
    ops give the same outputs and gradients on the same masks (both against the interpreter:
    ``test_lowering_training.py``)."""
    with counting() as calls:
        ref = _run(b, "0", dropout=(p, seed))
        got = _run(b, "1", dropout=(p, seed))
    assert calls == {"forward": 1, "backward": 1}
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close(g, r, msg=f"output/gradient #{i}")


def test_mixlora_llama_same_logits_and_gradients_with_kernel(monkeypatch):
    """``MOLEFORGE_CPU_KERNELS`` is read when the model is compiled; the forward runs with it unset."""
    spec = mf.presets.load("mixlora").with_init(mf.Init(up="normal", std=0.2, seed=3))
    results = {}
    with counting() as calls:
        for flag in ("0", "1"):
            torch.manual_seed(0)
            model = tiny("llama")
            monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", flag)
            mf.compile(spec, model)
            monkeypatch.delenv("MOLEFORGE_CPU_KERNELS")
            out = model(input_ids=batch(seed=1))
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(out.logits.square().mean(), params)
            results[flag] = (out.logits.detach(), grads)
            if flag == "0":
                assert calls["forward"] == 0
    assert calls["forward"] > 0 and calls["backward"] == calls["forward"]
    assert_close(results["1"][0], results["0"][0], "float32_model")
    assert any(g.abs().max() > 0 for g in results["1"][1])
    for a, b in zip(results["1"][1], results["0"][1], strict=True):
        assert_close(a, b, "float32_model")


def test_launcher_errors_name_the_argument():
    T, F, E, r = 4, 6, 3, 2
    index = torch.zeros(T, 2, dtype=torch.long)
    w, ub = torch.rand(T, 2), torch.randn(T, F)
    e0 = torch.empty(0)
    op = torch.ops.moleforge_cpu.routed_ffn
    with pytest.raises(RuntimeError, match="up_base must be"):
        op(index, w, 0, torch.randn(T + 1, F), e0, e0, 1.0, e0, e0, e0, 1.0, e0, e0, 1.0)
    with pytest.raises(RuntimeError, match="z must be"):
        op(index, w, 0, ub, torch.randn(T, E, r + 1), torch.randn(E, r, F), 1.0, e0, e0, e0, 1.0, e0, e0, 1.0)
    with pytest.raises(RuntimeError, match="index must be"):
        op(index.float(), w, 0, ub, e0, e0, 1.0, e0, e0, e0, 1.0, e0, e0, 1.0)
    with pytest.raises(RuntimeError, match="share up_base's dtype"):
        op(index, w.double(), 0, ub, e0, e0, 1.0, e0, e0, e0, 1.0, e0, e0, 1.0)
    with pytest.raises(RuntimeError, match="outside"):
        op(index + E, w, 0, ub, torch.randn(T, E, r), torch.randn(E, r, F), 1.0, e0, e0, e0, 1.0, e0, e0, 1.0)
    with pytest.raises(RuntimeError, match="down_a and down_b come together"):
        op(index, w, 0, ub, e0, e0, 1.0, e0, e0, e0, 1.0, torch.randn(E, r, F), e0, 1.0)
    with pytest.raises(RuntimeError, match="down_keep needs the down LoRA"):
        op(index, w, 0, ub, e0, e0, 1.0, e0, e0, e0, 1.0, e0, e0, 1.0, torch.ones(T, 2, F))
    with pytest.raises(RuntimeError, match=r"down_keep must be a contiguous CPU \(T, k, F\)"):
        op(index, w, 0, ub, e0, e0, 1.0, e0, e0, e0, 1.0, torch.randn(E, r, F), torch.randn(E, r, 5), 1.0,
           torch.ones(T, 2, F + 1))


MIXLORA = mf.presets.load("mixlora").with_init(mf.Init(up="normal", std=0.2, seed=3))


def _block_graph():
    """The IR of a tiny Llama's first MixLoRA block (one fused routed FFN op)."""
    return mf.compile(MIXLORA, tiny("llama", layers=1)).graphs["model.layers.0.mlp"]


def test_the_kernel_is_built_when_the_model_is_compiled_never_in_a_forward(monkeypatch):
    builds = []
    real = cpu.build
    monkeypatch.setattr(cpu, "build", lambda required=False: builds.append(required) or real(required))
    model = tiny("llama")
    handle = mf.compile(MIXLORA, model)
    assert builds == [False]  # once per compile (two routed blocks), policy auto
    assert [m.site.kernel_policy.cpu_built for n, m in handle.modules.items() if n.endswith("mlp")] == [True, True]

    def no_build(*args, **kwargs):
        raise AssertionError("a forward built the CPU kernel")

    monkeypatch.setattr(cpu, "build", no_build)
    monkeypatch.setattr(cpu, "load", no_build)
    with counting() as calls:
        model(input_ids=batch(seed=1)).logits.sum().backward()
    assert calls == {"forward": 2, "backward": 2}


def test_a_model_lowered_for_another_device_builds_nothing_and_runs_torch_ops(monkeypatch):
    graph = _block_graph()
    builds = []
    monkeypatch.setattr(cpu, "build", lambda required=False: builds.append(required))
    store = ParamStore(graph.params)
    gm = lower(graph, store, policy=KernelPolicy(), device="cuda")
    assert builds == [] and gm.kernel_policy.cpu_built is None
    assert gm.kernel_policy.routed_ffn_kernel("cpu", torch.float32) == "torch"
    assert lower(graph, store, policy=KernelPolicy(cpu="off")).kernel_policy.cpu_built is None and builds == []


def test_a_failed_build_warns_once_and_the_torch_ops_run(monkeypatch):
    def broken():
        raise cpu.KernelBuildError("building the moleforge CPU kernels failed: no compiler")

    graph = _block_graph()
    monkeypatch.setattr(cpu, "load", broken)
    monkeypatch.setitem(cpu._state, "usable", None)
    monkeypatch.setitem(cpu._state, "error", None)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        gm = lower(graph, ParamStore(graph.params), policy=KernelPolicy())
    assert gm.kernel_policy.cpu_built is False
    assert gm.kernel_policy.routed_ffn_kernel("cpu", torch.float32) == "torch"
    assert "its build failed" in gm.kernel_policy.describe()[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu.build()  # decided once: no second warning
    with pytest.raises(cpu.KernelBuildError, match="no compiler"):
        lower(graph, ParamStore(graph.params), policy=KernelPolicy(cpu="on"))  # MOLEFORGE_CPU_KERNELS=1


def test_a_build_finds_the_environments_ninja_and_leaves_path_as_it_was(monkeypatch, tmp_path):
    """``PATH`` without ``ninja`` (a virtual environment used without activating it): the build
    runs with the environment's scripts folder appended, and ``PATH`` is restored after it."""
    from torch.utils import cpp_extension

    scripts = sysconfig.get_path("scripts")
    assert shutil.which("ninja", path=scripts), "ninja is a dependency on Linux: the environment's scripts hold it"
    seen = []
    monkeypatch.setattr(cpp_extension, "load",
                        lambda **kwargs: seen.append((os.environ["PATH"], shutil.which("ninja"))))
    monkeypatch.setattr(routed_ffn, "register_fakes", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    cpu.load.__wrapped__()  # the build, past its once-per-process cache
    assert seen == [(os.pathsep.join([str(tmp_path), scripts]), shutil.which("ninja", path=scripts))]
    assert os.environ["PATH"] == str(tmp_path)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: 1 / 0)
    with pytest.raises(cpu.KernelBuildError, match="ZeroDivisionError"):
        cpu.load.__wrapped__()
    assert os.environ["PATH"] == str(tmp_path)


def test_path_is_unchanged_by_the_build():
    assert os.environ.get("PATH") == PATH_BEFORE_THE_BUILD


def _op_inputs(gated: bool = True, lora: bool = True, down: bool = True, keep: bool = False):
    T, F, E, k, r = 6, 20, 3, 2, 2
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    e0 = torch.empty(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    zu, bu = (rnd(T, E, r), rnd(E, r, F)) if lora else (e0, e0)
    gb, zg, bg = (rnd(T, F), rnd(T, E, r), rnd(E, r, F)) if gated and lora else ((rnd(T, F), e0, e0) if gated
                                                                                  else (e0, e0, e0))
    D = 5
    da, db = (rnd(E, r, F), rnd(E, r, D)) if down else (e0, e0)
    fwd = (index, torch.rand(T, k, generator=gen), 0, rnd(T, F), zu, bu, 1.5, gb, zg, bg, 0.5, da, db, 0.75)
    if keep:
        fwd += ((torch.rand(T, k, F, generator=gen) >= 0.5).float() * 2.0,)
    zd = torch.ops.moleforge_cpu.routed_ffn(*fwd)[2]
    bwd = (rnd(T, F), rnd(T, D) if down else e0, *fwd[:14], zd, *fwd[14:])
    return fwd, bwd


@pytest.mark.parametrize("gated,lora,down,keep", [(True, True, True, False), (False, True, False, False),
                                                  (True, False, True, False), (True, True, True, True)])
def test_ops_pass_opcheck(gated, lora, down, keep):
    fwd, bwd = _op_inputs(gated, lora, down, keep)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.moleforge_cpu.routed_ffn.default, fwd, test_utils=tests)
    torch.library.opcheck(torch.ops.moleforge_cpu.routed_ffn_backward.default, bwd, test_utils=tests)


def test_torch_compile_of_a_mixlora_model_runs_the_kernel_with_eager_values():
    """Compiled first, then eagerly: the kernel is chosen at lowering, whatever runs first."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = tiny("llama")
    handle = mf.compile(MIXLORA, model)
    ids = batch(seed=1)
    runs = []
    with counting() as calls:
        for compiled in (True, False):
            dynamo.reset()
            run = torch.compile(model, backend="aot_eager") if compiled else model
            out = run(input_ids=ids)
            grads = torch.autograd.grad(out.logits.square().mean(), [p for _, p in handle.named_parameters()])
            runs.append((out.logits.detach(), grads))
    assert calls["forward"] == 2 * 2  # two blocks, compiled then eager
    assert_close(runs[1][0], runs[0][0], "float32_model")
    for a, b in zip(runs[1][1], runs[0][1], strict=True):
        assert_close(a, b, "float32_model")
