"""Routing by task inside HF models: ``task_ids`` as a model input (a plain call, the HF Trainer's
extra column, the ``train`` command's JSONL ``task`` field); hard routing over PEFT LoRA folders
gives each sample its own LoRA's logits; MeteoRA trained on a mixture of tasks routes held-out
samples of task i to LoRA i."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

import moleforge as mf
from models import VOCAB, tiny
from peft_helpers import make_peft_adapter
from tolerances import assert_close

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("task-loras")
    return [make_peft_adapter("llama", d / f"task{i}", seed=20 + i, r=4, lora_alpha=8, target_modules=MODULES)
            for i in range(3)]


def _spec(folders, router, aux=()):
    return {"name": "by-task", "sites": [{"target": {"roles": ["q", "v", "down"]},
                                          "adapter": {"kind": "pool", "router": router, "aux_losses": list(aux),
                                                      "experts_from": [{"path": str(p)} for p in folders]}}]}


def _task_batch(task: int, seed: int, B: int = 2, S: int = 8) -> torch.Tensor:
    """Task i's sequences use six tokens of its own."""
    lo = 1 + task * (VOCAB // 3)
    return torch.randint(lo, lo + 6, (B, S), generator=torch.Generator().manual_seed(seed))


def test_hard_routing_gives_each_sample_its_task_lora(folders):
    model = tiny("llama")
    mf.compile(_spec(folders, {"kind": "task"}), model)
    ids = torch.cat([_task_batch(t, 1, B=1) for t in (2, 0, 1)])
    with torch.no_grad():
        got = model.eval()(ids, task_ids=torch.tensor([2, 0, 1])).logits
    for row, task in enumerate((2, 0, 1)):
        peft = PeftModel.from_pretrained(tiny("llama"), str(folders[task])).eval()
        with torch.no_grad():
            assert_close(got[row], peft(ids[row:row + 1]).logits[0], "float32_model")


def test_a_task_router_without_task_ids_is_an_input_error(folders):
    model = tiny("llama")
    mf.compile(_spec(folders, {"kind": "task"}), model)
    with pytest.raises(mf.errors.InputError, match="without task ids"):
        model(_task_batch(0, 1))
    with pytest.raises(mf.errors.InputError, match=r"task id 5 is outside \[0, 3\)"):
        model(_task_batch(0, 1), task_ids=torch.tensor([0, 5]))
    with pytest.raises(mf.errors.InputError, match="task_ids must be integers"):
        model(_task_batch(0, 1), task_ids=torch.tensor([0.0, 1.0]))


def test_supervised_loss_warns_once_without_task_ids_in_training(folders):
    model = tiny("llama").train()
    mf.compile(_spec(folders, {"kind": "topk", "k": 2}, [{"kind": "task_routing", "weight": 1.0}]), model)
    ids = _task_batch(0, 1)
    with pytest.warns(UserWarning, match="without task_ids"):
        out = model(ids, labels=ids)
    assert float(out.aux_loss.detach()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(ids, labels=ids, task_ids=torch.tensor([1, 2]))
    assert float(out.aux_loss.detach()) > 0


def _routing_accuracy(model, handle, seed: int) -> dict[int, float]:
    """Per task: the share of (token, site) whose largest gate is the task's LoRA, on held-out
    samples given without task ids."""
    acc = {}
    for task in range(3):
        with handle.record_routing() as log, torch.no_grad():
            model.eval()(_task_batch(task, seed, B=4))
        top = torch.cat([routes["route"].gates.argmax(1) for _, routes in log.entries])
        acc[task] = float((top == task).double().mean())
    return acc


def test_meteora_routes_held_out_samples_of_task_i_to_lora_i(folders):
    spec = mf.presets.load("meteora").model_dump()
    pool = spec["sites"][0]["adapter"]
    for key in ("experts", "rank", "alpha", "frozen_experts"):
        pool.pop(key)
    pool["experts_from"] = [{"path": str(p)} for p in folders]
    spec["sites"][0]["target"] = {"roles": ["q", "v", "down"]}
    model = tiny("llama")
    handle = mf.compile(spec, model)
    before = _routing_accuracy(model, handle, seed=999)
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-1)
    model.train()
    for step in range(150):
        ids = torch.cat([_task_batch(t, 100 * step + t) for t in range(3)])
        out = model(ids, labels=ids, task_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = _routing_accuracy(model, handle, seed=999)
    print("routing accuracy per task, before and after training:", before, after)
    assert min(after.values()) > 0.9, (before, after)
    assert min(before.values()) < 0.9, "the untrained router must not route by task already"


def test_trainer_passes_the_task_ids_column(folders, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny("llama")
    handle = mf.compile(_spec(folders, {"kind": "task_embedding", "reads": "task", "k": 1}), model)
    rows = [{"input_ids": _task_batch(t, s, B=1)[0], "labels": _task_batch(t, s, B=1)[0], "task_ids": t}
            for s in range(4) for t in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3,
                             remove_unused_columns=False, report_to="none", use_cpu=True, learning_rate=0.1)
    Trainer(model=model, args=args, train_dataset=rows).train()
    table = next(iter(handle.modules.values())).site.task_table
    assert table.abs().max() > 0, "the task embeddings must have trained"


def test_train_command_reads_the_jsonl_task_field(folders, tmp_path):
    from click.testing import CliRunner

    from moleforge.cli import main

    tiny("llama").save_pretrained(tmp_path / "model")
    names = ["math", "code", "chat"]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": _task_batch(t, s, B=1)[0].tolist(), "task": names[t]})
                              for s in range(3) for t in range(3)) + "\n")
    args = ["train", "meteora", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "3", "--experts", ",".join(str(p) for p in folders)]
    run = CliRunner().invoke(main, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "tasks: 'chat' -> 0, 'code' -> 1, 'math' -> 2" in run.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert any(h.get("aux_loss", 0) > 0 for h in summary["log_history"]), "the supervised loss must be on"


@pytest.mark.parametrize("router, words", [
    ({"kind": "task"}, "softmax top-1 of one-hot task ids (task t -> expert t)"),
    ({"kind": "task_embedding", "k": 1}, "softmax top-1 of token logits + task embeddings (3 tasks)"),
    ({"kind": "task_embedding", "reads": "task", "k": None, "tasks": 2}, "dense softmax of task embeddings (2 tasks)"),
])
def test_explain_says_what_the_router_reads_of_the_task(router, words):
    spec = {"sites": [{"target": {"roles": ["q"]}, "adapter": {"kind": "pool", "experts": 3, "rank": 2,
                                                               "router": router}}]}
    assert f"pool of 3 experts of rank 2, {words}" in mf.explain(spec, tiny("llama"), ir="none")
