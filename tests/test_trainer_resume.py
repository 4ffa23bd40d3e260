"""``mf.MoleforgeTrainer``, the HF Trainer with a compiled adapter, in a script of one's own:
resumed from a checkpoint of a run, it ends bit-identical to that run (adapter, optimizer, torch's
RNG state, the adapter's noise generators, the logged losses and aux losses), and its checkpoints
appear whole (``tests/test_resume_exact.py`` kills ``moleforge train`` mid-save)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

import moleforge as mf
from models import VOCAB, tiny
from test_resume_exact import SPEC, same

STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (12, 7), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfter(TrainerCallback):
    """Ends training after step ``step`` (after its checkpoint): a run interrupted there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def _train(out: Path, resume: Path | None = None, stop: int | None = None) -> None:
    torch.manual_seed(0)  # the adapter's initial values
    model = tiny("llama", layers=1).train()
    handle = mf.compile(mf.AdapterSpec.model_validate(json.loads(SPEC.read_text())), model)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=0.01,
                             save_steps=1, logging_steps=1, save_total_limit=1, report_to="none", use_cpu=True,
                             seed=7, dataloader_num_workers=0, disable_tqdm=True)
    trainer = mf.MoleforgeTrainer(model=model, args=args, train_dataset=Tokens(), handle=handle,
                                  callbacks=[mf.MoleforgeTrainerCallback(handle)] + ([StopAfter(stop)] if stop else []))
    handle.seed_noise(7)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))


def _last(out: Path) -> dict:
    last = out / f"checkpoint-{STEPS}"
    logs = json.loads((last / "trainer_state.json").read_text())["log_history"]
    state = {"files": sorted(p.name for p in last.iterdir()),
             "logs": [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k
                       and k != "total_flos"} for h in logs]}
    for name in state["files"]:
        if name.endswith((".pt", ".pth")):
            state[name] = torch.load(last / name, weights_only=False)
        elif name.endswith(".safetensors"):
            state[name] = load_file(last / name)
    return state


def test_moleforge_trainer_resumes_a_run_bit_exactly(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(tmp_path / "whole")
        _train(tmp_path / "first", stop=2)
        assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["checkpoint-2"]
        _train(tmp_path / "again", resume=tmp_path / "first" / "checkpoint-2")
    finally:
        torch.set_num_threads(threads)
    want = _last(tmp_path / "whole")
    assert "moleforge_noise_0.safetensors" in want["files"] and "optimizer.pt" in want["files"]
    assert [h["step"] for h in want["logs"] if "aux_loss" in h] == list(range(1, STEPS + 1))
    same(want, _last(tmp_path / "again"), "run")
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == [f"checkpoint-{STEPS}"], "no staging left"
