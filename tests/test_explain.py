"""mf.explain and handle.explain: per group of identical sites, the adapter, parameters, FLOPs,
kernel, siblings, Γ and the IR through the passes; the model is left untouched."""

from __future__ import annotations

import torch

import moleforge as mf
from models import tiny


def test_molora_on_llama_reads_as_seven_groups():
    model = tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text = mf.explain("molora", model)
    assert "14 adapted linears in 7 groups of identical sites; 69,632 trainable parameters" in text
    assert "== model.layers.{0,1}.self_attn.q_proj  (2 sites, d_in 32 -> d_out 32)" in text
    assert "pool of 8 experts of rank 8, softmax top-2; aux switch_lb 0.01" in text
    # router 2·8·32 + every expert 2·8·8·(32 + 32) FLOPs per token, before and after the passes
    # (the block-gated form's gate products are element-wise); the top-2 alone 2·8·32 + 2·2·8·(32 + 32)
    assert "FLOPs/token  forward 8,704 plain -> 8,704 optimised (the selected experts alone: 2,560)" in text
    assert "base FLOPs   2,048 per token in the frozen linear (the adapter runs beside it)" in text
    assert "kernel       dense block-gated LoRA of rank 64; cost model at 2,048 tokens" in text
    assert "siblings     one input GEMM for {q_proj,k_proj,v_proj}; this site reads its columns 72:144" in text
    assert "Γ            28 = C(8,2) expert sets per token" in text
    assert "+ %x_gemm = linear %x W=cat0(router_w, rows(A)) b=- -> 72" in text
    assert "IR           as for model.layers.{0,1}.self_attn.q_proj above" in text
    assert all(type(m).__name__ != "AdaptedLinear" for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_handle_explains_what_it_compiled_as_explain_predicted():
    spec = mf.presets.load("smore")
    predicted = mf.explain(spec, tiny("llama"))
    handle = mf.compile(spec, tiny("llama"))
    assert handle.explain() == predicted
    assert "216 = C(4,2)^1 x C(4,2)^2 routing structures per token" in predicted
    assert "all residuals of all levels in one GEMM, then per-token tree propagation" in predicted


def test_kernels_named_for_collapsed_trees_grouped_pools_and_no_passes():
    tree = mf.presets.load("smore").model_dump()
    tree["sites"][0]["adapter"]["activation"] = "identity"
    assert "linear tree collapsed into per-level block-gated pools" in mf.explain(tree, tiny("llama"), ir="none")
    wide = {"sites": [{"target": {"roles": ["o"]},
                       "adapter": {"kind": "pool", "experts": 64, "rank": 8, "router": {"kind": "topk", "k": 2}}}]}
    assert "grouped GEMMs over each token's top-2 experts (16 of 512 ranks)" in mf.explain(wide, tiny("llama"))
    plain = mf.explain("molora", tiny("llama"), passes=(), ir="none")
    assert "per-expert loop over all experts (no passes)" in plain and "siblings" not in plain
