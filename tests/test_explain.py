"""mf.explain and handle.explain: per group of identical sites (adapted linears and routed FFN
blocks), the adapter, parameters, FLOPs, kernel, siblings, Γ and the IR through the passes; the
model is left untouched."""

from __future__ import annotations

import typing

import pytest
import torch

import moleforge as mf
from models import tiny
from moleforge.integrations.block_module import MoleforgeBlock
from moleforge.ir import Gate
from moleforge.passes.share_frozen_projections import share_frozen_projections
from moleforge.report.explain_text import ROUTER_WORDS
from moleforge.specs import TreeRouter
from moleforge.specs.routing import Router


def test_molora_on_llama_reads_as_seven_groups(monkeypatch):
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "0")  # the torch ops' plan: dense pools, sibling groups
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
    assert "each token's top-2 experts (16 of 512 ranks)" in mf.explain(wide, tiny("llama"))
    plain = mf.explain("molora", tiny("llama"), passes=(), ir="none")
    assert "per-expert loop over all experts (no passes)" in plain and "siblings" not in plain


# ---- FFN-block sites ------------------------------------------------------------------------------

def _fields(text: str, heading: str) -> dict[str, str]:
    """The fields of the group headed ``== heading``, each field's lines joined by spaces."""
    group = next(g for g in text.split("\n\n") if g.startswith(f"== {heading}  "))
    fields: dict[str, str] = {"": group.splitlines()[0]}
    name = ""
    for line in group.splitlines()[1:]:
        if line.startswith("  IR"):
            break
        if line[:15].strip():
            name = line[2:14].strip()
            fields[name] = line[15:]
        else:
            fields[name] += " " + line[15:]
    return fields


def test_mixlora_blocks_read_as_routed_experts_next_to_the_attention_loras():
    """mixlora on tiny("llama") (d = 32, d_ff = 64, 2 layers): an FFN block of 8 experts, top-2,
    rank 8 on gate/up/down per layer, plus rank-8 LoRAs on q/k/v/o (k and v are 32 -> 16)."""
    E, k, r, d, d_ff = 8, 2, 8, 32, 64
    model = tiny("llama")
    state = {key: v.clone() for key, v in model.state_dict().items()}
    text = mf.explain("mixlora", model)
    attention = 2 * (r * d + d * r) + 2 * (r * d + 16 * r)  # q, o; k, v
    block = E * d + 3 * E * r * (d + d_ff)  # router_w; A and B on gate, up, down
    trainable = 2 * (attention + block)
    assert trainable == 40_960 == mf.count_parameters("mixlora", tiny("llama"))
    assert f"8 adapted linears and 2 FFN blocks in 5 groups of identical sites; {trainable:,} trainable" in text
    assert "FFN-block passes" not in text  # one pipeline for every site
    assert "-> fuse_shared_input_linears -> share_frozen_projections -> hoist_frozen_down\n" in text
    assert _fields(text, "model.layers.{0,1}.self_attn.q_proj")["adapter"] == "LoRA of rank 8"

    f = _fields(text, "model.layers.{0,1}.mlp")
    assert f[""] == "== model.layers.{0,1}.mlp  (2 FFN blocks, d_in 32 -> d_ff 64 -> d_out 32)"
    assert f["block"] == "recognised y = down_proj(silu(gate_proj(x)) * up_proj(x)), activation silu " \
                         "replaced by routed experts (scope ffn_block)"
    assert f["linears"] == "gate model.layers.{0,1}.mlp.gate_proj (32 -> 64) up   model.layers.{0,1}.mlp.up_proj " \
                           "(32 -> 64) down model.layers.{0,1}.mlp.down_proj (64 -> 32)"
    assert f["adapter"] == "8 experts, softmax top-2 per block; each expert is the frozen block with its own LoRA " \
                           "of rank 8 on gate_proj, up_proj and down_proj; aux switch_lb 0.01"
    assert f["parameters"].startswith(f"{block:,} trainable per site: router_w={E * d}, A_gate={E * r * d:,}, "
                                      f"B_gate={E * d_ff * r:,}, A_up=2,048, B_up=4,096, A_down={E * r * d_ff:,}, "
                                      f"B_down={E * d * r:,}; frozen inputs")
    router, frozen, lora = 2 * E * d, 2 * d * d_ff, 2 * r * (d + d_ff)  # per GEMM of the block, per LoRA
    plain, optimised = router + k * 3 * (frozen + lora), router + 3 * frozen + k * 3 * lora
    adapter = router + k * 3 * lora
    assert f["FLOPs/token"] == (f"forward {plain:,} plain -> {optimised:,} optimised (the whole routed block) "
                                f"adapter {adapter:,} plain -> {adapter:,} optimised (router and expert LoRAs) "
                                f"frozen block GEMMs {k * 3 * frozen:,} plain -> {3 * frozen:,} optimised")
    assert (plain, optimised, adapter) == (34_304, 22_016, 9_728)
    assert f["base FLOPs"].startswith(f"{3 * frozen:,} per token in the frozen block (gate_proj 4,096 + "
                                      "up_proj 4,096 + down_proj 4,096); the routed block replaces it")
    kernel = f["kernel"]
    assert kernel.startswith("routed FFN block: frozen gate_proj and up_proj once per token, shared by all experts; "
                             "each token's top-2 of 8 experts")
    assert "frozen down_proj hoisted out of the experts: one GEMM on the gated sum" in kernel
    assert "plus each selected expert's LoRA on down_proj" in kernel and "one fused op" in kernel
    assert f["Γ"] == "28 = C(8,2) expert sets per token"
    assert "+ %experts_down = linear %experts_sum W=W_down b=- -> 32" in text
    assert not any(isinstance(m, MoleforgeBlock) for m in model.modules())
    assert all(torch.equal(v, state[key]) for key, v in model.state_dict().items())


UNBUILT = "(built when a routed FFN block, a residual tree or a routed LoRA pool is lowered for a CPU)"


def _built(predicted: str) -> str:
    """What a handle explains where ``explain`` predicted: the same, except that the handle knows
    the CPU kernel's build (at compile) went through."""
    return predicted.replace(UNBUILT, "(built)")


def test_handle_explains_its_blocks_as_explain_predicted():
    predicted = mf.explain("mixlora", tiny("llama"))
    handle = mf.compile("mixlora", tiny("llama"))
    # the same, except that the handle knows the CPU kernel's build went through
    assert handle.explain() == _built(predicted)
    assert UNBUILT in predicted
    assert "rank ?" not in predicted
    assert "plain LoRA" not in _fields(predicted, "model.layers.{0,1}.mlp")["kernel"]


@pytest.mark.parametrize("arch, block, linears, activation", [
    ("bert", "bert.encoder.layer.{0,1}.output",
     ("up   bert.encoder.layer.{0,1}.intermediate.dense (32 -> 64)", "down bert.encoder.layer.{0,1}.output.dense "
      "(64 -> 32)"), "y = output.dense(gelu(intermediate.dense(x))), activation gelu"),
    ("gpt2", "transformer.h.{0,1}.mlp",
     ("up   transformer.h.{0,1}.mlp.c_fc (32 -> 128)", "down transformer.h.{0,1}.mlp.c_proj (128 -> 32)"),
     "y = c_proj(gelu_tanh(c_fc(x))), activation gelu_tanh"),
])
def test_blocks_without_gate_name_their_linears_in_the_model(arch, block, linears, activation):
    """llava_mole (3 experts of rank 32, top-1): BERT's FFN is split over two children of the layer,
    GPT-2's is one MLP of Conv1D linears; the handle names the linears as explain does."""
    predicted = mf.explain("llava_mole", tiny(arch), ir="none")
    assert mf.compile("llava_mole", tiny(arch)).explain(ir="none") == _built(predicted)
    f = _fields(predicted, block)
    assert f["linears"] == " ".join(linears)
    assert f["block"].startswith(f"recognised {activation}")
    assert f["Γ"] == "3 = C(3,1) expert sets per token"


def test_block_kernels_without_the_block_rewrites():
    """With no passes each selected expert runs the whole block; with the frozen projections
    shared only, the down projection stays per expert and the lowering has no fused op."""
    none = _fields(mf.explain("mixlora", tiny("llama"), passes=(), ir="none"), "model.layers.{0,1}.mlp")
    assert none["FLOPs/token"].startswith("forward 34,304 plain -> 34,304 optimised")
    assert none["kernel"] == ("routed FFN block: each token's top-2 of 8 experts, on their tokens only (slots grouped "
                              "by expert), run frozen gate_proj and up_proj and add their LoRAs on gate_proj and "
                              "up_proj, h = silu(gate_proj(x)) * up_proj(x); each expert runs frozen down_proj plus "
                              "its LoRA on its h, and the outputs are summed by gate")
    shared = mf.compile("mixlora", tiny("llama"), passes=(share_frozen_projections,))
    text = shared.explain(ir="none")
    assert "FFN-block passes" not in text and "fused" not in text
    assert "routed_ffn" not in shared.modules["model.layers.0.mlp"].site.code
    fused = mf.compile("mixlora", tiny("llama"))
    assert "routed_ffn" in fused.modules["model.layers.0.mlp"].site.code


# ---- every router kind and every preset -------------------------------------------------------------

ROUTERS = typing.get_args(typing.get_args(Router)[0])
TREE_GATES = typing.get_args(TreeRouter.model_fields["gate"].annotation)


def test_a_static_router_pool_is_explained():
    """CAT / X-LoRA-style scalings: one learned weight per expert, the same for every token."""
    spec = {"sites": [{"target": {"roles": ["up"]},
                       "adapter": {"kind": "pool", "experts": 3, "rank": 4, "router": {"kind": "static"}}}]}
    f = _fields(mf.explain(spec, tiny("llama"), ir="none"), "model.layers.{0,1}.mlp.up_proj")
    assert f["adapter"] == "pool of 3 experts of rank 4, static weights (the same for every token)"
    assert f["Γ"] == "1 (no top-k routing)"


def test_every_ir_gate_has_words():
    assert set(ROUTER_WORDS) == set(typing.get_args(Gate))


def _pool_with(router_cls) -> dict:
    router = router_cls()
    pool = {"kind": "pool", "experts": max(4, router.k or 1), "rank": 4, "router": router.model_dump()}
    if router.kind == "implicit_topk":  # FlyLoRA: the frozen sparse random down-projection routes single ranks
        pool.update(rank=1, down={"kind": "sparse_random"})
    return pool


@pytest.mark.parametrize("router_cls", ROUTERS, ids=lambda c: c.model_fields["kind"].default)
@pytest.mark.parametrize("scope", ["linear", "ffn_block"])
def test_every_router_kind_is_explained(router_cls, scope):
    data = {"sites": [{"target": {"roles": ["gate", "up", "down"] if scope == "ffn_block" else ["q"]}, "scope": scope,
                       "adapter": _pool_with(router_cls)}]}
    if scope == "ffn_block" and router_cls.model_fields["kind"].default == "implicit_topk":
        with pytest.raises(mf.SpecError, match=r"sites\[0\]: adapter: .*shared factors"):  # refused by the spec
            mf.AdapterSpec.model_validate(data)
        return
    if scope == "ffn_block" and router_cls.model_fields["kind"].default == "top_p":
        with pytest.raises(mf.SpecError, match=r"sites\[0\]: adapter.router.kind = 'top_p'"):  # refused by the spec
            mf.AdapterSpec.model_validate(data)
        return
    if scope == "ffn_block" and router_cls.model_fields["kind"].default == "xlora":
        with pytest.raises(mf.SpecError, match=r"sites\[0\].scope = 'ffn_block': X-LoRA mixes the LoRAs of single"):
            mf.AdapterSpec.model_validate(data)  # refused by the spec
        return
    spec = mf.AdapterSpec.model_validate(data)
    text = mf.explain(spec, tiny("llama"), ir="none")
    assert "Γ" in text and not any(g.__name__ in text for g in typing.get_args(Gate))  # every gate has words


@pytest.mark.parametrize("gate", TREE_GATES)
def test_every_tree_gate_is_explained(gate):
    tree = {"kind": "residual_tree", "router": {"gate": gate},
            "levels": [{"experts": 4, "rank": 4, "fanout": None if gate == "dense" else 2}] * 2}
    text = mf.explain({"sites": [{"target": {"roles": ["q"]}, "adapter": tree}]}, tiny("llama"), ir="none")
    assert f"{gate} gate" in text and "Γ" in text


@pytest.mark.parametrize("preset", mf.presets.names())
def test_every_preset_is_explained(preset):
    text = mf.explain(preset, tiny("llama"), ir="none")
    assert "Γ" in text and "adapter" in text


def test_block_dropout_is_explained_with_the_adapter_and_in_the_ir():
    spec = mf.presets.load("mixlora")
    pool = spec.sites[0].adapter.model_copy(update={"dropout": 0.05})
    spec = spec.model_copy(update={"sites": [spec.sites[0].model_copy(update={"adapter": pool}), *spec.sites[1:]]})
    text = mf.explain(spec, tiny("llama"))
    adapter = _fields(text, "model.layers.{0,1}.mlp")["adapter"]
    assert adapter.endswith("; LoRA dropout 0.05 in training on each LoRA's input (x for gate and up, the expert's h "
                            "for down; a mask per routed token and LoRA); aux switch_lb 0.01")
    assert "expert_hidden %x by %route act=silu" in text and " dropout=0.05 -> 64" in text
    assert "LoRA dropout" not in mf.explain("mixlora", tiny("llama"))
