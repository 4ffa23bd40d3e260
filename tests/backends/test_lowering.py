"""The lowered torch.fx GraphModule equals the float64 interpreter in evaluation mode: outputs,
aux losses (with and without per-token samples) and the gradients of every trainable tensor
and of the input, on random specs; its parameters are exactly the trainable tensors (frozen
experts, fixed static weights and balancing biases are buffers). Training mode:
``test_lowering_training.py``."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from moleforge.backends.torch_fx.init import ParamStore
from moleforge.backends.torch_fx.lower import lower
from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import interpret, verify
from moleforge.specs import presets
from strategies import frozen_inputs, graphs, inputs_for, make_params, samples_for, xlora_scalings
from tolerances import assert_close

MARGIN = 1e-7


def _lowered(graph, params):
    store = ParamStore(graph.params, dtype=torch.float64)
    with torch.no_grad():
        for d in graph.params:
            getattr(store, d.name).copy_(params[d.name])
    return lower(graph, store).eval()


def _grads(fn, tensors):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out, aux = fn(leaves)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    loss = (out * probe).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    return out.detach(), aux, {k: v.grad for k, v in leaves.items()}


@given(graph=graphs(), data=st.data())
def test_lowered_module_matches_interpreter(graph, data):
    verify(graph)
    params = make_params(graph, data.draw(st.integers(0, 2**16)))
    x = data.draw(inputs_for(graph))
    samples = data.draw(samples_for(x.shape[0]))
    ref = interpret(graph, params, x, samples=samples)
    assume(all(m > MARGIN for m in ref.margins.values()))
    gm = _lowered(graph, params)
    trainable = {d.name for d in graph.params if d.trainable}
    assert {k for k, _ in gm.named_parameters()} == trainable
    assert all(not getattr(gm, d.name).requires_grad for d in graph.params if not d.trainable)

    def run_ref(leaves):
        r = interpret(graph, {**params, **{k: v for k, v in leaves.items() if k != "x"}}, leaves["x"],
                      samples=samples)
        return r.output, (r.aux_total if graph.aux else None)

    tensors = {"x": x, **{k: params[k] for k in trainable}}
    out_ref, aux_ref, g_ref = _grads(run_ref, tensors)
    # gradients of the GraphModule's own parameters
    x_leaf = x.clone().requires_grad_(True)
    y, aux, _ = gm(x_leaf, samples, **frozen_inputs(graph, params))
    probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    ((y * probe).sum() + (aux if aux is not None else 0.0)).backward()
    assert_close(y.detach(), out_ref)
    if graph.aux:
        assert_close(aux.detach(), aux_ref.detach())
    else:
        assert aux is None
    assert_close(x_leaf.grad, g_ref["x"], msg="grad of x")
    for k in trainable:
        got, want = getattr(gm, k).grad, g_ref[k]
        zeros = torch.zeros_like(params[k])
        assert_close(zeros if got is None else got, zeros if want is None else want, msg=f"grad of {k}")


def test_every_preset_lowers_and_matches():
    for name in presets.names():
        adapter = presets.load(name).sites[0].adapter
        graph = build_graph(adapter, SiteShape("site", 12, 10))
        params = make_params(graph, 3)
        x = torch.randn(7, graph.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        scalings = xlora_scalings(graph, x)  # an X-LoRA site reads its layer's scalings
        ref = interpret(graph, params, x, scalings=scalings)
        gm = _lowered(graph, params)
        gm.xlora_scalings = scalings
        y, aux, routes = gm(x)
        assert_close(y, ref.output, msg=name)
        assert set(routes) == {n.id for n in graph.nodes if type(n).__name__ in ("Route", "TreeRoute")}
        assert y.abs().max() > 1e-3, f"{name}: adapter output is trivially zero"


def test_generated_code_is_readable_python():
    graph = build_graph(presets.load("molora").sites[0].adapter, SiteShape("site", 8, 8))
    code = _lowered(graph, make_params(graph, 0)).code
    assert "def forward(self, x, samples = None, acc = None, mask = None)" in code
    assert "route_softmax_topk" in code and "pool_mix" in code
