"""Golden printed IR of every preset before and after each pass of the default pipeline
(``goldens/<preset>.txt``), and the whole pipeline's meaning on every preset.

Regenerate after an intended change with ``python tests/passes/test_pipeline_goldens.py`` and
review the diff."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moleforge.compiler.build import SiteShape, build_graph
from moleforge.ir import print_graph
from moleforge.passes import DEFAULT_PIPELINE, run_pipeline
from moleforge.specs import presets
from strategies import make_params

GOLDENS = Path(__file__).parent / "goldens"
ROUTER_PARAMS = ("keys", "query", "down_")


def pipeline_text(preset: str) -> str:
    graph = build_graph(presets.load(preset).sites[0].adapter, SiteShape("site", 16, 24))
    trace: list = []
    run_pipeline(graph, DEFAULT_PIPELINE, trace)
    out, prev = ["# plain", print_graph(graph)], graph
    for name, g in trace:
        out += [f"# after {name}", "(unchanged)" if g == prev else print_graph(g)]
        prev = g
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("preset", presets.names())
def test_printed_ir_before_and_after_every_pass(preset):
    path = GOLDENS / f"{preset}.txt"
    assert path.exists(), f"no golden for {preset}: run python {Path(__file__).relative_to(Path.cwd())}"
    assert pipeline_text(preset) == path.read_text()


@pytest.mark.parametrize("preset", presets.names())
def test_pipeline_keeps_every_preset_exact(preset):
    from pass_properties import check_pass

    from moleforge.passes import run_pipeline as run

    adapter = presets.load(preset).sites[0].adapter
    graph = build_graph(adapter, SiteShape("site", 12, 10))
    x = torch.randn(6, graph.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    params = make_params(graph, 5)
    for name in params:
        if name.startswith(ROUTER_PARAMS):  # keep the tree router's softmax away from saturation (clear top-k)
            params[name] = params[name] * 0.2
    tau = getattr(getattr(adapter, "router", None), "temperature", 1.0)
    if "router_w" in params and tau < 1:  # EPT's τ = 0.05: logits as far from saturation as at τ = 1
        params["router_w"] = params["router_w"] * tau
    check_pass(lambda g: run(g, DEFAULT_PIPELINE), graph, 5, x, params)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    GOLDENS.mkdir(exist_ok=True)
    for name in presets.names():
        (GOLDENS / f"{name}.txt").write_text(pipeline_text(name))
        print("wrote", GOLDENS / f"{name}.txt")
