"""Pools whose experts train or stay frozen one by one (``experts_from`` folders with different
``trainable`` flags): the factors are runs of parameters and buffers read as one concatenation.
The plain graph lowers to the interpreter's outputs and gradients, every pool pass and the whole
pipeline keep them, and only the trainable runs are parameters of the lowered module. LoRA-Mixer's
``preserve`` loss on the trainable runs, by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from pass_properties import check_pass, lowered
from pass_strategies import build, cases, tokens

from moleforge.ir import interpret, print_graph
from moleforge.passes import DEFAULT_PIPELINE, choose_pool_kernels, group_pools, run_pipeline, stack_pools
from moleforge.specs import DenseRouter, ExpertPool, LoRASource, PreserveLoss, TopKRouter
from strategies import graphs, make_params, mixed_pools
from tolerances import assert_close


def _pool(flags, router=None, **kw) -> ExpertPool:
    return ExpertPool(rank=2, router=router or DenseRouter(), **kw,
                      experts_from=[LoRASource(path=f"expert{i}", trainable=f) for i, f in enumerate(flags)])


def _stored(graph) -> dict[str, bool]:
    return {d.name: d.trainable for d in graph.params if d.name.startswith(("A", "B"))}


def test_runs_follow_the_flags_in_expert_order():
    graph = build(_pool([False, True, True, False, True]))
    assert _stored(graph) == {"A_0_1": False, "B_0_1": False, "A_1_3": True, "B_1_3": True,
                              "A_3_4": False, "B_3_4": False, "A_4_5": True, "B_4_5": True}
    assert all(d.buffer != d.trainable for d in graph.params if d.name[:2] in ("A_", "B_"))
    assert "A=cat0(A_0_1, A_1_3, A_3_4, A_4_5) B=cat0(B_0_1, B_1_3, B_3_4, B_4_5)" in print_graph(graph)


def test_pools_that_agree_are_stored_whole():
    assert set(_stored(build(_pool([True, True])))) == {"A", "B"}
    assert set(_stored(build(_pool([False, False])))) == {"A", "B"}


def test_every_run_reaches_the_output():
    """No run is dead weight: zeroing any one run's up-projection changes the output (so the
    equivalence tests below cannot pass on experts that are not read)."""
    graph = build(_pool([True, False, False, True]))
    params, x = make_params(graph, 3), tokens(graph)
    full = interpret(graph, params, x).output
    for name in ("B_0_1", "B_1_3", "B_3_4"):
        cut = interpret(graph, {**params, name: torch.zeros_like(params[name])}, x).output
        assert (cut - full).abs().max() > 1e-3, name


@given(case=cases(graphs(mixed_pools())))
def test_plain_graph_lowers_to_the_interpreter(case):
    # the identity as the "pass": check_pass compares the lowered plain graph with the interpreter
    # (outputs, aux losses, gradients of the input and of every trainable run)
    check_pass(lambda g: g, *case)


@given(case=cases(graphs(mixed_pools())))
def test_only_trainable_runs_are_module_parameters(case):
    graph, seed, x = case
    gm = lowered(graph, make_params(graph, seed))
    trainable = {d.name for d in graph.params if d.trainable}
    assert {k for k, _ in gm.named_parameters()} == trainable
    frozen = [d.name for d in graph.params if d.name[:2] in ("A_", "B_") and not d.trainable]
    assert frozen and all(not getattr(gm, n).requires_grad for n in frozen)
    assert dict(gm.named_buffers()).keys() >= set(frozen)


@pytest.mark.parametrize("pass_fn", [stack_pools, group_pools, choose_pool_kernels], ids=lambda p: p.__name__)
@given(case=cases(graphs(mixed_pools())))
def test_pool_passes_keep_mixed_pools(pass_fn, case):
    check_pass(pass_fn, *case)


@given(case=cases(graphs(mixed_pools())))
def test_default_pipeline_keeps_mixed_pools(case):
    check_pass(lambda g: run_pipeline(g, DEFAULT_PIPELINE), *case)


def test_stacked_and_grouped_forms_read_the_runs():
    graph = build(_pool([False, True, False], router=TopKRouter(k=1)))
    assert "W=rows(cat0(A_0_1, A_1_2, A_2_3))" in print_graph(stack_pools(graph))
    assert "grouped_mix %x by %route A=cat0(A_0_1, A_1_2, A_2_3)" in print_graph(group_pools(graph))


def test_preserve_is_the_squared_distance_of_the_trainable_runs():
    """LoRA-Mixer's ``L_preserve``: ``weight · Σ ‖θ − θ⁰‖²`` over the trainable runs only, each beside a
    buffer of its starting value."""
    graph = build(_pool([True, False, True], aux_losses=[PreserveLoss(weight=0.3)]))
    learned = ("A_0_1", "B_0_1", "A_2_3", "B_2_3")
    pairs = ", ".join(f"{n}~{n}_start" for n in learned)
    assert f"%aux0 = preserve {pairs} weight=0.3" in print_graph(graph)
    assert all(not d.trainable and d.buffer for d in graph.params if d.name.endswith("_start"))
    params, x = make_params(graph, 4), tokens(graph)
    want = torch.zeros((), dtype=torch.float64)
    for n in learned:
        for got, start in zip(params[n].flatten(), params[f"{n}_start"].flatten()):
            want = want + 0.3 * (got - start) ** 2
    assert_close(interpret(graph, params, x).aux["aux0"], want)
    anchored = {**params, **{f"{n}_start": params[n] for n in learned}}
    assert float(interpret(graph, anchored, x).aux["aux0"]) == 0.0


def test_preserve_needs_trainable_folders():
    with pytest.raises(ValueError, match=r"aux_losses\[0\]\.kind = 'preserve' .* this pool has none"):
        _pool([False, False], aux_losses=[PreserveLoss(weight=0.1)])

