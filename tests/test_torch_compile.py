"""``torch.compile`` of a compiled model: one graph for the whole forward (``fullgraph=True``
raises on any graph break) on the dense paths and the sparse pools' CPU kernel, with the eager
outputs and gradients.

Which spec features compile without graph breaks is stated in ``moleforge.backends.torch_fx``.
The tests use the ``aot_eager`` backend: dynamo's capture and AOT autograd, the parts that see
graph breaks, without inductor's code generation (minutes on a CPU shared by several runs).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import moleforge as mf
from models import batch, tiny
from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from strategies import make_params
from test_merged_export import _gated_graph
from tolerances import assert_close

DENSE = mf.AdapterSpec(aux_loss_coef=0.5, sites=[
    mf.Site(target=mf.Target(roles=["q"]), adapter=mf.LoRA(rank=4, alpha=8, scaling="rslora")),
    mf.Site(target=mf.Target(roles=["v"]),
            adapter=mf.ExpertPool(experts=3, rank=2, router=mf.DenseRouter(temperature=2.0),
                                  aux_losses=[mf.CV2ImportanceLoad()], shared_expert=mf.LoRA(rank=2))),
    mf.Site(target=mf.Target(roles=["gate"]),
            adapter=mf.ExpertPool(experts=2, rank=3, router=mf.StaticRouter(), frozen_experts=True)),
    mf.Site(target=mf.Target(roles=["down"]),
            adapter=mf.ExpertPool(experts=4, rank=2, down=mf.Shared(), router=mf.DenseRouter())),
])

SPECS = {"dense-pools": DENSE, "smore_dense": mf.presets.load("smore_dense"), "molora": mf.presets.load("molora")}
"""``molora``: top-2 pools, grouped and run by the compiled CPU kernel where it builds (its outputs
have fixed shapes), the dense block-gated form otherwise."""


def _run(model, ids, mask=None):
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out


def _assert_compiled_equals_eager(spec: mf.AdapterSpec, ids: torch.Tensor, mask: torch.Tensor | None = None):
    runs = []
    for compiled in (False, True):
        model = tiny("llama").train()
        handle = mf.compile(spec.with_init(mf.Init(up="normal", std=0.2, seed=3)), model)
        dynamo.reset()
        out = _run(torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model, ids, mask)
        runs.append((out, {k: p.grad for k, p in handle.named_parameters()}))
    (eager, eager_grads), (comp, comp_grads) = runs
    assert_close(comp.logits, eager.logits, "float32_model")
    assert_close(comp.loss, eager.loss, "float32_model")
    if eager.get("aux_loss") is not None:
        assert_close(comp.aux_loss, eager.aux_loss, "float32_model")
    for k in eager_grads:
        assert_close(comp_grads[k], eager_grads[k], "float32_model", msg=k)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_compiled_model_equals_eager_without_graph_breaks(name):
    _assert_compiled_equals_eager(SPECS[name], batch(seed=2))


def test_padded_batch_compiles_to_one_graph():
    """With padding in ``attention_mask`` the aux losses count the real tokens (a fixed-shape
    masked sum): still one graph, with the eager losses and gradients."""
    ids = batch(seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    _assert_compiled_equals_eager(DENSE, ids, mask)


@pytest.mark.parametrize("kind", ["block", "outer"])
def test_gated_forms_compile_to_one_graph(kind):
    graph = _gated_graph(kind, E=3, r=2, d_in=7, d_out=5)
    site = lower(graph, ParamStore(graph.params, dtype=torch.float64))
    with torch.no_grad():
        for name, t in make_params(graph, seed=1).items():
            getattr(site, name).copy_(t)
    x = torch.randn(6, 7, dtype=torch.float64)
    dynamo.reset()
    compiled = torch.compile(site, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x)[0], site(x)[0])


def test_per_expert_gathers_may_break_the_graph():
    # The data-dependent form (each expert runs on the tokens that chose it) is outside the
    # guarantee; it must still give the eager result when dynamo splits the graph.
    from moleforge.backends.runtime import ops
    x, gates = torch.randn(5, 4), torch.softmax(torch.randn(5, 3), -1)
    index = gates.topk(2, dim=-1).indices
    a, b = torch.randn(3, 2, 4), torch.randn(3, 6, 2)
    dynamo.reset()
    explained = dynamo.explain(ops.grouped_mix)(x, gates, index, a, b, 0.5)
    assert explained.graph_break_count > 0
    assert_close(torch.compile(ops.grouped_mix, backend="aot_eager")(x, gates, index, a, b, 0.5),
                 ops.grouped_mix(x, gates, index, a, b, 0.5), "float32")
