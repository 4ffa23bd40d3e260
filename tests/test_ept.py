"""EPT (METHODS.md §15, §20.13): Kronecker-product experts over a shared meta-seed, routed on the
token plus its task's embedding, with per-task frequency compensation and the contrastive loss of
the task embeddings. Hand-worked semantics, hypothesis properties of the lowered module against the
float64 interpreter (outputs, aux losses, gradients; kernels drawn non-zero), the preset on every
decoder family (parameters and Γ by the paper's count, training, save/load), merging, bad specs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny, tiny_for
from moleforge.backends.runtime.ops_kronecker import kronecker_group
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import InjectionError, NotMergeableError, SpecError
from moleforge.ir import interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import KroneckerPool, StaticRouter, TaskContrastiveLoss
from strategies import kronecker_pools, lowered, make_params
from tolerances import assert_close

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
MARGIN = 1e-7
F64 = torch.float64


# ---- semantics by hand ------------------------------------------------------------------------

def test_one_kronecker_expert_by_hand():
    """d_in = 4, d_out = 2, s = 2: ``ΔW = (B A) ⊗ K`` with ``Z = B[:1] A[:, :2]`` (1 × 2)."""
    g = verify(build_graph(KroneckerPool(kernels=[2], rank=1, router=StaticRouter()), SiteShape("s", 4, 2)))
    p = {"meta_A": torch.tensor([[1.0, 2.0]], dtype=F64), "meta_B": torch.tensor([[3.0]], dtype=F64),
         "K0": torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64), "router_w": torch.tensor([1.0], dtype=F64)}
    # Z = [[3, 6]]; ΔW = [[3K, 6K]] = [[3, -3, 6, -6], [6, 1.5, 12, 3]]
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 1.0, -1.0, 2.0]], dtype=F64)
    dw = torch.tensor([[3.0, -3.0, 6.0, -6.0], [6.0, 1.5, 12.0, 3.0]], dtype=F64)
    assert_close(interpret(g, p, x).output, x @ dw.T)
    y, _, _ = lowered(g, p)(x)
    assert_close(y, x @ dw.T)


@given(s=st.integers(1, 4), w=st.integers(1, 3), h=st.integers(1, 3), R=st.integers(1, 3), T=st.integers(1, 4),
       E=st.integers(1, 3))
def test_vec_trick_with_merged_kernels_equals_the_kronecker_matrices(s, w, h, R, T, E):
    """The runtime's ``(Z X) K̃_tᵀ`` with ``K̃_t = Σ_i g_ti K_i`` is ``Σ_i g_ti x ((B A) ⊗ K_i)ᵀ``, for
    meta-seeds wider than the slice."""
    gen = torch.Generator().manual_seed(s * 100 + w * 10 + h)
    a, b = torch.randn(R, w + 2, generator=gen, dtype=F64), torch.randn(h + 1, R, generator=gen, dtype=F64)
    K, x = torch.randn(E, s, s, generator=gen, dtype=F64), torch.randn(T, w * s, generator=gen, dtype=F64)
    g = torch.randn(T, E, generator=gen, dtype=F64)
    want = sum(g[:, i:i + 1] * (x @ torch.kron(b[:h] @ a[:, :w], K[i]).T) for i in range(E))
    assert_close(kronecker_group(x, g, a, b, K, h * s), want)


def test_task_embedding_factor_and_contrastive_loss_by_hand():
    spec = KroneckerPool(kernels=[1, 2], rank=1, tasks=2, task_frequencies=[0.5, 2.0],
                         aux_losses=[TaskContrastiveLoss(weight=0.3, temperature=0.5)])
    g = verify(build_graph(spec, SiteShape("s", 2, 2)))
    p = make_params(g, 1)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
    t = torch.tensor([1, 0, 1])
    res = interpret(g, p, x, samples=(torch.arange(3), t))
    assert_close(res.values["x_task"], x + p["task_embedding"][t])
    assert_close(res.output, res.values["mix"] * torch.tensor([[2.0], [0.5], [2.0]], dtype=F64))
    e = p["task_embedding"] / p["task_embedding"].norm(dim=1, keepdim=True)
    u = x / x.norm(dim=1, keepdim=True)
    logits = u @ e.T / 0.5
    want = 0.3 * sum(-(logits[i, t[i]] - torch.logsumexp(logits[i], 0)) for i in range(3)) / 3
    assert_close(res.aux["aux0"], want)
    plain = interpret(g, p, x)  # no task ids: the token alone routes, no factor, no loss
    assert_close(plain.values["x_task"], x)
    assert_close(plain.output, plain.values["mix"])
    assert float(plain.aux["aux0"]) == 0.0


# ---- properties against the interpreter -----------------------------------------------------

def _grads(run, x, params, trainable):
    leaves = {k: params[k].clone().requires_grad_(True) for k in trainable}
    x_leaf = x.clone().requires_grad_(True)
    y, aux = run(x_leaf, leaves)
    probe = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    grads = torch.autograd.grad((y * probe).sum() + aux, [x_leaf, *leaves.values()], allow_unused=True)
    return y.detach(), aux.detach(), dict(zip(["x", *leaves], grads))


@settings(max_examples=30, deadline=None)
@given(adapter=kronecker_pools(tasks=True), seed=st.integers(0, 2**16), data=st.data())
def test_lowered_kronecker_pool_matches_the_interpreter_before_and_after_the_passes(adapter, seed, data):
    m = adapter.width_multiple()
    d_in, d_out = m * data.draw(st.integers(1, max(1, 8 // m))), m * data.draw(st.integers(1, max(1, 8 // m)))
    graph = verify(build_graph(adapter, SiteShape("s", d_in, d_out)))
    T = data.draw(st.integers(1, 6))
    types = data.draw(st.one_of(st.none(), st.lists(st.integers(0, adapter.tasks - 1), min_size=T, max_size=T)))
    samples = (torch.arange(T), None if types is None else torch.tensor(types))
    params = make_params(graph, seed)  # kernels, meta-seed, embeddings: all non-zero
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref = interpret(graph, params, x, samples=samples)
    assume(all(v > MARGIN for v in ref.margins.values()))
    assert ref.output.abs().max() > 1e-6, "the drawn adapter is not a no-op"
    trainable = [d.name for d in graph.params if d.trainable]

    def run_ref(g):
        def run(xl, leaves):
            r = interpret(g, {**params, **leaves}, xl, samples=samples, routing=ref.routes)
            return r.output, r.aux_total
        return run

    want = _grads(run_ref(graph), x, params, trainable)
    final = run_pipeline(graph, DEFAULT_PIPELINE)
    for g in (graph, final):
        got = _grads(run_ref(g), x, params, trainable)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
        gm = lowered(g, params)
        x_leaf = x.clone().requires_grad_(True)
        y, aux, _ = gm(x_leaf, samples)
        aux = torch.zeros((), dtype=F64) if aux is None else aux
        assert_close(y.detach(), want[0])
        assert_close(aux.detach(), want[1])
        probe = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
        ((y * probe).sum() + aux).backward()
        assert_close(x_leaf.grad, want[2]["x"], msg="grad of x")
        for k in trainable:
            got_k, w = getattr(gm, k).grad, want[2][k]
            zeros = torch.zeros_like(params[k])
            assert_close(zeros if got_k is None else got_k, zeros if w is None else w, msg=f"grad of {k}")


def test_every_expert_gets_a_gradient_when_routed():
    """The kernels and the meta-seed learn (K starts at zero in a fresh adapter, as LoRA's B)."""
    g = verify(build_graph(KroneckerPool(kernels=[1, 2, 2], rank=2, router=mf.DenseRouter()),
                           SiteShape("s", 4, 6)))
    p = {k: v.requires_grad_(True) for k, v in make_params(g, 3).items()}
    interpret(g, p, torch.randn(5, 4, dtype=F64)).output.square().sum().backward()
    assert all(p[n].grad is not None and p[n].grad.abs().sum() > 0 for n in ("K0", "K1", "K2", "meta_A", "meta_B"))


# ---- the preset on the decoder families ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_preset_parameters_and_gamma_follow_the_paper(arch):
    """Per adapted linear ``R·(d_in + d_out)/s_min + Σ s_i² + E·d_in + tasks·d_in`` (the meta-seed
    sliced to the smallest kernel, the kernels, the router, the task embeddings), R = 8, E = 8,
    kernels 2-2-4-4-6-6-8-8, 8 tasks; top-2 of 8 experts: Γ = C(8, 2) = 28."""
    model = tiny_for("ept", arch)
    R, kernels, tasks = 8, [2, 2, 4, 4, 6, 6, 8, 8], 8
    sites = mf.plan("ept", model, passes=()).sites
    want = sum(R * (s.plain.d_in + s.plain.d_out) // 2 + sum(k * k for k in kernels) + len(kernels) * s.plain.d_in
               + tasks * s.plain.d_in for s in sites)
    assert mf.count_parameters("ept", model) == want
    assert mf.structural_flexibility("ept") == math.comb(8, 2) == 28


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_trains_with_task_ids_and_reloads(arch, tmp_path):
    model = tiny_for("ept", arch)
    handle = mf.compile(mf.presets.load("ept").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids, tasks = batch(), torch.tensor([3, 5])
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    named = dict(model.named_parameters())
    watched = {n: p.detach().clone() for n, p in named.items()
               if re.fullmatch(r"K\d+|meta_A|task_embedding", n.rsplit(".", 1)[-1])}
    model.train()
    for _ in range(3):
        out = model(ids, labels=ids, task_ids=tasks)
        assert torch.isfinite(out.loss) and out.aux_loss.item() > 0, "the contrastive loss is on"
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, before in watched.items() if not torch.equal(named[n], before)}
    assert {n for n in watched if n.endswith(("meta_A", "task_embedding"))} <= changed, "seed and embeddings train"
    assert any(re.search(r"\.K\d+$", n) for n in changed), "the kernels of the routed experts train"
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a", hidden=48, task_ids=tasks)


def test_task_ids_change_the_routing():
    model = tiny_for("ept")
    mf.compile(mf.presets.load("ept").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids = batch()
    with torch.no_grad():
        a, b = model(ids, task_ids=torch.tensor([0, 0])).logits, model(ids, task_ids=torch.tensor([7, 7])).logits
    assert not torch.allclose(a, b)
    with pytest.raises(mf.errors.InputError, match=r"task id 8 is outside \[0, 8\)"):
        model(ids, task_ids=torch.tensor([8, 0]))


def test_widths_that_a_kernel_does_not_divide_are_refused_naming_module_width_and_kernel():
    with pytest.raises(InjectionError, match=r"module '.*q_proj': its input width 32 is not a multiple of kernel 6 "
                                             r"\(sites\[0\]\.adapter\.kernels\[4\]\)"):
        mf.compile("ept", tiny("llama"))


def test_routed_experts_do_not_merge_and_a_static_pool_merges_exactly(tmp_path):
    model = tiny_for("ept")
    handle = mf.compile("ept", model)
    with pytest.raises(NotMergeableError, match="route"):
        mf.export_merged(handle, tmp_path / "routed")
    handle.remove()
    spec = {"sites": [{"target": {"roles": ["q", "down"]}, "init": {"up": "normal", "std": 0.1, "seed": 1},
                       "adapter": {"kind": "kronecker_pool", "kernels": [1, 2, 4], "rank": 3,
                                   "router": {"kind": "static"}}}]}
    handle = mf.compile(spec, model)
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    mf.export_merged(handle, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert_close(merged(ids).logits, want, "float32_model")


def test_preset_is_listed_with_its_paper():
    assert "arXiv 2603.12577" in mf.presets.describe()["ept"]


@pytest.mark.parametrize("adapter, words", [
    ({"kind": "kronecker_pool", "kernels": [2, 2], "router": {"kind": "topk", "k": 3}},
     "router.k = 3 exceeds the 2 experts"),
    ({"kind": "kronecker_pool", "kernels": []}, "kernels"),
    ({"kind": "kronecker_pool", "kernels": [0, 2]}, "kernels"),
    ({"kind": "kronecker_pool", "aux_losses": [{"kind": "task_contrastive"}]}, "'task_contrastive' .* set tasks"),
    ({"kind": "kronecker_pool", "tasks": 2, "task_frequencies": [1.0]}, "task_frequencies has 1 entries for tasks = 2"),
    ({"kind": "kronecker_pool", "tasks": 2, "router": {"kind": "static"}}, "a 'static' router has none"),
    ({"kind": "kronecker_pool", "router": {"kind": "dense"}, "aux_losses": [{"kind": "switch_lb"}]},
     "'switch_lb' needs router.kind = 'topk'"),
    ({"kind": "kronecker_pool", "router": {"kind": "sigmoid_topk"}}, "router"),
])
def test_bad_specs_name_the_field(adapter, words):
    with pytest.raises(SpecError, match=words):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{"target": {"roles": ["up"]}, "adapter": adapter}]})
