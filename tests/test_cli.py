"""The ``moleforge`` command as a user meets it: help everywhere, the listing commands, inspect
on a small local model, train with checkpoints and resume, and one clear line (never a
traceback) for bad arguments, missing files and bad data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import moleforge as mf
from models import VOCAB, tiny
from moleforge.backends.runtime.policy import KernelPolicy
from moleforge.cli import main
from moleforge.cli.schema_doc import render_reference
from moleforge.compiler import as_spec, build_site_graphs
from moleforge.demo.tasks import make_tokenizer, task_records
from moleforge.ir import BlockGate, GateBias, GroupedMix, TreeMix, TreePropagate
from moleforge.passes import group_pools, stack_pools
from moleforge.report.flops import (
    adapter_flops_per_token,
    base_flops_per_token,
    flops_per_token,
    frozen_flops_per_token,
    kronecker_group_flops,
    node_flops,
)
from strategies import xlora_scalings
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("presets", "schema", "inspect", "train", "export", "demo")


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """tiny("llama") saved with save_pretrained, plus the demo's word-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory) -> Path:
    """tiny("llama") without a tokenizer."""
    path = tmp_path_factory.mktemp("bare-llama")
    tiny("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in task_records()))
    return path


# ---- help and listings ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_every_command_has_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")
    if not command:
        assert all(c in result.output for c in COMMANDS)


def test_presets_lists_every_preset_on_one_line():
    lines = run("presets").output.splitlines()
    described = mf.presets.describe()
    assert len(lines) == len(described)
    for line, (name, text) in zip(lines, described.items()):
        assert line.split()[0] == name and line.endswith(text)


def test_schema_prints_the_json_schema():
    assert json.loads(run("schema").output) == mf.AdapterSpec.model_json_schema()


def test_spec_reference_doc_is_up_to_date():
    committed = (ROOT / "docs" / "spec_reference.md").read_text(encoding="utf-8")
    assert committed == render_reference(mf.AdapterSpec.model_json_schema()), \
        "docs/spec_reference.md is stale: run python scripts/gen_spec_reference.py"
    assert run("schema", "--markdown").output == committed


# ---- FLOPs from IR shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("preset", mf.presets.names())
def test_flops_from_ir_match_what_torch_counts(preset):
    """The IR count equals the GEMM FLOPs torch's counter sees when the lowered site runs.
    Residual trees are the exception: their router runs in algebraically equal, cheaper forms
    (the query's token part once per token, ancestor keys through per-pool tables, ``K W_2``
    folded for switch and dense gates), so the runtime spends less than the IR's count, and
    more than the count of everything but the router."""
    model = tiny("llama")
    # a site called alone must not pay for its siblings; torch ops only (the CPU kernel's
    # residual-tree decode step is arithmetic the counter cannot see)
    handle = mf.compile(preset, model, siblings=False, policy=KernelPolicy(cpu="off"))
    for name, module in handle.modules.items():
        graph = handle.graphs[name]
        if graph.frozen:
            continue  # ffn_block sites read the block's frozen weights: test_flops_of_ffn_block_experts_*
        T = 5
        x = torch.randn(T, graph.d_in)
        module.site.eval()
        module.site.xlora_scalings = xlora_scalings(graph, x)  # an X-LoRA site reads its layer's scalings
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module.site(x, None)
        measured, counted = counter.get_total_flops(), T * flops_per_token(graph)
        routers = [n for n in graph.nodes if type(n).__name__ == "TreeRoute"]
        slack = T * sum(_ragged_slack(graph, n) for n in graph.nodes)
        if slack:  # experts of their own ranks: the count is the bound of the k largest ranks
            assert counted - slack <= measured <= counted, (name, measured, counted - slack, counted)
        elif routers:
            without_router = counted - T * sum(node_flops(graph, n) for n in routers)
            assert without_router < measured < counted, (name, measured, without_router, counted)
        else:
            assert measured == counted, name
        assert base_flops_per_token(graph) == 2 * graph.d_in * graph.d_out


def _ragged_slack(graph, n) -> int:
    """How far below its count a top-k pool of experts of their own ranks (or EPT's kernels) may
    run: the count takes the k largest, the least a token can use is the k smallest."""
    if type(n).__name__ == "KroneckerMix" and graph.routing(n.routing).k is not None:  # one group, the cheapest
        return node_flops(graph, n) - min(kronecker_group_flops(graph.width(n.src), n.d_out, n.a.shape[0], n.sizes()))
    if type(n).__name__ != "RaggedMix" or not n.grouped:
        return 0
    k, width = graph.routing(n.routing).k, n.a.shape[1] + n.b.shape[0]
    return node_flops(graph, n) - 2 * sum(sorted(n.ranks)[:k]) * width


def _graphs(spec, site: str, **kw):
    """The plain and the optimised graph of one site of tiny("llama")."""
    _, plain, final = build_site_graphs(as_spec(spec), tiny("llama"), **kw)
    return plain[site], final[site]


def test_flops_of_a_lora_follow_their_formula():
    d_in, d_out, r = 32, 64, 8  # up_proj of tiny("llama"), the lora preset's rank
    plain, final = _graphs("lora", "model.layers.0.mlp.up_proj", siblings=False)
    assert flops_per_token(plain) == flops_per_token(final) == 2 * r * (d_in + d_out)
    assert base_flops_per_token(final) == 2 * d_in * d_out


def test_flops_of_a_molora_pool_stacked_and_grouped():
    """E = 8 experts of rank r = 8, top-k = 2, on up_proj (32 -> 64): the router runs on every
    token; the loop and the stacked (block-gated) kernel run all E experts, the grouped kernel the
    k selected. The gate products of the stacked form are element-wise and not counted."""
    E, k, r, d_in, d_out = 8, 2, 8, 32, 64
    router = 2 * E * d_in
    plain, _ = _graphs("molora", "model.layers.0.mlp.up_proj", passes=())
    stacked, grouped = stack_pools(plain), group_pools(plain)
    assert any(isinstance(n, BlockGate) for n in stacked.nodes)
    assert any(isinstance(n, GroupedMix) for n in grouped.nodes)
    assert flops_per_token(plain) == router + 2 * E * r * (d_in + d_out) == 12_800
    assert flops_per_token(stacked) == router + 2 * E * r * (d_in + d_out)
    assert flops_per_token(grouped) == router + 2 * k * r * (d_in + d_out) == 3_584


def test_flops_of_an_smore_tree_follow_a_hand_count():
    """The smore preset on up_proj (32 -> 64): router input x_down = down_w x (m = 32); pools
    l = 0 (leaves) and 1 of s = 4 experts of rank 8, fanouts 2 and 2, query width g = 32,
    key width 32; d_1 = 32 between the levels, d_2 = 64; W_1 (64, 32); proj (64, 64)."""
    d_in, m, g, key, s, r, d1, d2 = 32, 32, 32, 32, 4, 8, 32, 64
    x_down = 2 * m * d_in
    # pool 1 (the top) routes 1 context from z = x_down; pool 0 routes f_1 = 2 contexts from
    # z = [x_down, the chosen pool-1 key]: per context a query MLP (g x in, g x g) and s keys
    route = 1 * 2 * (g * m + g * g + s * g) + 2 * 2 * (g * (m + key) + g * g + s * g)
    # every expert's residual B (A x) once: pool 0 32 -> 8 -> d_1, pool 1 32 -> 8 -> d_2;
    # W_1 at the F_1 = f_1 = 2 tree nodes drawn from pool 1
    residuals = 2 * s * r * (d_in + d1) + 2 * s * r * (d_in + d2)
    transforms = 2 * (2 * d2 * d1)
    proj = 2 * d2 * d2
    total = x_down + route + residuals + transforms + proj
    plain, final = _graphs("smore", "model.layers.0.mlp.up_proj", siblings=False)
    assert any(isinstance(n, TreeMix) for n in plain.nodes)
    assert any(isinstance(n, TreePropagate) for n in final.nodes)  # its down-projections in one GEMM
    assert flops_per_token(plain) == flops_per_token(final) == total == 45_824


def test_flops_of_gated_biases_are_their_gemm():
    """A collapsed linear tree adds its per-expert biases as ``g @ bias (E, d)``: a GEMM torch
    counts; a shared bias ``(d,)`` is scaled element-wise and costs no GEMM."""
    tree = mf.presets.load("smore").model_dump()
    tree["sites"][0]["adapter"]["activation"] = "identity"
    _, g = _graphs(tree, "model.layers.0.mlp.up_proj", siblings=False)
    biases = {n.id: n for n in g.nodes if isinstance(n, GateBias)}
    assert {i: node_flops(g, n) for i, n in biases.items()} == \
        {"tree0_bbias": 2 * 4 * 32, "tree1_bbias": 2 * 4 * 64, "tree1_wbias": 0}
    gates = torch.rand(5, 4)
    with FlopCounterMode(display=False) as counter:
        gates @ torch.randn(4, 64)
    assert counter.get_total_flops() == 5 * node_flops(g, biases["tree1_bbias"])


def test_flops_of_ffn_block_experts_follow_their_formulas():
    """mixlora's FFN-block site (gate/up 32 -> 64, down 64 -> 32; 8 experts of rank 8, top-2):
    the plain node runs the frozen GEMMs and the LoRAs of each selected expert; the block
    rewrites compute the frozen GEMMs once. The base is the frozen block's three GEMMs."""
    k, r, d, d_ff = 2, 8, 32, 64
    router, frozen, lora = 2 * 8 * d, 2 * d * d_ff, 2 * r * (d + d_ff)
    handle = mf.compile("mixlora", tiny("llama"))
    name = "model.layers.0.mlp"
    plain, final = handle.plain_graphs[name], handle.graphs[name]
    assert flops_per_token(plain) == router + k * 3 * (frozen + lora) == 34_304
    assert flops_per_token(final) == router + 3 * frozen + k * 3 * lora == 22_016
    assert base_flops_per_token(final) == 3 * frozen
    assert (frozen_flops_per_token(plain), frozen_flops_per_token(final)) == (k * 3 * frozen, 3 * frozen)
    assert adapter_flops_per_token(plain) == adapter_flops_per_token(final) == router + k * 3 * lora == 9_728


# ---- inspect ------------------------------------------------------------------------------------

def test_inspect_reports_sites_parameters_gamma_and_ir(model_dir, tmp_path):
    png = tmp_path / "graph.png"
    result = run("inspect", "smore", "--model", model_dir, "--graph", png)
    assert result.exit_code == 0, result.output
    out = result.output
    n = mf.count_parameters("smore", tiny("llama"))
    assert f"{n:,} trainable" in out
    assert "Γ           216" in out
    for role, dims in (("gate_proj", "32 -> 64"), ("up_proj", "32 -> 64"), ("down_proj", "64 -> 32")):
        assert re.search(rf"model\.layers\.\*\.mlp\.{role} +2 +0-1 +{dims}", out), role
    assert "tree_route %x_down gate=switch" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("preset", ["lora", "molora", "smore", "mixlora"])
def test_inspect_and_explain_print_the_same_flops(preset, model_dir, monkeypatch):
    """Per kind of site, inspect's frozen-base and adapter FLOPs are explain's base and optimised
    ones (for an FFN block, the optimised adapter part of the whole routed block). Planned for the
    torch ops, whose sibling groups keep every projection a group of its own in explain."""
    monkeypatch.setenv("MOLEFORGE_CPU_KERNELS", "0")
    out = run("inspect", preset, "--model", model_dir).output
    table = {m[1]: (m[2], m[3]) for m in re.finditer(r"^  (model\.\S+) +([\d,]+) +([\d,]+) ", out, re.M)}
    text = mf.explain(preset, tiny("llama"), ir="none")
    explained = {}
    for group in text.split("\n== ")[1:]:
        where = re.sub(r"\{[\d,]+\}", "*", group.split()[0])
        block = "FFN block" in group.splitlines()[0]
        adapter = re.search(r"adapter [\d,]+ plain -> ([\d,]+) optimised" if block else r"-> ([\d,]+) optimised",
                            group)[1]
        base = re.search(r"base FLOPs +([\d,]+) per token", group)[1]
        explained[where] = (base, adapter)
    assert table and table == explained


def test_inspect_shows_ffn_blocks_next_to_the_linear_sites(model_dir):
    """mixlora on tiny("llama"): per layer one routed block (gate/up 32 -> 64, down 64 -> 32; 8
    experts of rank 8, top-2) and rank-8 LoRAs on q/k/v/o."""
    out = run("inspect", "mixlora", "--model", model_dir).output
    assert "Γ           sites[0] (ffn_block): 28, sites[1]: 1  (routing structures per token)" in out
    assert "sites       8 linears and 2 FFN blocks get the adapter" in out
    assert re.search(r"model\.layers\.\*\.self_attn\.k_proj +2 +0-1 +32 -> 16 +sites\[1\] \(k\)", out)
    assert re.search(r"model\.layers\.\*\.mlp +2 +0-1 +32 -> 32 +sites\[0\] \(ffn_block: gate, up, down\)", out)
    assert "== model.layers.{0,1}.mlp  (2 FFN blocks, d_in 32 -> d_ff 64 -> d_out 32)" in out
    assert "recognised y = down_proj(silu(gate_proj(x)) * up_proj(x)), activation silu" in out
    for line in ("gate model.layers.{0,1}.mlp.gate_proj (32 -> 64)", "up   model.layers.{0,1}.mlp.up_proj (32 -> 64)",
                 "down model.layers.{0,1}.mlp.down_proj (64 -> 32)"):
        assert line in out
    assert "8 experts, softmax top-2 per block" in out and "routed FFN block: frozen gate_proj and up_proj" in out
    assert f"{mf.count_parameters('mixlora', tiny('llama')):,} trainable" in out
    # frozen base: three 32 x 64 GEMMs; adapter: router 2·8·32 + 2 experts x 3 LoRAs 2·8·(32 + 64)
    base, adapter = 3 * 2 * 32 * 64, 2 * 8 * 32 + 2 * 3 * 2 * 8 * (32 + 64)
    assert re.search(rf"^  model\.layers\.\*\.mlp +{base:,} +{adapter:,} +79\.2%$", out, re.M)
    assert re.search(r"IR of model\.layers\.0\.mlp after the passes \(fold_static_gates -> .*"
                     r"-> share_frozen_projections -> hoist_frozen_down\)", out)
    assert "%experts_hidden = expert_hidden %x by %route act=silu" in out


def test_inspect_one_block(model_dir):
    out = run("inspect", "mixlora", "--model", model_dir, "--site", "model.layers.1.mlp").output
    assert "IR of model.layers.1.mlp after the passes" in out
    assert out.count("\ngraph ") == 1


def test_inspect_one_site(model_dir):
    out = run("inspect", "lora", "--model", model_dir, "--site", "model.layers.1.self_attn.v_proj").output
    assert "IR of model.layers.1.self_attn.v_proj" in out
    assert out.count("\ngraph ") == 1


def test_inspect_a_spec_file(model_dir, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "mine", "sites": [{"target": {"roles": ["q", "v"]},
                                                           "adapter": {"kind": "lora", "rank": 4}}]}))
    out = run("inspect", spec, "--model", model_dir).output
    assert "spec        mine" in out and "4 linears get the adapter" in out


@pytest.mark.parametrize("args, code, message", [
    (["nosuch", "--model", "{model}"], 2, "neither a preset nor a JSON file; presets: "),
    (["missing/spec.json", "--model", "{model}"], 2, "spec file 'missing/spec.json' does not exist"),
    (["smore", "--model", "no/such/dir"], 2, "model directory 'no/such/dir' does not exist"),
    (["smore", "--model", "{empty}"], 2, "has no config.json"),
    (["smore", "--model", "{model}", "--site", "lm_head"], 2, "'lm_head' is not an adapted module"),
    (["smore"], 2, "Missing option '--model'"),
])
def test_inspect_bad_arguments_give_one_clear_error(args, code, message, model_dir, tmp_path):
    args = [a.format(model=model_dir, empty=tmp_path) for a in args]
    result = run("inspect", *args)
    assert result.exit_code == code
    assert message in result.output


def test_inspect_invalid_spec_file_names_the_field(model_dir, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"sites": [{"target": {"roles": ["gate"]}, "adapter": {"kind": "lora", "rank": 0}}]}))
    result = run("inspect", spec, "--model", model_dir)
    assert result.exit_code == 1
    assert "sites[0].adapter.lora.rank" in result.output


# ---- train ----------------------------------------------------------------------------------------

def test_train_saves_a_loadable_adapter_and_resumes(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    common = ["smore", "--model", model_dir, "--data", data_file, "--out", out, "--batch-size", "4", "--lr", "1e-2"]
    result = run("train", *common, "--steps", "4", "--save-steps", "2")
    assert result.exit_code == 0, result.output
    assert "aux_loss" in result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["trainable_parameters"] == mf.count_parameters("smore", tiny("llama"))
    model = tiny("llama")
    handle = mf.load(model, out / "adapter")
    assert any(t.abs().sum() > 0 for k, t in handle.state_dict().items() if k.endswith(".B0"))

    again = run("train", *common, "--steps", "6")
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = run("train", *common, "--steps", "6", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "checkpoint-4" in resumed.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6
    assert [h["step"] for h in summary["log_history"] if "loss" in h][:4] == [1, 2, 3, 4]

    other = run("train", "lora", *common[1:], "--steps", "8", "--resume")
    assert other.exit_code == 1 and "holds an adapter of another spec ('smore')" in other.output


def test_train_token_id_records_need_no_tokenizer(bare_model_dir, tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [1, 5 + i % 7, 9, 12, 2]}) + "\n" for i in range(6)))
    result = run("train", "lora", "--model", bare_model_dir, "--data", data, "--out", tmp_path / "run", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter" / "moleforge_model.safetensors").is_file()


def test_train_writes_the_adapter_and_summary_on_the_main_process_only(bare_model_dir, tmp_path, monkeypatch):
    """Under torchrun every process runs ``moleforge train``; only rank 0 writes ``OUT/adapter``
    and ``train_summary.json``."""
    from transformers import Trainer

    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [1, 5 + i % 7, 9, 12, 2]}) + "\n" for i in range(4)))
    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    result = run("train", "lora", "--model", bare_model_dir, "--data", data, "--out", tmp_path / "run", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "train_summary.json").exists()


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a b"}'], "text records need a tokenizer"),
    (['{"input_ids": [1, 2, 999]}'], f"token id 999 is outside the model's vocabulary of {VOCAB} ids"),
    (['{"input_ids": [1, 2]}', "not json"], ":2: not valid JSON"),
    (['{"prompt": "a"}'], "match no record shape"),
    ([], "holds no records"),
])
def test_train_bad_data_gives_one_clear_error(lines, message, bare_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines))
    result = run("train", "lora", "--model", bare_model_dir, "--data", data, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert message in result.output


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
    (["--lr", "0"], "Invalid value for '--lr'"),
    (["--tokenizer", "no/such/dir"], "holds no tokenizer"),
    (["--resume"], "holds no checkpoint-N folder"),
])
def test_train_bad_arguments_give_one_clear_error(extra, message, model_dir, data_file, tmp_path):
    result = run("train", "lora", "--model", model_dir, "--data", data_file, "--out", tmp_path / "run", *extra)
    assert result.exit_code == 2
    assert message in result.output


def test_train_missing_data_file(model_dir, tmp_path):
    result = run("train", "lora", "--model", model_dir, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "nope.jsonl' does not exist" in result.output


def test_train_fp16_without_a_gpu_is_refused(model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("train", "lora", "--model", model_dir, "--data", data_file, "--out", tmp_path / "r",
                 "--precision", "fp16")
    assert result.exit_code == 2 and "fp16 needs a CUDA GPU" in result.output


# ---- the README's examples ----------------------------------------------------------------------

def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_spec_examples_agree_and_its_records_parse():
    spec_json = next(b for b in _blocks("json") if '"sites"' in b)
    python = next(b for b in _blocks("python") if "mf.AdapterSpec(" in b)
    scope: dict = {"mf": mf}
    exec(python, scope)  # noqa: S102 - the README's own example
    assert scope["spec"] == mf.AdapterSpec.model_validate_json(spec_json)
    records = [json.loads(line) for line in next(b for b in _blocks("json") if '"prompt"' in b).splitlines()]
    tok = make_tokenizer()
    ids_record = next(r for r in records if "input_ids" in r)
    prompt_record = next(r for r in records if "prompt" in r)
    from moleforge.data import encode
    assert encode(prompt_record, tok, 64).input_ids == ids_record["input_ids"]


def test_readme_commands_are_the_ci_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    setup, demo, tests = (b.strip() for b in _blocks("bash")[:3])
    assert setup.replace("pip install ", "pip install -q ") in ci and tests in ci
    assert demo == ".venv/bin/moleforge demo"


# ---- export -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(model_dir, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-run")
    result = run("train", "lora", "--model", model_dir, "--data", data_file, "--out", out, "--steps", "3",
                 "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    return out


def test_export_merged_and_peft_give_the_adapted_logits(lora_run, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run("export", lora_run, "--merged", tmp_path / "merged", "--peft", tmp_path / "peft")
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[1, 8, 19, 21, 13, 15, 17, 2]])
    adapted = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mf.load(adapted, lora_run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     tmp_path / "peft")
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert_close(merged(input_ids=ids).logits, want, "float32_model")
        assert_close(peft(input_ids=ids).logits, want, "float32_model")


def test_export_refuses_a_routed_adapter_with_the_reason(model_dir, tmp_path):
    model = tiny("llama")
    mf.save(mf.compile("smore", model), tmp_path / "smore")
    result = run("export", tmp_path / "smore", "--model", model_dir, "--merged", tmp_path / "m")
    assert result.exit_code == 1
    assert "routes each token on its input" in result.output and "--static-only" in result.output


@pytest.mark.parametrize("args, message", [
    (["{run}"], "say what to write: --merged OUT, --peft OUT, or both"),
    (["{run}", "--peft", "x", "--static-only"], "--static-only goes with --merged"),
    (["no/such/run", "--peft", "x"], "'no/such/run' does not exist"),
    (["{empty}", "--peft", "x"], "holds no saved adapter"),
    (["{bare}", "--peft", "x"], "no base model recorded"),
])
def test_export_bad_arguments_give_one_clear_error(args, message, lora_run, tmp_path):
    bare = tmp_path / "bare"
    mf.save(mf.compile("lora", tiny("llama")), bare)
    args = [a.format(run=lora_run, empty=tmp_path / "empty", bare=bare) for a in args]
    (tmp_path / "empty").mkdir()
    result = run("export", *args)
    assert result.exit_code == 2
    assert message in result.output


# ---- damaged inputs and outputs in the way: one `Error:` line, never a traceback ---------------------

def _one_error(result) -> str:
    """The single ``Error:`` line of a failed command (``run`` already checked: no traceback)."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("content, message", [
    (b'{"input_ids": [1, 2, 3]}\n{"text": "caf\xe9"}\n', ":2: byte 0xe9 at column 14 is not UTF-8"),
    (b'{"input_ids": [1, 2, 3]}\n{"input_ids": [1, true, 3]}\n', ":2: input_ids must be a non-empty list"),
])
def test_train_bad_bytes_or_bool_token_ids_give_one_error_line(content, message, bare_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    line = _one_error(run("train", "lora", "--model", bare_model_dir, "--data", data, "--out", tmp_path / "run"))
    assert message in line and "bad.jsonl" in line


@pytest.mark.parametrize("command", ["inspect", "train"])
def test_a_damaged_model_file_gives_one_error_line(command, bare_model_dir, data_file, tmp_path):
    model = _copy(bare_model_dir, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    args = ["lora", "--model", model] + (["--data", data_file, "--out", tmp_path / "run"] if command == "train" else [])
    line = _one_error(run(command, *args))
    assert f"could not load a causal language model from {model}" in line


def test_train_out_naming_a_file_gives_one_error_line(model_dir, data_file, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    line = _one_error(run("train", "lora", "--model", model_dir, "--data", data_file, "--out", out))
    assert "is a file; --out names a folder" in line and out.read_text() == "not a folder"


def test_export_with_a_malformed_train_summary_gives_one_error_line(lora_run, tmp_path):
    copy = _copy(lora_run, tmp_path / "run")
    (copy / "train_summary.json").write_text("{not json")
    line = _one_error(run("export", copy, "--peft", tmp_path / "peft"))
    assert "train_summary.json is damaged" in line and "give --model DIR" in line
    (copy / "train_summary.json").write_text('["a list"]')
    assert "train_summary.json is damaged" in _one_error(run("export", copy, "--peft", tmp_path / "peft"))


@pytest.mark.parametrize("option", ["--merged", "--peft"])
def test_export_to_an_existing_file_gives_one_error_line(option, lora_run, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    line = _one_error(run("export", lora_run, option, out))
    assert f"is a file; {option} names a folder" in line and out.read_text() == "not a folder"


def test_export_of_an_adapter_converted_to_float16_gives_one_error_line(lora_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = _copy(lora_run, tmp_path / "run")
    weights = copy / "adapter" / "moleforge_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k).half() for k in f.keys()}
    save_file(tensors, weights, metadata=metadata)
    result = run("export", copy, "--peft", tmp_path / "peft")
    assert f"the adapter in {copy / 'adapter'}" in _one_error(result)
    assert "model.layers.0.self_attn.q_proj.A: saved as torch.float16, this adapter stores it as torch.float32" \
        in result.output and "convert the file's tensors back" in result.output
    assert not (tmp_path / "peft").exists()
