"""EPT (METHODS.md §15, §20.13): Kronecker-product experts over a shared meta-seed, routed on the
token plus its task's embedding, with per-task frequency compensation and the contrastive loss of
the task embeddings. Hand-worked semantics, hypothesis properties of the lowered module against the
float64 interpreter (outputs, aux losses, gradients; kernels drawn non-zero) on widths the kernels need
not divide (the product cut, the token padded), the preset on every decoder family and on real models'
widths (parameters and Γ by the paper's count, training, save/load), merging, bad specs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moleforge as mf
from models import assert_reloads_to_the_same_logits, batch, tiny
from moleforge.backends.runtime.ops_kronecker import kronecker_group
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import NotMergeableError, SpecError
from moleforge.interop.lowrank import reduce_site
from moleforge.ir import interpret, verify
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import KroneckerPool, StaticRouter, TaskContrastiveLoss
from sample_checks import assert_lowered_matches_the_interpreter
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


def test_a_kernel_that_divides_no_width_cuts_the_product_by_hand():
    """d_in = d_out = 3, s = 2: ``h = w = ⌈3/2⌉ = 2``, ``Z = B[:2] A[:, :2]`` (2 × 2), and
    ``ΔW = (Z ⊗ K)[:3, :3]``: the token zero-padded to 4 entries, the output cut to 3."""
    g = verify(build_graph(KroneckerPool(kernels=[2], rank=1, router=StaticRouter()), SiteShape("s", 3, 3)))
    assert {p.name: p.shape for p in g.params if p.name.startswith("meta")} == {"meta_A": (1, 2), "meta_B": (2, 1)}
    p = {"meta_A": torch.tensor([[1.0, 2.0]], dtype=F64), "meta_B": torch.tensor([[3.0], [-1.0]], dtype=F64),
         "K0": torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64), "router_w": torch.tensor([1.0], dtype=F64)}
    # Z = [[3, 6], [-1, -2]]; Z ⊗ K = [[3K, 6K], [-K, -2K]] (4 × 4), its top-left 3 × 3 block:
    dw = torch.tensor([[3.0, -3.0, 6.0], [6.0, 1.5, 12.0], [-1.0, 1.0, -2.0]], dtype=F64)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], dtype=F64)
    assert_close(interpret(g, p, x).output, x @ dw.T)
    y, _, _ = lowered(g, p)(x)
    assert_close(y, x @ dw.T)


@given(s=st.integers(1, 4), d_in=st.integers(1, 12), d_out=st.integers(1, 12), R=st.integers(1, 3),
       T=st.integers(0, 4), E=st.integers(1, 3))
def test_vec_trick_with_merged_kernels_equals_the_kronecker_matrices(s, d_in, d_out, R, T, E):
    """The runtime's ``(Z X) K̃_tᵀ`` with ``K̃_t = Σ_i g_ti K_i`` is
    ``Σ_i g_ti x ((B A) ⊗ K_i)[:d_out, :d_in]ᵀ``, on widths ``s`` need not divide (``h = ⌈d_out/s⌉``,
    ``w = ⌈d_in/s⌉``), for meta-seeds wider than the slice, and on no tokens (a group no token selected)."""
    h, w = -(-d_out // s), -(-d_in // s)
    gen = torch.Generator().manual_seed(s * 10000 + d_in * 100 + d_out)
    a, b = torch.randn(R, w + 2, generator=gen, dtype=F64), torch.randn(h + 1, R, generator=gen, dtype=F64)
    K, x = torch.randn(E, s, s, generator=gen, dtype=F64), torch.randn(T, d_in, generator=gen, dtype=F64)
    g = torch.randn(T, E, generator=gen, dtype=F64)
    want = sum(g[:, i:i + 1] * (x @ torch.kron(b[:h] @ a[:, :w], K[i])[:d_out, :d_in].T) for i in range(E))
    assert_close(kronecker_group(x, g, a, b, K, d_out), want)


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

@settings(max_examples=30, deadline=None)
@given(adapter=kronecker_pools(tasks=True), seed=st.integers(0, 2**16), data=st.data())
def test_lowered_kronecker_pool_matches_the_interpreter_before_and_after_the_passes(adapter, seed, data):
    """Widths drawn apart from the kernels (sizes 1-4): mostly widths some kernel does not divide."""
    d_in, d_out = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    T = data.draw(st.integers(1, 6))
    types = data.draw(st.one_of(st.none(), st.lists(st.integers(0, adapter.tasks - 1), min_size=T, max_size=T)))
    assume(_lowered_matches_the_interpreter(adapter, SiteShape("s", d_in, d_out), T, types, seed))


@pytest.mark.parametrize("kernels, d_in, d_out, router", [
    ([2, 3, 4], 7, 5, mf.DenseRouter()),
    ([2, 3, 4], 7, 5, mf.TopKRouter(k=1)),
    ([4, 4], 3, 10, mf.DenseRouter()),  # a kernel wider than the input
    ([3, 5, 3], 11, 13, mf.TopKRouter(k=2)),
])
def test_lowered_kronecker_pool_matches_the_interpreter_on_widths_no_kernel_divides(kernels, d_in, d_out, router):
    adapter = KroneckerPool(kernels=kernels, rank=2, router=router, tasks=2, task_frequencies=[0.5, 2.0],
                            aux_losses=[TaskContrastiveLoss()])
    assert _lowered_matches_the_interpreter(adapter, SiteShape("s", d_in, d_out), 5, [0, 1, 1, 0, 1], 7), "clear top-k"


def _lowered_matches_the_interpreter(adapter: KroneckerPool, shape: SiteShape, T: int, types, seed: int,
                                     router_scale: float = 1.0) -> bool:
    """The site of ``adapter`` on ``shape``, before and after the passes, interpreted and lowered:
    the same outputs, aux losses and gradients (of ``x`` and every trainable tensor) as the plain
    graph's interpretation, on ``T`` tokens of task ids ``types`` (``None``: no task ids).
    ``router_scale`` scales the router's weights (a τ below 1 then leaves the softmax unsaturated).
    ``False`` (nothing checked) where a top-k routing has no clear margin: a tie could flip it."""
    graph = verify(build_graph(adapter, shape))
    samples = (torch.arange(T), None if types is None else torch.tensor(types))
    params = make_params(graph, seed)  # kernels, meta-seed, embeddings: all non-zero
    params["router_w"] = params["router_w"] * router_scale
    x = torch.randn(T, shape.d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref = interpret(graph, params, x, samples=samples)
    if not all(v > MARGIN for v in ref.margins.values()):
        return False
    assert ref.output.abs().max() > 1e-6, "the drawn adapter is not a no-op"
    assert_lowered_matches_the_interpreter(graph, params, x, samples, ref)
    return True


def test_every_expert_gets_a_gradient_when_routed():
    """The kernels and the meta-seed learn (K starts at zero in a fresh adapter, as LoRA's B)."""
    g = verify(build_graph(KroneckerPool(kernels=[1, 2, 2], rank=2, router=mf.DenseRouter()),
                           SiteShape("s", 4, 6)))
    p = {k: v.requires_grad_(True) for k, v in make_params(g, 3).items()}
    interpret(g, p, torch.randn(5, 4, dtype=F64)).output.square().sum().backward()
    assert all(p[n].grad is not None and p[n].grad.abs().sum() > 0 for n in ("K0", "K1", "K2", "meta_A", "meta_B"))


@given(kernels=st.lists(st.integers(1, 4), min_size=1, max_size=3), d_in=st.integers(1, 9),
       d_out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_a_static_pool_reduces_to_the_interpreters_update_on_any_widths(kernels, d_in, d_out, seed):
    """The low-rank reduction that merging and the PEFT export use, ``a_i = (A_i ⊗ I)[:, :d_in]``,
    ``b_i = g_i · s · (B_i ⊗ K_i)[:d_out]``, is the interpreter's ``ΔW`` (``Δy(e_j)`` its column j)."""
    shape = SiteShape("s", d_in, d_out)
    graph = verify(build_graph(KroneckerPool(kernels=kernels, rank=2, router=StaticRouter()), shape))
    params = make_params(graph, seed)  # kernels non-zero
    want = interpret(graph, params, torch.eye(d_in, dtype=F64)).output.T  # (d_out, d_in)
    assert want.abs().max() > 1e-6, "the drawn adapter is not a no-op"
    assert_close(reduce_site(graph, params).delta_weight(), want)


# ---- the preset on the decoder families ---------------------------------------------------------

REAL_WIDTHS = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (3584, 18944), (896, 4864), (512, 1408),
               (768, 2304), (768, 3072)]
"""``(d_in, d_out)`` of linears of LLaMA-2-7B, Mistral-7B, Qwen2-7B, Qwen2-0.5B, the benchmarks' Llama and
GPT-2: kernel 6 divides none of the first seven."""


def _ceil(d: int, s: int) -> int:
    return -(-d // s)


def test_preset_builds_on_real_model_widths_with_the_meta_seed_of_the_smallest_kernel():
    adapter = mf.presets.load("ept").sites[0].adapter
    for d_in, d_out in REAL_WIDTHS:
        graph = verify(run_pipeline(build_graph(adapter, SiteShape("s", d_in, d_out)), DEFAULT_PIPELINE))
        shapes = {p.name: p.shape for p in graph.params}
        assert (shapes["meta_A"], shapes["meta_B"]) == ((8, _ceil(d_in, 2)), (_ceil(d_out, 2), 8)), (d_in, d_out)


def test_preset_site_on_the_benchmark_llama_widths_matches_the_interpreter():
    """The up projection of the benchmarks' Llama (512 -> 1408: 6 divides neither) with the preset's
    kernels, router and tasks: outputs, contrastive loss and gradients as the interpreter's."""
    adapter = mf.presets.load("ept").sites[0].adapter
    site = SiteShape("s", 512, 1408)
    assert _lowered_matches_the_interpreter(adapter, site, 4, [0, 3, 3, 7], 5, router_scale=0.05), "clear top-k"


@pytest.mark.parametrize("hidden", [32, 40])
@pytest.mark.parametrize("arch", ARCHS)
def test_preset_parameters_and_gamma_follow_the_paper(arch, hidden):
    """Per adapted linear ``R·(⌈d_in/2⌉ + ⌈d_out/2⌉) + Σ s_i² + E·d_in + tasks·d_in`` (the meta-seed
    sliced to the smallest kernel, the kernels, the router, the task embeddings), R = 8, E = 8,
    kernels 2-2-4-4-6-6-8-8, 8 tasks, on the tiny models' usual widths (32, FFN 64; GPT-2's 96 and
    128) and on 40 (FFN 80), which kernel 6 does not divide; top-2 of 8 experts: Γ = C(8, 2) = 28."""
    model = tiny(arch, hidden=hidden)
    R, kernels, tasks = 8, [2, 2, 4, 4, 6, 6, 8, 8], 8
    sites = mf.plan("ept", model, passes=()).sites
    assert {s.plain.d_in % 6 != 0 or s.plain.d_out % 6 != 0 for s in sites} == {True}, "widths kernel 6 cuts"
    want = sum(R * (_ceil(s.plain.d_in, 2) + _ceil(s.plain.d_out, 2)) + sum(k * k for k in kernels)
               + len(kernels) * s.plain.d_in + tasks * s.plain.d_in for s in sites)
    assert mf.count_parameters("ept", model) == want
    assert mf.structural_flexibility("ept") == math.comb(8, 2) == 28


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_trains_with_task_ids_and_reloads(arch, tmp_path):
    model = tiny(arch)
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
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a", task_ids=tasks)


def test_task_ids_change_the_routing():
    model = tiny("llama")
    mf.compile(mf.presets.load("ept").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids = batch()
    with torch.no_grad():
        a, b = model(ids, task_ids=torch.tensor([0, 0])).logits, model(ids, task_ids=torch.tensor([7, 7])).logits
    assert not torch.allclose(a, b)
    with pytest.raises(mf.errors.InputError, match=r"task id 8 is outside \[0, 8\)"):
        model(ids, task_ids=torch.tensor([8, 0]))


def test_routed_experts_do_not_merge_and_a_static_pool_merges_exactly(tmp_path):
    """The static pool's kernels 3 and 5 divide neither width of tiny Llama (32, 64): the merged
    weights still give the adapted logits."""
    model = tiny("llama")
    handle = mf.compile("ept", model)
    with pytest.raises(NotMergeableError, match="route"):
        mf.export_merged(handle, tmp_path / "routed")
    handle.remove()
    ids = batch()
    with torch.no_grad():
        base = model(ids).logits
    spec = {"sites": [{"target": {"roles": ["q", "down"]}, "init": {"up": "normal", "std": 0.1, "seed": 1},
                       "adapter": {"kind": "kronecker_pool", "kernels": [2, 3, 5], "rank": 3,
                                   "router": {"kind": "static"}}}]}
    handle = mf.compile(spec, model)
    with torch.no_grad():
        want = model(ids).logits
    assert not torch.allclose(want, base), "the static pool is not a no-op"
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
