"""The Triton kernels and the kernel policy on a real CUDA device (``pytest -m gpu``).

Elsewhere the kernels have run only in Triton's CPU interpreter, which is why the policy's
``auto`` runs the torch ops on CUDA (``TRITON_VERIFIED_DEVICES`` is empty). Once these tests have
passed on a GPU, with the results committed, ``"cuda"`` can join that set.

Checked here on CUDA tensors: the sparse pool's op (float32, float16, bfloat16; tiny shapes and
shapes spanning many blocks of pairs and columns) and the residual tree's node op against float64
torch references, outputs and gradients; the custom ops under ``opcheck`` and ``torch.compile``;
a module lowered on the CPU and moved to CUDA; a tiny HF model with both kinds of site, kernels on
and off; and that ``auto`` runs the torch ops there while unverified.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moleforge as mf
from models import batch, tiny
from moleforge.backends.runtime import ops
from moleforge.backends.runtime.ops_tree_prop import propagate_all
from moleforge.backends.runtime.policy import TORCH_OPS, KernelPolicy
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.passes import group_pools
from tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
TRITON = KernelPolicy(triton="on", cpu="off", interpret=False, has_triton=True,
                      decode_tokens=0)  # the kernels at every size
"""The Triton kernels on CUDA tensors (``MOLEFORGE_TRITON=1``)."""


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton forward launches of both ops."""
    from moleforge.backends.triton import grouped, tree

    count = {"grouped": 0, "tree": 0}
    real_grouped, real_tree = grouped.launch_forward, tree.node_mix

    def spy_grouped(*args):
        count["grouped"] += 1
        return real_grouped(*args)

    def spy_tree(*args):
        count["tree"] += 1
        return real_tree(*args)

    monkeypatch.setattr(grouped, "launch_forward", spy_grouped)
    monkeypatch.setattr(tree, "node_mix", spy_tree)
    return count


def _scaled_close(got: torch.Tensor, want: torch.Tensor, kind: str, msg: str) -> None:
    """``got ≈ want`` relative to ``want``'s largest entry (sums of hundreds of terms)."""
    scale = max(1.0, want.abs().max().item())
    assert_close(got.double().cpu() / scale, want.double().cpu() / scale, kind, msg=msg)


# ---- the sparse pool op ---------------------------------------------------------------------

def _pool_case(T, E, k, d_in, d_out, r, shared_a=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(T)])  # expert E-1 unused
    gates = torch.zeros(T, E).scatter(1, index, torch.rand(T, k, generator=gen) + 0.1)
    x = torch.randn(T, d_in, generator=gen)
    a = torch.randn(1 if shared_a else E, r, d_in, generator=gen) / d_in ** 0.5
    b = torch.randn(E, d_out, r, generator=gen) / r ** 0.5
    return x, gates, index, a, b, 0.5


def _pool_run(case, dtype, device, policy):
    x, gates, index, a, b, scale = case
    leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_(True) for t in (x, gates, a, b)]
    y = ops.grouped_mix(leaves[0], leaves[1], index.to(device), leaves[2], leaves[3], scale, policy)
    probe = torch.linspace(-1, 1, y.numel(), device=device, dtype=dtype).reshape(y.shape)
    (y * probe).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def _reference(case, dtype):
    """The torch ops in float64 on the CPU, from the inputs rounded to ``dtype``."""
    x, gates, index, a, b, scale = case
    rounded = [t.to(dtype).double() for t in (x, gates, a, b)]
    return _pool_run((rounded[0], rounded[1], index, rounded[2], rounded[3], scale), torch.float64, "cpu", TORCH_OPS)


SHAPES = {
    "tiny": dict(T=7, E=4, k=2, d_in=12, d_out=9, r=3),
    "many_blocks": dict(T=300, E=8, k=2, d_in=256, d_out=200, r=16),
    "shared_a": dict(T=64, E=5, k=1, d_in=96, d_out=80, r=8, shared_a=True),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(("dtype", "kind"), [(torch.float32, "float32"), (torch.float16, "float16_kernel"),
                                             (torch.bfloat16, "bfloat16_kernel")])
def test_grouped_kernel_on_cuda_matches_the_float64_torch_ops(shape, dtype, kind, launches):
    case = _pool_case(**SHAPES[shape])
    y, grads = _pool_run(case, dtype, DEVICE, TRITON)
    assert launches["grouped"] == 1 and y.dtype == dtype and y.is_cuda
    y_ref, grads_ref = _reference(case, dtype)
    _scaled_close(y, y_ref, kind, "output")
    for name, got, want in zip(("x", "gates", "a", "b"), grads, grads_ref, strict=True):
        _scaled_close(got, want, kind, f"grad of {name}")


def test_grouped_torch_ops_on_cuda_match_the_kernel(launches):
    """The policy off runs the torch ops on CUDA; both paths agree in float32."""
    case = _pool_case(**SHAPES["many_blocks"])
    y_t, g_t = _pool_run(case, torch.float32, DEVICE, TORCH_OPS)
    assert launches["grouped"] == 0
    y_k, g_k = _pool_run(case, torch.float32, DEVICE, TRITON)
    assert launches["grouped"] == 1
    _scaled_close(y_k, y_t, "float32", "output")
    for got, want in zip(g_k, g_t, strict=True):
        _scaled_close(got, want, "float32", "gradient")


def test_grouped_custom_ops_pass_opcheck_on_cuda():
    from moleforge.backends.triton import grouped

    x, gates, index, a, b, _ = _pool_case(**SHAPES["tiny"])
    flat = index.reshape(-1)
    order = flat.argsort(stable=True)
    w = gates.gather(1, index).reshape(-1)[order]
    offs = torch.bincount(flat, minlength=gates.shape[1]).cumsum(0)
    args = [t.to(DEVICE) for t in (x, order // index.shape[1], w, offs, a, b)]
    for i in (0, 2, 4, 5):
        args[i].requires_grad_(True)
    torch.library.opcheck(grouped.grouped_lowrank, tuple(args))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_grouped_kernel_under_torch_compile_on_cuda(backend, launches):
    x, gates, index, a, b, scale = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                                    for t in _pool_case(**SHAPES["many_blocks"]))
    torch._dynamo.reset()
    compiled = torch.compile(ops.grouped_mix, backend=backend)
    got = compiled(x, gates, index, a, b, scale, TRITON)
    assert launches["grouped"] >= 1
    _scaled_close(got, ops.grouped_mix(x, gates, index, a, b, scale, TORCH_OPS), "float32", "compiled output")


# ---- the residual tree's node op -------------------------------------------------------------

def _tree_case(T=50, seed=0):
    """Three pools (leaves first): ``(s, r, d, f)``; every pool above the leaves has a transform."""
    pools = [(6, 4, 32, 2), (4, 4, 48, 2), (3, 8, 64, 1)]
    gen = torch.Generator().manual_seed(seed)
    h_all = torch.randn(T, sum(s * r for s, r, _, _ in pools), generator=gen)
    indices, weights, levels = [], [], []
    for l, (s, r, d, f) in enumerate(pools):
        C = 1
        for *_, f_up in pools[l + 1:]:
            C *= f_up
        indices.append(torch.randint(0, s, (T, C, f), generator=gen))
        weights.append(torch.rand(T, C, f, generator=gen) + 0.1)
        W = torch.randn(d, pools[l - 1][2], generator=gen) / pools[l - 1][2] ** 0.5 if l else None
        levels.append([torch.randn(s, d, r, generator=gen) / r ** 0.5, torch.randn(s, d, generator=gen) * 0.1, W,
                       torch.randn(d, generator=gen) * 0.1 if l else None, 0.5])
    return h_all, indices, weights, levels


def _tree_run(case, dtype, device, policy, activation):
    h_all, indices, weights, levels = case
    def leaf(t):
        return t.to(device=device, dtype=dtype, copy=True).requires_grad_(True) if isinstance(t, torch.Tensor) else t

    h, ws = leaf(h_all), [leaf(w) for w in weights]
    lv = [[leaf(t) for t in level] for level in levels]
    out = propagate_all(h, tuple(i.to(device) for i in indices), tuple(ws), lv, activation, policy)
    leaves = [h, *ws] + [t for level in lv for t in level[:4] if isinstance(t, torch.Tensor)]
    probe = torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).reshape(out.shape)
    return out.detach(), torch.autograd.grad(out, leaves, probe)


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize(("dtype", "kind"), [(torch.float32, "float32"), (torch.float64, "float64"),
                                             (torch.bfloat16, "bfloat16_kernel")])
def test_tree_kernel_on_cuda_matches_the_float64_torch_propagation(activation, dtype, kind, launches):
    case = _tree_case()
    out, grads = _tree_run(case, dtype, DEVICE, TRITON, activation)
    assert launches["tree"] == 3 and out.is_cuda
    rounded = (case[0].to(dtype).double(), case[1], [w.to(dtype).double() for w in case[2]],
               [[t.to(dtype).double() if isinstance(t, torch.Tensor) else t for t in lv] for lv in case[3]])
    out_ref, grads_ref = _tree_run(rounded, torch.float64, "cpu", TORCH_OPS, activation)
    _scaled_close(out, out_ref, kind, "output")
    for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
        _scaled_close(got, want, kind, f"gradient of leaf {i}")


def test_tree_custom_op_passes_opcheck_on_cuda():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(12, 40, generator=gen, device="cpu").to(DEVICE).requires_grad_(True)
    flat = torch.randint(0, 12, (16,), generator=gen).to(DEVICE)
    v = torch.randn(16, 40, generator=gen).to(DEVICE).requires_grad_(True)
    weight = torch.rand(16, generator=gen).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(torch.ops.moleforge.tree_node_mix.default, (u, flat, v, weight, 2, "tanh"))


# ---- the policy on CUDA ---------------------------------------------------------------------

def _pool_module(policy):
    pool = mf.ExpertPool(experts=6, rank=8, alpha=16, router=mf.TopKRouter(k=2))
    graph = group_pools(build_graph(pool, SiteShape(label="site", d_in=64, d_out=48)))
    torch.manual_seed(0)
    return lower(graph, ParamStore(graph.params, up="normal", std=0.2), policy=policy)


def test_auto_runs_the_torch_ops_on_cuda_while_unverified(launches):
    auto = KernelPolicy.from_env({})
    assert auto.grouped_kernel(torch.device(DEVICE), torch.float32) == "torch"
    assert auto.tree_kernel(torch.device(DEVICE), torch.float32) == "torch"
    gm = _pool_module(auto).to(DEVICE)
    gm(torch.randn(40, 64, device=DEVICE))
    assert launches == {"grouped": 0, "tree": 0}


def test_a_module_lowered_on_the_cpu_and_moved_to_cuda_runs_the_kernel_there(launches):
    gm = _pool_module(TRITON)
    x = torch.randn(40, 64)
    y_cpu, _, _ = gm(x)  # CPU tensors outside the interpreter: the torch ops
    assert launches["grouped"] == 0
    y_cuda, _, _ = gm.to(DEVICE)(x.to(DEVICE))
    assert launches["grouped"] == 1
    _scaled_close(y_cuda, y_cpu, "float32", "output on CUDA")


SPEC = mf.AdapterSpec(sites=[
    mf.Site(target=mf.Target(roles=["q", "up"]), adapter=mf.ExpertPool(experts=4, rank=4, alpha=8,
                                                                        router=mf.TopKRouter(k=2)),
            init=mf.Init(up="normal", std=0.2, seed=3)),
    mf.Site(target=mf.Target(roles=["down"]),
            adapter=mf.ResidualTree(levels=[mf.TreeLevel(experts=3, rank=2, fanout=1),
                                            mf.TreeLevel(experts=4, rank=2, fanout=2)],
                                    activation="tanh", router=mf.TreeRouter(gate="switch", down_dim=4, key_dim=4)),
            init=mf.Init(up="normal", std=0.2, seed=4))])


def test_tiny_model_on_cuda_same_logits_and_gradients_with_and_without_triton(monkeypatch, launches):
    base = tiny("llama", layers=1)
    ids = batch(B=2, S=9).to(DEVICE)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MOLEFORGE_TRITON", flag)
        model = copy.deepcopy(base).to(DEVICE)
        mf.compile(SPEC, model, passes=(group_pools,))
        monkeypatch.delenv("MOLEFORGE_TRITON")
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[flag] = out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if flag == "0":
            assert launches == {"grouped": 0, "tree": 0}
    assert launches["grouped"] == 2 and launches["tree"] >= 1
    (l0, g0), (l1, g1) = results["0"], results["1"]
    assert_close(l1, l0, "float32_model")
    assert g1.keys() == g0.keys() and g0
    for name, g in g0.items():
        assert g is not None, name
        assert_close(g1[name], g, "float32_model", msg=name)
