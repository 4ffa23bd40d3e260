"""The sparse training step of a routed LoRA pool in the compiled CPU kernel (``backends/cpu/pool_sparse``):
``routed_pool`` (router, softmax top-k gate and pool in one op) and ``sparse_pool`` (a grouped pool
under any gate), forward and backward.

Proofs: both ops equal the torch ops they replace (``route_softmax_topk`` then ``grouped_mix``) in
float64 to 1e-12, outputs and the gradients of x, the router, both factors, the frozen output and
the gates, for drawn shapes that cover the vector loops and their tails (widths up to 80, ranks up
to 12, shared factors, renormalised or not, any temperature), and pass ``gradcheck``; the float32
instantiation equals the float32 torch ops within float32 error, and one and two threads give the
same bits. Through
lowering, drawn pools in training mode (top-k routers, aux losses, dropout, jitter, shared
factors; the pipeline the planner prices for the kernel, and every pool grouped) equal the float64
interpreter on the plain IR given the same noise, and the kernel runs where the graph has a
grouped pool. The planner prices the grouped form for the kernel, keeps the routers that the
kernel computes out of sibling groups and ``explain`` says so; a MoLoRA Llama trains with the
kernel as with the torch ops.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moleforge as mf
from backends.test_lowering_training import check_training
from models import decode_llama
from moleforge.backends.cpu import pool_sparse
from moleforge.backends.runtime import ops, ops_routed
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.compiler.planner import _priced_for_cpu
from moleforge.ir import GroupedMix
from moleforge.passes import DEFAULT_PIPELINE, group_pools, run_pipeline
from moleforge.specs import ExpertPool, PerExpert, Shared, SwitchLoadBalance, TopKRouter
from strategies import DROPOUTS, SCALINGS, inputs_for, make_params, samples_for
from tolerances import assert_close

F64 = torch.float64
KERNEL = KernelPolicy(triton="off", cpu="on", decode_tokens=0)
"""The CPU kernels built and chosen at every size."""


def _built() -> None:
    KERNEL.with_cpu_build()


@contextmanager
def _counted():
    """Calls of the two ops in the block, as ``[routed, sparse]``."""
    calls = [0, 0]
    routed, sparse = ops_routed.routed_pool, ops.sparse_pool

    def spy_routed(*a, **k):
        calls[0] += 1
        return routed(*a, **k)

    def spy_sparse(*a, **k):
        calls[1] += 1
        return sparse(*a, **k)

    with mock.patch.object(ops_routed, "routed_pool", spy_routed), mock.patch.object(ops, "sparse_pool", spy_sparse):
        yield calls


@st.composite
def op_cases(draw):
    """Shapes and settings of the ops: widths across the vector loops' blocks and tails."""
    E = draw(st.integers(1, 8))
    return dict(T=draw(st.integers(1, 40)), E=E, k=draw(st.integers(1, E)), r=draw(st.integers(1, 12)),
                d_in=draw(st.integers(1, 80)), d_out=draw(st.integers(1, 80)),
                shared=draw(st.sampled_from(["none", "a", "b"])), renormalize=draw(st.booleans()),
                temperature=draw(st.sampled_from([1.0, 0.5, 2.0])), scale=draw(st.sampled_from([1.0, 2.5])),
                acc=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _tensors(c: dict, dtype=F64) -> dict:
    g = torch.Generator().manual_seed(c["seed"])
    E, r = c["E"], c["r"]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * std).requires_grad_(True)

    return dict(x=rnd(c["T"], c["d_in"]), router_w=rnd(E, c["d_in"]),
                a=rnd(1 if c["shared"] == "a" else E, r, c["d_in"], std=0.5),
                b=rnd(1 if c["shared"] == "b" else E, c["d_out"], r, std=0.5), acc=rnd(c["T"], c["d_out"]))


def _reference(t: dict, c: dict):
    """The torch ops the kernel replaces: ``(y, probs, gates, index)``."""
    route = ops.route_softmax_topk(t["x"] @ t["router_w"].T, c["k"], c["renormalize"], c["temperature"])
    y = ops.grouped_mix(t["x"], route.gates, route.index, t["a"], t["b"], c["scale"], TORCH_OPS)
    return (t["acc"] + y if c["acc"] else y), route.probs, route.gates, route.index


def _grads(outs, t: dict, c: dict, with_router: bool):
    """Gradients of a fixed random projection of the outputs (x, router, factors, frozen output)."""
    g = torch.Generator().manual_seed(c["seed"] + 1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outs)
    names = ["x", "a", "b", *(["router_w"] if with_router else []), *(["acc"] if c["acc"] else [])]
    return dict(zip(names, torch.autograd.grad(loss, [t[n] for n in names])))


@settings(max_examples=60, deadline=None)
@given(c=op_cases())
def test_routed_pool_equals_the_torch_ops_it_replaces(c):
    _built()
    t = _tensors(c)
    want = _reference(t, c)
    acc = t["acc"] * 1 if c["acc"] else None  # the op adds into it in place: not into the leaf
    got = pool_sparse.routed_pool(t["x"], t["router_w"], t["a"], t["b"], acc, c["k"], c["renormalize"],
                                  c["temperature"], c["scale"])
    assert torch.equal(got[3], want[3]), "the selected experts"
    for name, g, w in zip(("y", "probs", "gates"), got[:3], want[:3]):
        assert_close(g, w, msg=name)
    want_grads, got_grads = _grads(want[:3], t, c, True), _grads(got[:3], t, c, True)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], msg=f"gradient of {name}")


@settings(max_examples=60, deadline=None)
@given(c=op_cases())
def test_sparse_pool_equals_the_grouped_torch_ops(c):
    """Any gate weights (here drawn, not a softmax's) over any selected experts."""
    _built()
    t = _tensors(c)
    g = torch.Generator().manual_seed(c["seed"] + 2)
    index = torch.rand(c["T"], c["E"], generator=g).argsort(1)[:, :c["k"]]
    gates = torch.zeros(c["T"], c["E"], dtype=F64).scatter(1, index, torch.randn(c["T"], c["k"], generator=g,
                                                                                  dtype=F64)).requires_grad_(True)
    y = ops.grouped_mix(t["x"], gates, index, t["a"], t["b"], c["scale"], TORCH_OPS)
    want = t["acc"] + y if c["acc"] else y
    w = gates.gather(1, index) * c["scale"]
    got = pool_sparse.sparse_pool(t["x"], index, w, t["a"], t["b"], t["acc"] * 1 if c["acc"] else None)
    assert_close(got, want)
    t["gates"] = gates
    names = ["x", "a", "b", "gates", *(["acc"] if c["acc"] else [])]
    probe = torch.randn(want.shape, generator=g, dtype=F64)
    for name, gw, gg in zip(names, torch.autograd.grad((want * probe).sum(), [t[n] for n in names]),
                            torch.autograd.grad((got * probe).sum(), [t[n] for n in names])):
        assert_close(gg, gw, msg=f"gradient of {name}")


@settings(max_examples=40, deadline=None)
@given(c=op_cases())
def test_float32_kernels_equal_the_float32_torch_ops(c):
    """The float32 instantiation (eight lanes a vector, where float64 has four) against the torch ops
    in float32 on the same inputs: outputs and gradients within float32 accumulation error, scaled
    to the largest value (a saturated softmax's gradient is as rounded in both)."""
    _built()
    t = _tensors(c, torch.float32)
    want = _reference(t, c)
    t32 = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    got = pool_sparse.routed_pool(t32["x"], t32["router_w"], t32["a"], t32["b"], t32["acc"] * 1 if c["acc"] else None,
                                  c["k"], c["renormalize"], c["temperature"], c["scale"])
    assume(torch.equal(got[3], want[3]))  # float32 rounding may reorder near-tied probabilities

    def scaled(g, w):  # both divided by the reference's largest value
        top = max(float(w.detach().abs().max()), 1e-30)
        return g.detach().double() / top, w.detach().double() / top

    for name, g, w in zip(("y", "probs", "gates"), got[:3], want[:3]):
        assert_close(*scaled(g, w), "float32_cpu_kernel", msg=name)
    want_grads, got_grads = _grads(want[:3], t, c, True), _grads(got[:3], t32, c, True)
    for name in want_grads:
        assert_close(*scaled(got_grads[name], want_grads[name]), "float32_cpu_kernel", msg=f"gradient of {name}")


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(renormalize):
    _built()
    c = dict(T=9, E=5, k=2, r=3, d_in=11, d_out=13, shared="none", renormalize=renormalize, temperature=0.7,
             scale=1.5, acc=True, seed=3)
    t = _tensors(c)
    idx = torch.rand(9, 5, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :2]
    w = torch.rand(9, 2, dtype=F64, requires_grad=True)

    def routed(x, rw, a, b, acc):
        return pool_sparse.routed_pool(x, rw, a, b, acc * 1, 2, renormalize, 0.7, 1.5)[:3]

    def sparse(x, w, a, b, acc):
        return pool_sparse.sparse_pool(x, idx, w, a, b, acc * 1)

    args = (t["x"], t["router_w"], t["a"], t["b"], t["acc"])
    assert torch.autograd.gradcheck(routed, args)
    assert torch.autograd.gradcheck(sparse, (t["x"], w, t["a"], t["b"], t["acc"]))


def test_one_and_two_threads_give_the_same_bits():
    """No sum crosses threads: each output value is computed by one thread in a fixed order."""
    _built()
    c = dict(T=37, E=6, k=2, r=9, d_in=70, d_out=45, shared="none", renormalize=True, temperature=1.0, scale=2.0,
             acc=True, seed=5)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            t = _tensors(c, torch.float32)
            out = pool_sparse.routed_pool(t["x"], t["router_w"], t["a"], t["b"], t["acc"] * 1, 2, True, 1.0, 2.0)
            results.append([*out[:3], *_grads(out[:3], t, c, True).values()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_bad_expert_index_is_named():
    _built()
    x, a, b = torch.randn(2, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    with pytest.raises(RuntimeError, match="expert index 7 out of range for 3 experts"):
        pool_sparse.sparse_pool(x, torch.tensor([[0], [7]]), torch.ones(2, 1), a, b, None)


@st.composite
def kernel_pools(draw):
    """Pools the kernel runs once grouped: a softmax top-k router of any k, every option a pool has."""
    E = draw(st.integers(2, 8))
    router = TopKRouter(k=draw(st.integers(1, E)), renormalize=draw(st.booleans()),
                        temperature=draw(st.sampled_from([1.0, 0.5])), jitter=draw(st.sampled_from([0.0, 0.1])))
    down, up = draw(st.sampled_from([(PerExpert(), "per_expert"), (Shared(), "per_expert"), (PerExpert(), "shared")]))
    aux = [SwitchLoadBalance(weight=0.1)] if draw(st.booleans()) else []
    pool = ExpertPool(experts=E, rank=draw(st.integers(1, 9)), down=down, up=up, router=router, aux_losses=aux,
                      scaling=draw(st.sampled_from(SCALINGS)), dropout=draw(st.sampled_from(DROPOUTS)))
    return build_graph(pool, SiteShape(label="site", d_in=draw(st.integers(1, 40)), d_out=draw(st.integers(1, 40))))


PIPELINES = {"priced for the kernel": _priced_for_cpu(DEFAULT_PIPELINE), "every pool grouped": (group_pools,)}


@settings(max_examples=40, deadline=None)
@given(graph=kernel_pools(), pipeline=st.sampled_from(sorted(PIPELINES)), data=st.data())
def test_training_with_the_kernel_matches_the_interpreter(graph, pipeline, data):
    """Outputs, aux losses and the gradients of x and every trainable tensor in training mode, on the
    same noise (jitter, dropout) as the interpreter; the kernel runs wherever a pool is grouped."""
    _built()
    final = run_pipeline(graph, PIPELINES[pipeline])
    params = make_params(graph, data.draw(st.integers(0, 2**16), label="param seed"))
    x = data.draw(inputs_for(graph), label="x")
    samples = data.draw(samples_for(x.shape[0]), label="samples")
    with _counted() as calls:
        check_training(graph, final, params, x, samples, 1, 2, KERNEL)
    if any(isinstance(n, GroupedMix) for n in final.nodes):
        assert sum(calls) >= 1, "a grouped pool ran without the kernel"


def _llama():
    return decode_llama()


def test_the_planner_prices_the_kernel_and_keeps_its_routers_out_of_sibling_groups():
    model = _llama()
    on = mf.plan("molora", model, policy=KernelPolicy(triton="off", cpu="on"))
    off = mf.plan("molora", model, policy=KernelPolicy(triton="off", cpu="off"))
    assert all(any(isinstance(n, GroupedMix) for n in s.final.nodes) for s in on.sites)
    assert not any(isinstance(n, GroupedMix) for s in off.sites for n in s.final.nodes), "dense without the kernel"
    assert on.sibling_groups == () and off.sibling_groups, "the kernel computes its routers itself"
    text = mf.explain(on)
    assert "choose_pool_kernels(tokens=2048, kernel=cpu)" in text
    assert "the compiled CPU kernel: each token's top-2 experts (16 of 64 ranks)" in text


def test_a_molora_llama_trains_with_the_kernel_as_with_the_torch_ops():
    """The same losses and gradients over three optimizer steps (float64)."""
    spec = mf.presets.load("molora").with_init(mf.Init(up="normal", std=0.05, seed=0))
    base = _llama().double()
    models = {}
    for name, policy in (("kernel", KERNEL), ("torch", KernelPolicy(triton="off", cpu="off"))):
        models[name] = copy.deepcopy(base)
        mf.compile(spec, models[name], policy=policy)
    ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses[name] = []
        with _counted() as calls:
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[name].append(loss.item())
        assert (calls[0] > 0) == (name == "kernel")
    assert losses["kernel"] == pytest.approx(losses["torch"], rel=1e-10, abs=1e-12)
    for (n, p), (_, q) in zip(models["kernel"].named_parameters(), models["torch"].named_parameters()):
        assert_close(p.detach(), q.detach(), msg=n)
