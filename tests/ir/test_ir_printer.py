"""The printer is deterministic and shows every node, parameter and the output."""

from __future__ import annotations

from moleforge.compiler.build import SiteShape, build_block_graph, build_graph
from moleforge.integrations.ffn_trace import BlockLinear
from moleforge.ir import print_graph
from moleforge.passes.hoist_frozen_down import hoist_frozen_down
from moleforge.specs import ExpertPool, TopKRouter, presets

SMORE_GOLDEN = """\
graph site (d_in=16, d_out=24)
  param down_w (32, 16) init=kaiming trainable
  param down_b (32,) init=bias trainable
  param keys0 (4, 32) init=keys trainable
  param query0_w1 (32, 64) init=kaiming trainable
  param query0_b1 (32,) init=bias trainable
  param query0_w2 (32, 32) init=kaiming trainable
  param query0_b2 (32,) init=bias trainable
  param keys1 (4, 32) init=keys trainable
  param query1_w1 (32, 32) init=kaiming trainable
  param query1_b1 (32,) init=bias trainable
  param query1_w2 (32, 32) init=kaiming trainable
  param query1_b2 (32,) init=bias trainable
  param A0 (4, 8, 16) init=kaiming trainable
  param B0 (4, 32, 8) init=up trainable
  param A0_bias (4, 8) init=bias trainable
  param B0_bias (4, 32) init=bias trainable
  param A1 (4, 8, 16) init=kaiming trainable
  param B1 (4, 64, 8) init=up trainable
  param A1_bias (4, 8) init=bias trainable
  param B1_bias (4, 64) init=bias trainable
  param W1 (64, 32) init=kaiming trainable
  param W1_bias (64,) init=bias trainable
  param proj_w (24, 64) init=kaiming trainable
  param proj_b (24,) init=bias trainable
  %x = input 16
  %x_down = linear %x W=down_w b=down_b -> 32
  %route = tree_route %x_down gate=switch levels=[4/2, 4/2] conventions=paper query_act=relu tau=1
  %tree = tree_mix %x by %route act=tanh levels=[4x8->32 c=1, 4x8->64 c=1] -> 64
  %proj = linear %tree W=proj_w b=proj_b -> 24
  %aux0 = aux_loss switch_lb %route weight=0.01
  return %proj ; aux %aux0"""


def test_smore_plain_ir_golden():
    g = build_graph(presets.load("smore").sites[0].adapter, SiteShape("site", 16, 24))
    assert print_graph(g) == SMORE_GOLDEN


def test_printer_is_deterministic_and_complete():
    for name in presets.names():
        g = build_graph(presets.load(name).sites[0].adapter, SiteShape("site", 8, 12))
        text = print_graph(g)
        assert text == print_graph(build_graph(presets.load(name).sites[0].adapter, SiteShape("site", 8, 12)))
        for n in g.nodes:
            assert f"%{n.id} = " in text
        for p in g.params:
            assert f"param {p.name} " in text
        assert text.rstrip().splitlines()[-1].startswith(f"  return %{g.output}")


def test_block_dropout_is_printed_on_the_nodes_that_draw_it():
    """``dropout=p`` on ``expert_ffn`` and, hoisted, on ``expert_hidden`` and ``expert_lora``; nothing
    when there is none (the goldens of the mixlora preset keep their text)."""
    lin = {role: BlockLinear(role, role, *dims, False, False)
           for role, dims in {"gate": (4, 6), "up": (4, 6), "down": (6, 4)}.items()}

    def lines(p: float) -> list[str]:
        pool = ExpertPool(experts=2, rank=2, router=TopKRouter(k=1), dropout=p)
        g = build_block_graph(pool, lin, "silu", ["down", "gate", "up"], SiteShape("b", 4, 4))
        return print_graph(g).splitlines() + print_graph(hoist_frozen_down(g)).splitlines()

    dropped = [line.split("=", 1)[1].split()[0] for line in lines(0.3) if "dropout=0.3" in line]
    assert dropped == ["expert_ffn", "expert_hidden", "expert_lora"]
    assert not any("dropout" in line for line in lines(0.0))
