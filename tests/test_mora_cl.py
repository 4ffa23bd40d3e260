"""MoRA-CL (METHODS.md §11): rank-1 experts per task, the earlier tasks frozen, self-activated
routing (top-k in training, a threshold in evaluation); ``handle.add_task()`` grows the adapter in
place and saving keeps every task; the preset on every decoder family."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moleforge as mf
from backends.test_lowering import _grads, _lowered
from models import assert_reloads_to_the_same_logits, batch, tiny
from moleforge.backends.runtime.ops_top_p import route_self_activated
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.errors import InjectionError, SpecError
from moleforge.ir import interpret, nodes
from moleforge.specs import RankTasks
from strategies import make_params
from tolerances import assert_close

F64 = torch.float64
ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def _rule(**kw):
    from moleforge.ir.interpret import GATES
    gate = nodes.SelfActivated(**{"k": 2, "temperature": 1.0, "threshold": 0.3, **kw})
    return lambda z, training: GATES[gate](gate, z, {}, z.shape[1], None, training=training)


def test_self_activated_gate_by_hand():
    """``|h| = log(1, 2, 3, 6) + c`` has ``softmax = (1, 2, 3, 6) / 12``; training keeps the two
    largest, evaluation those at or above 0.2."""
    w = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=F64) / 12
    h = -(torch.log(w * 12) + 5.0).unsqueeze(0)  # negative activations: |h| routes
    train, _ = _rule(k=2)(h, True)
    assert_close(train.gates[0], torch.tensor([0, 0, 3 / 12, 6 / 12], dtype=F64))
    assert train.index.tolist() == [[3, 2]]
    evaluate, margin = _rule(threshold=0.2)(h, False)
    assert_close(evaluate.gates[0], torch.tensor([0, 0, 3 / 12, 6 / 12], dtype=F64))
    assert evaluate.index is None and margin == pytest.approx(0.2 - 2 / 12)  # the nearest score
    none, _ = _rule(threshold=0.6)(h, False)
    assert not none.gates.any(), "no expert is relevant enough: the token uses none"


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 6), R=st.integers(1, 8), training=st.booleans(),
       threshold=st.sampled_from([0.0, 0.1, 0.3]))
def test_runtime_router_matches_interpreter(seed, T, R, training, threshold):
    z = torch.randn(T, R, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2
    k = min(2, R)
    want, margin = _rule(k=k, threshold=threshold, temperature=0.7)(z, training)
    if margin <= 1e-9:
        return  # a near-tie: either side is right
    got = route_self_activated(z, k, 0.7, threshold, training)
    assert_close(got.gates, want.gates)
    assert_close(got.probs, want.probs)


@pytest.mark.parametrize("training", [False, True])
def test_lowered_tasks_match_interpreter_outputs_and_gradients(training):
    """Two tasks (the first frozen), training and evaluation: output and the gradients of x and of
    the last task's factors equal the interpreter's; the frozen task gets none."""
    graph = build_graph(RankTasks(ranks_per_task=3, tasks=2, k=2, temperature=0.8, threshold=0.15, alpha=6.0),
                        SiteShape("s", 5, 4))
    params = make_params(graph, 4)
    x = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    noise = {"route": ()} if training else {}
    ref = interpret(graph, params, x, noise=noise)
    assert ref.margins["route"] > 1e-6
    gm = _lowered(graph, params).train(training)
    trainable = sorted(d.name for d in graph.params if d.trainable)
    assert trainable == ["A_t1", "B_t1"] and {k for k, _ in gm.named_parameters()} == set(trainable)

    def run_ref(leaves):
        r = interpret(graph, {**params, **{k: v for k, v in leaves.items() if k != "x"}}, leaves["x"], noise=noise)
        return r.output, None

    want_y, _, want_g = _grads(run_ref, {"x": x, **{k: params[k] for k in trainable}})
    x_leaf = x.clone().requires_grad_(True)
    y, aux, _ = gm(x_leaf)
    (y * torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)).sum().backward()
    assert aux is None
    assert_close(y.detach(), want_y)
    assert_close(x_leaf.grad, want_g["x"], msg="grad of x")
    for k in trainable:
        assert_close(getattr(gm, k).grad, want_g[k], msg=f"grad of {k}")


def _train(model, handle, ids, steps: int = 2):
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_add_task_grows_in_place_freezes_the_past_and_saves_every_task(tmp_path):
    model = tiny("llama")
    handle = mf.compile("mora_cl", model)
    ids = batch()
    _train(model, handle, ids)
    task0 = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    first = sum(p.numel() for p in handle.trainable_parameters())
    same = handle
    handle.add_task()
    assert handle is same and handle.spec.sites[0].adapter.tasks == 2
    grown = handle.state_dict()
    for k, v in task0.items():
        assert torch.equal(grown[k], v), f"{k} was not carried over"
    new_b = [v for k, v in grown.items() if k.endswith("B_t1")]
    assert new_b and all(not v.any() for v in new_b), "the new task's experts start at B = 0"
    # (the output still moves: the scores are normalised over every task's experts)
    assert sum(p.numel() for p in handle.trainable_parameters()) == first
    _train(model, handle, ids)
    now = handle.state_dict()
    for k, v in task0.items():
        assert torch.equal(now[k], v), f"{k} of the first task changed"
    assert any(not torch.equal(now[k], torch.zeros_like(now[k])) for k in now if "B_t1" in k), "task 1 trains"
    assert handle.aux_loss() is None and model(ids, labels=ids).loss.isfinite()
    with torch.no_grad():
        want = model(ids).logits
    mf.save(handle, tmp_path / "a")
    fresh = tiny("llama")
    loaded = mf.load(fresh, tmp_path / "a")
    assert loaded.spec.sites[0].adapter.tasks == 2
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    handle.remove()
    original = tiny("llama")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_add_task_needs_a_rank_tasks_site():
    handle = mf.compile("lora", tiny("llama"))
    with pytest.raises(InjectionError, match="no 'rank_tasks' site"):
        handle.add_task()
    handle.remove()
    with pytest.raises(InjectionError, match="removed"):
        handle.add_task()


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_parameters_gamma_training_and_reload(arch, tmp_path):
    """Trainable per adapted linear ``r·(d_in + d_out)`` (the current task's rank-1 experts, no
    router); Γ = C(8, 4) = 70 routing structures in training."""
    model = tiny(arch)
    sites = mf.plan("mora_cl", model, passes=()).sites
    assert mf.count_parameters("mora_cl", model) == sum(8 * (s.plain.d_in + s.plain.d_out) for s in sites)
    assert mf.structural_flexibility("mora_cl") == math.comb(8, 4) == 70
    handle = mf.compile(mf.presets.load("mora_cl").with_init(mf.Init(up="normal", std=0.1, seed=0)), model)
    ids = batch()
    _train(model, handle, ids)
    assert_reloads_to_the_same_logits(model, handle, ids, arch, tmp_path / "a")
    assert "arXiv 2506.21035" in mf.presets.describe()["mora_cl"]


def test_bad_spec_names_the_field():
    with pytest.raises(SpecError, match="k = 9 exceeds ranks_per_task = 8"):
        mf.AdapterSpec.model_validate({"name": "x", "sites": [{"target": {"roles": ["q"]}, "adapter": {
            "kind": "rank_tasks", "k": 9}}]})
