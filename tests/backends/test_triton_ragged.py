"""Experts of their own ranks (FlexMoRE) through the Triton grouped op (``backends/triton/ragged.py``):
the lowered grouped form with the Triton kernel policy against the float64 interpreter, outputs and
gradients of the input and every factor on small shapes (ranks 1-5 against a rank block of 16, an
expert without tokens, k = 1 and 2), and the padding's identity. The kernels run on CPU tensors in
Triton's interpreter (``tests/conftest.py`` sets it without a GPU)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from moleforge.backends.runtime.policy import KernelPolicy  # noqa: E402
from moleforge.backends.triton import grouped  # noqa: E402
from moleforge.backends.triton.ragged import pad_ragged  # noqa: E402
from moleforge.compiler.build import SiteShape, build_graph  # noqa: E402
from moleforge.ir import RaggedMix, interpret, verify  # noqa: E402
from moleforge.specs import ExpertPool, TopKRouter  # noqa: E402
from strategies import lowered, make_params  # noqa: E402
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors, in Triton's interpreter")

TRITON = KernelPolicy(triton="on", cpu="off", interpret=True, decode_tokens=0)
MARGIN = 1e-4  # float32 routing must pick what float64 picks


def _grouped_graph(ranks: list[int], k: int, d_in: int, d_out: int):
    """A FlexMoRE pool's graph with its ragged mix in the grouped form (each expert over its pairs)."""
    g = build_graph(ExpertPool(experts=len(ranks), ranks=ranks, router=TopKRouter(k=k)), SiteShape("s", d_in, d_out))
    mix = next(n for n in g.nodes if isinstance(n, RaggedMix))
    return verify(g.replace(nodes=tuple(dataclasses.replace(n, grouped=True) if n is mix else n for n in g.nodes)))


@settings(max_examples=8, deadline=None)
@given(ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), k=st.integers(1, 2), d_in=st.integers(1, 16),
       d_out=st.integers(1, 16), T=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_triton_ragged_pool_matches_the_interpreter(ranks, k, d_in, d_out, T, seed):
    k = min(k, len(ranks))
    graph = _grouped_graph(ranks, k, d_in, d_out)
    params = make_params(graph, seed)
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    x64 = x.clone().requires_grad_(True)
    ref = interpret(graph, leaves, x64)
    assume(all(m > MARGIN for m in ref.margins.values()))
    probe = torch.linspace(-1, 1, ref.output.numel(), dtype=torch.float64).reshape(ref.output.shape)
    (ref.output * probe).sum().backward()

    launches = []
    real = grouped.launch_forward
    gm = lowered(graph, params, policy=TRITON).float()
    x32 = x.float().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "launch_forward", lambda *a: launches.append(1) or real(*a))
        y, _, _ = gm(x32)
    (y * probe.float()).sum().backward()
    assert launches, "the Triton op ran"
    assert_close(y.detach(), ref.output.detach(), "float32")
    assert_close(x32.grad, x64.grad, "float32", msg="grad of x")
    for name in ("A", "B", "router_w"):
        assert_close(getattr(gm, name).grad, leaves[name].grad, "float32", msg=f"grad of {name}")


def test_padding_puts_each_expert_in_its_own_rows_and_columns():
    ranks = (1, 3, 2)
    a, b = torch.arange(6 * 4.0).reshape(6, 4), torch.arange(5 * 6.0).reshape(5, 6)
    a_pad, b_pad = pad_ragged(a, b, ranks)
    assert a_pad.shape == (3, 3, 4) and b_pad.shape == (3, 5, 3)
    assert torch.equal(a_pad[1], a[1:4]) and torch.equal(a_pad[2, :2], a[4:6]) and not a_pad[2, 2].any()
    assert torch.equal(b_pad[0, :, :1], b[:, :1]) and not b_pad[0, :, 1:].any()
    for e in range(3):  # the padded expert is the same update
        o = sum(ranks[:e])
        assert torch.equal(b_pad[e] @ a_pad[e], b[:, o:o + ranks[e]] @ a[o:o + ranks[e]])


def test_the_torch_policy_runs_no_triton_launch():
    """The Triton path is the policy's choice (opt-in on CUDA until verified there, like the others)."""
    graph = _grouped_graph([1, 3, 2], 2, 6, 5)
    params = make_params(graph, 0)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "launch_forward", lambda *a: pytest.fail("a Triton launch under the torch policy"))
        y, _, _ = lowered(graph, params, policy=KernelPolicy(triton="off", cpu="off"))(x)
    assert_close(y, interpret(graph, params, x).output)
