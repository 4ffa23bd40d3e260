"""``moleforge demo`` with a handful of steps: everything it promises is written, the numbers
in its report are the numbers of what it saved, and its tasks are what they say."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner

import moleforge as mf
from moleforge.cli import main
from moleforge.data import encode_all, read_jsonl
from moleforge.demo import build_model, matched_lora
from moleforge.demo.loop import evaluate
from moleforge.demo.run import _batches
from moleforge.demo.tasks import PRETRAIN_TASKS, TASKS, VOCAB, make_tokenizer, pretrain_batch, solve, task_records
from tolerances import assert_close


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "3", "--pretrain-steps", "3", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_writes_every_promised_file(demo):
    out, printed = demo
    for name in ("loss_curves.png", "expert_load.png", "routing_trees.png", "report.txt", "report.json",
                 "data/train.jsonl", "base_model/config.json", "base_model/tokenizer.json",
                 "adapters/smore/moleforge_model.safetensors"):
        assert (out / name).is_file(), name
    block = printed.split("written:")[1].split("next:")[0]
    listed = [line.split()[-1] for line in block.splitlines() if line.strip()]
    assert listed and all(Path(p).exists() for p in listed)
    for png in ("loss_curves.png", "expert_load.png", "routing_trees.png"):
        height, width, _ = matplotlib.image.imread(out / png).shape
        assert height > 300 and width > 800, png


def test_three_methods_at_one_budget_and_a_stated_result(demo):
    out, printed = demo
    report = json.loads((out / "report.json").read_text())
    names = list(report["methods"])
    assert names[0] == "smore" and names[1].startswith("molora r=") and names[2].startswith("lora r=")
    budget = report["methods"]["smore"]["parameters"]
    for name in names[1:]:
        assert abs(report["methods"][name]["parameters"] - budget) / budget < 0.05, name
    molora = mf.AdapterSpec.model_validate(json.loads((Path(report["methods"][names[1]]["adapter"])
                                                       / "moleforge_config.json").read_text())["spec"])
    assert molora.sites[0].target.roles == ["gate", "up", "down"]
    result = next(line for line in printed.splitlines() if line.startswith("result:"))
    exact = {n: sum(s["exact"] for s in report["methods"][n]["scores"].values()) / len(TASKS) for n in names}
    for name in names:
        assert f"{name} {100 * exact[name]:.0f}%" in result
    assert "Best here: " in result


def test_report_counts_match_the_saved_models(demo):
    out, printed = demo
    report = json.loads((out / "report.json").read_text())
    base = build_model()  # the shape the counts depend on
    smore, lora = report["methods"]["smore"], next(v for k, v in report["methods"].items() if k.startswith("lora"))
    assert smore["parameters"] == mf.count_parameters("smore", base)
    assert (smore["gamma"], lora["gamma"]) == (216, 1)
    assert f"{smore['parameters']:,}" in printed and f"{lora['parameters']:,}" in printed
    lora_spec = mf.AdapterSpec.model_validate(json.loads((Path(lora["adapter"]) / "moleforge_config.json")
                                                         .read_text())["spec"])
    assert lora["parameters"] == mf.count_parameters(lora_spec, base)


def test_saved_adapters_reproduce_the_reported_scores(demo):
    out, _ = demo
    from transformers import AutoModelForCausalLM

    report = json.loads((out / "report.json").read_text())
    tok = make_tokenizer()
    batches = _batches(task_records(), tok, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    for method in report["methods"].values():
        handle = mf.load(model, method["adapter"])
        scores = evaluate(model, batches)
        for task in TASKS:
            assert_close(torch.tensor(scores[task].loss), torch.tensor(method["scores"][task]["loss"]), "float32")
        handle.remove()


def test_training_data_file_is_the_task_set(demo):
    out, _ = demo
    records = read_jsonl(out / "data" / "train.jsonl")
    assert [(r["prompt"], r["completion"]) for r in records] == [(r["prompt"], r["completion"])
                                                                  for r in task_records()]
    assert len(encode_all(records, make_tokenizer(), 64)) == 10 * len(TASKS)


def test_matched_lora_rank_is_the_closest_budget():
    model = build_model()
    smore = mf.presets.load("smore")
    spec, rank = matched_lora(smore, model)
    budget = mf.count_parameters(smore, model)
    gap = abs(mf.count_parameters(spec, model) - budget)
    for other in (rank - 1, rank + 1):
        alt = spec.model_copy(update={"sites": [spec.sites[0].model_copy(update={
            "adapter": spec.sites[0].adapter.model_copy(update={"rank": other})})]})
        assert gap <= abs(mf.count_parameters(alt, model) - budget)


def test_tasks_count_on_by_their_step():
    assert solve(TASKS["+2"], 7) == [9, 1, 3, 5]
    assert solve(TASKS["+5"], 7) == [2, 7, 2, 7]
    assert solve(TASKS["-2"], 1) == [9, 7, 5, 3]
    assert set(TASKS).isdisjoint(PRETRAIN_TASKS)
    batch = pretrain_batch(torch.Generator().manual_seed(0), 16)["input_ids"]  # (16, 8)
    for row in batch.tolist():
        tag, start, *answer = [VOCAB[i] for i in row[1:-1]]
        assert [int(a) for a in answer] == solve(PRETRAIN_TASKS[tag], int(start))


def test_importing_moleforge_loads_neither_the_command_nor_the_demo():
    import subprocess
    import sys
    code = ("import sys, moleforge; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'click') or m.startswith(('moleforge.demo', 'moleforge.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_lora_is_exported_merged_and_smore_is_not(demo):
    out, printed = demo
    from transformers import AutoModelForCausalLM

    report = json.loads((out / "report.json").read_text())
    lora = next(v for k, v in report["methods"].items() if k.startswith("lora"))
    assert report["methods"]["smore"]["merged"].startswith("not mergeable")
    merged = AutoModelForCausalLM.from_pretrained(lora["merged"], dtype=torch.float32)
    adapted = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    mf.load(adapted, lora["adapter"])
    ids = _batches(task_records(), make_tokenizer(), 0)["+2"]["input_ids"]
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, "float32_model")
    assert (Path(lora["merged"]) / "tokenizer.json").is_file()
