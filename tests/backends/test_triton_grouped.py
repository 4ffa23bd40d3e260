"""The Triton sparse pool (``backends/triton/grouped.py``) against the torch ``ops.grouped_mix``:
outputs and gradients of x, gates and both factors on random routings (an expert without
tokens, k = 1 and 2, shared factors), the custom ops under ``opcheck`` and ``torch.compile``,
the launcher's errors, and a tiny HF model with grouped pools end to end.

The kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets it without a
GPU), chosen by an explicit kernel policy: shapes stay tiny. On a GPU: ``test_triton_gpu.py``."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import moleforge as mf  # noqa: E402
from models import batch, tiny  # noqa: E402
from moleforge.backends.runtime import ops  # noqa: E402
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy  # noqa: E402
from moleforge.backends.triton import grouped  # noqa: E402
from moleforge.passes import group_pools  # noqa: E402
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors, in Triton's interpreter")

TRITON = KernelPolicy(triton="on", cpu="off", interpret=True, decode_tokens=0)
"""The Triton kernels, on CPU tensors in the interpreter, at every size (no decode path)."""


@pytest.fixture
def launches(monkeypatch):
    """Counts the forward and backward launches, so a test knows the kernels ran."""
    count = {"forward": 0, "backward": 0}
    for kind in count:
        real = getattr(grouped, f"launch_{kind}")

        def spy(*args, _real=real, _kind=kind):
            count[_kind] += 1
            return _real(*args)
        monkeypatch.setattr(grouped, f"launch_{kind}", spy)
    return count


def _routing(gen: torch.Generator, T: int, E: int, k: int, unused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``gates (T, E)`` non-zero only at ``index (T, k)``; expert ``E-1`` gets no token if ``unused``."""
    pool = E - 1 if unused else E
    index = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(T)])  # (T, k)
    values = torch.rand(T, k, generator=gen) + 0.1
    return torch.zeros(T, E).scatter(1, index, values), index


@st.composite
def pools(draw):
    E = draw(st.integers(1, 4))
    k = draw(st.integers(1, min(2, E)))
    unused = E > k and draw(st.booleans())
    T, d_in, d_out, r = draw(st.integers(1, 12)), draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(
        st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    gates, index = _routing(gen, T, E, k, unused)
    a_experts, b_experts = (1 if draw(st.booleans()) else E for _ in "ab")
    x = torch.randn(T, d_in, generator=gen)
    a = torch.randn(a_experts, r, d_in, generator=gen) * 0.5
    b = torch.randn(b_experts, d_out, r, generator=gen) * 0.5
    return x, gates, index, a, b, draw(st.sampled_from([0.5, 2.0]))


def _mix_and_grads(x, gates, index, a, b, scale, policy=TORCH_OPS):
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, a, b)]
    y = ops.grouped_mix(leaves[0], leaves[1], index, leaves[2], leaves[3], scale, policy)
    probe = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * probe).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@settings(max_examples=10)
@given(case=pools())
def test_triton_path_equals_torch_path_with_gradients(case):
    with pytest.MonkeyPatch.context() as mp:
        y_ref, g_ref = _mix_and_grads(*case)
        calls = []
        real = grouped.launch_backward
        mp.setattr(grouped, "launch_backward", lambda *args: calls.append(1) or real(*args))
        y, g = _mix_and_grads(*case, policy=TRITON)
    assert calls, "the Triton backward did not run"
    assert y_ref.abs().sum() > 0
    assert_close(y, y_ref, "float32")
    for name, got, ref in zip(("x", "gates", "a", "b"), g, g_ref, strict=True):
        assert_close(got, ref, "float32", msg=f"grad of {name}")


def test_experts_with_several_blocks_of_pairs_and_columns(monkeypatch, launches):
    # 40 tokens, k = 2 over 2 of 3 experts: each used expert owns 40 pairs, three blocks of BLOCK_P;
    # d_in = 40 and d_out = 20 take several column blocks of 16
    monkeypatch.setattr(grouped, "BLOCK_CAP", 16)
    gen = torch.Generator().manual_seed(11)
    gates, index = _routing(gen, 40, 3, 2, unused=True)
    case = (torch.randn(40, 40, generator=gen), gates, index, torch.randn(3, 3, 40, generator=gen) * 0.3,
            torch.randn(3, 20, 3, generator=gen) * 0.3, 0.5)
    y_ref, g_ref = _mix_and_grads(*case)
    y, g = _mix_and_grads(*case, policy=TRITON)
    assert launches == {"forward": 1, "backward": 1} and 40 > 2 * grouped.BLOCK_P
    assert_close(y, y_ref, "float32")
    for name, got, ref in zip(("x", "gates", "a", "b"), g, g_ref, strict=True):
        assert_close(got, ref, "float32", msg=f"grad of {name}")


def test_float64_keeps_the_torch_path(launches):
    gen = torch.Generator().manual_seed(2)
    gates, index = _routing(gen, 4, 2, 1, unused=False)
    x, a, b = torch.randn(4, 3, generator=gen), torch.randn(2, 2, 3, generator=gen), torch.randn(2, 5, 2, generator=gen)
    y = ops.grouped_mix(x.double(), gates.double(), index, a.double(), b.double(), 0.5, TRITON)
    assert y.dtype == torch.float64 and launches["forward"] == 0
    assert_close(y, ops.pool_mix_loop(x.double(), gates.double(), a.double(), b.double(), 0.5))


def _op_args(shared_a: bool):
    gen = torch.Generator().manual_seed(5)
    T, E, k, d_in, d_out, r = 6, 3, 2, 8, 5, 2
    gates, index = _routing(gen, T, E, k, unused=False)
    index[:, :] = torch.tensor([0, 2])  # expert 1 receives no pair
    flat = index.reshape(-1)
    order = flat.argsort(stable=True)
    w = gates.gather(1, index).reshape(-1)[order] + 0.3  # (P,)
    offs = torch.bincount(flat, minlength=E).cumsum(0)
    x = torch.randn(T, d_in, generator=gen, requires_grad=True)
    a = torch.randn(1 if shared_a else E, r, d_in, generator=gen, requires_grad=True)
    b = torch.randn(E, d_out, r, generator=gen, requires_grad=True)
    return x, order // k, w.requires_grad_(True), offs, a, b


@pytest.mark.parametrize("shared_a", [False, True])
def test_custom_ops_pass_opcheck(shared_a):
    args = _op_args(shared_a)
    torch.library.opcheck(grouped.grouped_lowrank, args)
    gy = torch.randn(args[0].shape[0], args[5].shape[1])
    torch.library.opcheck(grouped.grouped_lowrank_backward, (gy, *(t.detach() for t in args)))


def test_triton_path_compiles_without_graph_breaks(launches):
    gen = torch.Generator().manual_seed(3)
    gates, index = _routing(gen, 5, 3, 2, unused=True)
    x, a, b = torch.randn(5, 4, generator=gen), torch.randn(3, 2, 4, generator=gen), torch.randn(1, 6, 2,
                                                                                                 generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(ops.grouped_mix, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, gates, index, a, b, 0.5, TRITON), ops.grouped_mix(x, gates, index, a, b, 0.5, TRITON),
                 "float32")
    assert launches["forward"] == 2


def _bad(args: dict, name: str, value) -> dict:
    return {**args, name: value}


BAD = [
    ("x", lambda t: t.unsqueeze(0)),
    ("x", lambda t: t.double()),
    ("tokens", lambda t: t.float()),
    ("w", lambda t: t[:-1]),
    ("w", lambda t: t.half()),
    ("offs", lambda t: t[None]),
    ("a", lambda t: t[..., :-1]),
    ("a", lambda t: torch.cat([t, t])),
    ("b", lambda t: t[..., :-1]),
    ("b", lambda t: t.half()),
]


@pytest.mark.parametrize(("name", "spoil"), BAD)
def test_launcher_rejects_bad_arguments_naming_them(name, spoil):
    args = dict(zip(("x", "tokens", "w", "offs", "a", "b"), (t.detach() for t in _op_args(False)), strict=True))
    args[name] = spoil(args[name])
    with pytest.raises(ValueError, match=rf"^{name}: got shape {tuple(args[name].shape)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        grouped.launch_forward(**args)


def test_launcher_rejects_a_bad_output_gradient():
    x, tokens, w, offs, a, b = (t.detach() for t in _op_args(False))
    with pytest.raises(ValueError, match=r"^gy: got shape \(6, 4\)"):
        grouped.launch_backward(torch.zeros(6, 4), x, tokens, w, offs, a, b)


POOL = mf.ExpertPool(experts=4, rank=4, alpha=8, router=mf.TopKRouter(k=2))
SPEC = mf.AdapterSpec(sites=[
    mf.Site(target=mf.Target(roles=["q", "up"]), adapter=POOL, init=mf.Init(up="normal", std=0.2, seed=3)),
    mf.Site(target=mf.Target(roles=["down"]), adapter=POOL.model_copy(update={"down": mf.Shared()}),
            init=mf.Init(up="normal", std=0.2, seed=4))])


def _logits_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_tiny_model_with_grouped_pools_matches_the_torch_path(monkeypatch, launches):
    """``MOLEFORGE_TRITON`` is read when the model is compiled; the forward runs with it unset."""
    base = tiny("llama", layers=1)
    ids = batch(B=2, S=9)  # 18 tokens: above the decode path's sizes
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MOLEFORGE_TRITON", flag)
        model = copy.deepcopy(base)
        mf.compile(SPEC, model, passes=(group_pools,))
        monkeypatch.delenv("MOLEFORGE_TRITON")
        model.train()
        results[flag] = _logits_and_grads(model, ids)
    assert launches == {"forward": 3, "backward": 3}  # q, up, down: the Triton run only
    (logits0, grads0), (logits1, grads1) = results["0"], results["1"]
    assert_close(logits1, logits0, "float32_model")
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name, g in grads0.items():
        assert g is not None and g.abs().sum() > 0, name
        assert_close(grads1[name], g, "float32_model", msg=name)


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 6)
    tokens, offs = torch.arange(4), torch.tensor([2, 4])
    a, b = torch.randn(2, 2, 6), torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="grouped_lowrank: the Triton kernels got a tensor on cpu.*TRITON_INTERPRET=1"):
        grouped.grouped_lowrank(x, tokens, torch.ones(4), offs, a, b)
