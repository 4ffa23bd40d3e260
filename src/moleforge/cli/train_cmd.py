"""``moleforge train SPEC --model DIR --data FILE.jsonl --out DIR``: fine-tune an adapter
with the HF Trainer, checkpoint it, resume it, and save the final adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..data import DataError, Example, encode_all, number_tasks, read_jsonl
from ..interop.atomic import atomic_write
from .common import friendly_errors, load_model, load_spec, load_tokenizer
from .experts import experts_option, with_experts

__all__ = ["train_cmd"]


def _check_out(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from, or ``None``; refuses to mix runs in one folder."""
    from .hf_trainer import checkpoint_dirs

    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{str(out)!r} is a file; --out names a folder for checkpoints and the adapter",
                                 param_hint="--out")
    found = checkpoint_dirs(out)
    if resume and not found:
        raise click.UsageError(f"--resume: {out} holds no checkpoint-N folder to resume from")
    if found and not resume:
        raise click.UsageError(f"{out} already holds checkpoints (last: {Path(found[-1]).name}); "
                               "pass --resume to continue that run, or choose another --out")
    return found[-1] if resume else None


def _say(text: str) -> None:
    """Print on the main process only: under ``torchrun`` every rank runs this command, and the
    Trainer logs from rank 0 alone."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(text)


def _check_vocab(examples: list[Example], vocab: int, data: str) -> None:
    top = max(max(e.input_ids) for e in examples)
    if top >= vocab:
        raise DataError(f"{data}: token id {top} is outside the model's vocabulary of {vocab} ids")


def _precision_flags(precision: str) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise click.UsageError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda}


@click.command("train")
@click.argument("spec")
@click.option("--model", "model_dir", required=True, metavar="DIR",
              help="A local HuggingFace model directory (as save_pretrained writes it).")
@click.option("--data", "data_path", required=True, metavar="FILE.jsonl",
              help='JSON Lines, one record per line: {"text": ...}, {"prompt": ..., "completion": ...} '
                   '(loss on the completion only) or {"input_ids": [...]}.')
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Where checkpoints (checkpoint-N/) and the final adapter (adapter/) go.")
@click.option("--tokenizer", "tokenizer_dir", metavar="DIR", help="Tokenizer directory.  [default: --model]")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (linear warm-up over 5% of the steps, then linear decay).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Mixed precision of the forward pass; weights stay float32. fp16 needs a CUDA GPU.")
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Cut longer sequences to this many tokens.")
@click.option("--save-steps", type=click.IntRange(min=1), help="Checkpoint every N steps.  [default: steps / 4]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@experts_option
@friendly_errors
def train_cmd(spec: str, model_dir: str, data_path: str, out_dir: str, tokenizer_dir: str | None, steps: int,
              batch_size: int, lr: float, precision: str, max_length: int, save_steps: int | None, seed: int,
              resume: bool, experts: tuple[str, ...] = ()) -> None:
    """Fine-tune SPEC on a model with the HuggingFace Trainer.

    SPEC is a preset name (see `moleforge presets`) or a JSON spec file. Only the
    adapter trains; checkpoints hold only the adapter. The final adapter is written
    to OUT/adapter (load it with `mf.load(model, "OUT/adapter")`).

    \b
    Example:
      moleforge train smore --model runs/demo/base_model \\
          --data runs/demo/data/train.jsonl --out runs/my-smore --steps 200

    On several processes, start it with torchrun (data parallel: --batch-size is per
    process; rank 0 writes the checkpoints and the adapter):

    \b
      torchrun --nproc_per_node 4 -m moleforge train smore --model ... --data ... --out ...
    """
    out = Path(out_dir)
    last = _check_out(out, resume)
    spec_obj = with_experts(load_spec(spec), experts)
    flags = _precision_flags(precision)
    if tokenizer_dir is not None and load_tokenizer(tokenizer_dir) is None:
        raise click.BadParameter(f"{tokenizer_dir!r} holds no tokenizer (tokenizer.json or tokenizer_config.json)",
                                 param_hint="--tokenizer")
    records = read_jsonl(data_path)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    examples = encode_all(records, tokenizer, max_length)
    _check_vocab(examples, model.get_input_embeddings().num_embeddings, data_path)
    _say(f"data: {len(examples)} sequences from {data_path}")
    _train(spec_obj, model, tokenizer, examples, out, last, flags,
           dict(steps=steps, batch_size=batch_size, lr=lr, save_steps=save_steps or max(1, steps // 4), seed=seed,
                model=str(Path(model_dir).resolve())))


def _tasks_for(handle, examples: list[Example]) -> list[Example]:
    """The records' tasks as ids when the adapter routes by task (the batches then carry
    ``task_ids``); dropped otherwise."""
    from ..integrations.task_ids import reads_task_ids

    if not reads_task_ids(handle.graphs):
        return [Example(e.input_ids, e.labels) for e in examples]
    numbered, ids = number_tasks(examples)
    if not ids:
        raise DataError("this adapter routes by task: give every JSONL record a 'task' field (an id 0, 1, ... "
                        "or a name; names are numbered in sorted order)")
    _say("tasks: " + ", ".join(f"{name!r} -> {i}" for name, i in ids.items()))
    return numbered


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _train(spec, model, tokenizer, examples, out: Path, last: str | None, flags: dict, opts: dict) -> None:
    from transformers import TrainingArguments, set_seed

    from .. import compiler
    from ..integrations.trainer import MoleforgeTrainerCallback
    from .hf_trainer import AdapterTrainer, ExampleDataset, PadCollator

    set_seed(opts["seed"])  # the adapter's initial values (a spec without init.seed draws from torch's generator)
    handle = compiler.compile(spec, model)
    n = sum(p.numel() for p in handle.trainable_parameters())
    _say(f"adapter: {spec.name}, {len(handle.modules)} sites, {n:,} trainable parameters")
    examples = _tasks_for(handle, examples)
    args = TrainingArguments(
        output_dir=str(out), max_steps=opts["steps"], per_device_train_batch_size=opts["batch_size"],
        learning_rate=opts["lr"], warmup_steps=max(0, round(0.05 * opts["steps"])), weight_decay=0.0,
        logging_steps=max(1, opts["steps"] // 20), logging_first_step=True, save_strategy="steps",
        save_steps=opts["save_steps"], save_total_limit=2, report_to="none", remove_unused_columns=False,
        seed=opts["seed"], dataloader_num_workers=0, **flags)
    collator = PadCollator(_pad_id(tokenizer))
    trainer = AdapterTrainer(model=model, args=args, train_dataset=ExampleDataset(examples), handle=handle,
                             data_collator=collator, callbacks=[MoleforgeTrainerCallback(handle)])
    # after the Trainer set up torch.distributed: each rank draws its own routing noise
    handle.seed_noise(opts["seed"])
    if last is not None:
        _say(f"resuming from {last}")
    result = trainer.train(resume_from_checkpoint=last)
    try:
        if trainer.is_world_process_zero():  # under torchrun, one process writes the results
            _finish(trainer, handle, spec, result, out, n, opts)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, every rank waits for rank 0's writes, then leaves the process group
    (a rank that exits while gloo's threads still run aborts with SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _finish(trainer, handle, spec, result, out: Path, n: int, opts: dict) -> None:
    from ..interop.checkpoint import save

    path = save(handle, out / "adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"spec": spec.name, "model": opts["model"], "steps": trainer.state.global_step,
               "trainable_parameters": n, "final_loss": losses[-1] if losses else None,
               "train_runtime_s": result.metrics.get("train_runtime"), "log_history": trainer.state.log_history}
    atomic_write(out / "train_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    last_loss = f"{losses[-1]:.4f}" if losses else "n/a"
    click.echo(f"done: {trainer.state.global_step} steps, last logged loss {last_loss}; adapter saved to {path}")
