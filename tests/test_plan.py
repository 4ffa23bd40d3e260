"""``mf.plan``: one front-end step for every site (linear and FFN block), the passes that ran
recorded per site, compile = plan + lower + inject, explain a pure function of a plan."""

from __future__ import annotations

import sys

import pytest
import torch

import moleforge as mf
from models import batch, tiny
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.passes import DEFAULT_PIPELINE, fold_static_gates
from tolerances import assert_close


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _pass_names(pipeline) -> list[str]:
    return [getattr(p, "__name__", repr(p)) for p in pipeline]


def test_plan_covers_linear_sites_and_ffn_blocks_without_touching_the_model():
    model = tiny("llama")
    before, modules = _state(model), [type(m) for m in model.modules()]
    plan = mf.plan("mixlora", model)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scopes = {s.name: s.scope for s in plan.sites}
    assert scopes["model.layers.0.mlp"] == scopes["model.layers.1.mlp"] == "ffn_block"
    assert scopes["model.layers.0.self_attn.q_proj"] == "linear"
    assert _pass_names(plan.pipeline) == _pass_names(DEFAULT_PIPELINE)  # priced for the kernel that will run
    block = plan.site("model.layers.0.mlp")
    assert block.block is not None and block.block.traced.full_name("down") == "model.layers.0.mlp.down_proj"
    # the block rewrites ran on the block, from the one pipeline, and the trace says so
    names = [name for name, _ in block.trace]
    assert names == _pass_names(DEFAULT_PIPELINE)
    changed = [name for (name, g), prev in zip(block.trace, (block.plain, *(g for _, g in block.trace))) if g != prev]
    assert changed == ["share_frozen_projections", "hoist_frozen_down"]
    assert block.final == block.trace[-1][1]


def test_the_block_rewrites_leave_linear_graphs_alone():
    plan = mf.plan("molora", tiny("llama"), siblings=False)
    for site in plan.sites:
        after = dict(site.trace)
        before_block_passes = site.trace[len(DEFAULT_PIPELINE) - 3][1]
        assert after["share_frozen_projections"] is before_block_passes
        assert after["hoist_frozen_down"] is before_block_passes


def test_sibling_fusion_is_a_recorded_step_of_the_sites_it_changes():
    plan = mf.plan("lora", tiny("llama"))
    assert plan.sibling_groups, plan.sibling_note
    fused = {n for group in plan.sibling_groups for n in group}
    for site in plan.sites:
        names = [name for name, _ in site.trace]
        assert (names[-1] == "fuse_sibling_sites") == (site.name in fused), site.name
    unfused = mf.plan("lora", tiny("llama"), siblings=False)
    assert not unfused.sibling_groups
    assert all(name != "fuse_sibling_sites" for s in unfused.sites for name, _ in s.trace)


def test_given_passes_are_the_pipeline_of_every_site():
    plan = mf.plan("mixlora", tiny("llama"), passes=(fold_static_gates,))
    assert plan.pipeline == (fold_static_gates,)
    for site in plan.sites:
        assert [name for name, _ in site.trace] == ["fold_static_gates"]
        assert site.final == site.plain


@pytest.mark.parametrize("preset", ["smore", "mixlora", "molora"])
def test_compiling_a_plan_equals_compiling_the_spec(preset):
    spec = mf.presets.load(preset).with_init(mf.Init(seed=3, up="normal", std=0.05))
    x = batch()
    logits = []
    for make in (lambda m: mf.plan(spec, m), lambda m: spec):
        model = tiny("llama")
        handle = mf.compile(make(model), model)
        assert handle.plan.spec == spec and handle.graphs == handle.plan.graphs
        logits.append(model(x).logits)
    assert_close(logits[0], logits[1], "float32_model")


def test_explain_reads_the_plan_and_reruns_nothing(monkeypatch):
    model = tiny("llama")
    plan = mf.plan("mixlora", model)
    text = mf.explain("mixlora", model)
    handle = mf.compile(plan, model)

    def refuse(*args, **kwargs):
        raise AssertionError("explain must not run passes")

    planning = sys.modules["moleforge.compiler.planner"]
    import moleforge.passes.pipeline as pipeline
    monkeypatch.setattr(pipeline, "run_pipeline", refuse)
    monkeypatch.setattr(planning, "run_pipeline", refuse)
    assert mf.explain(plan) == text
    assert handle.explain().splitlines()[:3] == text.splitlines()[:3]
    with pytest.raises(TypeError, match="pass the model or a Plan"):
        mf.explain("mixlora")


def test_the_kernel_policy_is_read_once_kept_by_the_plan_and_shown(monkeypatch):
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "0")
    model = tiny("llama")
    plan = mf.plan("mixlora", model)
    assert plan.policy.cpu == "off"
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "1")  # read already: changes nothing below
    handle = mf.compile(plan, model)
    assert {m.site.kernel_policy.cpu for m in handle.modules.values()} == {"off"}
    assert "  kernels: routed FFN blocks: torch ops (CPU kernel off: MOLEFORGE_CPU_KERNELS=0)" in mf.explain(plan)
    handle.remove()
    explicit = KernelPolicy(triton="off", cpu="off")
    handle = mf.compile("smore", model, policy=explicit)
    assert handle.plan.policy == explicit
    assert "kernels: residual trees: torch ops (Triton off: MOLEFORGE_TRITON=0" in handle.explain(ir="none")
