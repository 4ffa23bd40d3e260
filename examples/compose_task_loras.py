"""Train three task LoRAs with PEFT on a small model, then compose them with moleforge four ways
(X-LoRA, CAT / LoRA Soups, MeteoRA, LoRA-Mixer) and print each method's exact-match accuracy per
task, next to each single LoRA and a multi-task LoRA of the same rank budget. Offline, about two
minutes on two CPU cores. One run printed (exact match on +2 / -2 / +4, mean): single LoRAs 1.0 on
their own task and 0.0 on the others; the multi-task LoRA 1.0 each; LoRA-Mixer 1.0 / 0.8 / 0.8 (0.87);
MeteoRA 0.6 / 0.7 / 0.5 (0.60); X-LoRA 0.3 / 0.3 / 0.1 (0.23); CAT 0.0 / 0.1 / 0.0 (0.03).

    python examples/compose_task_loras.py --out runs/compose

The base model is the demo's small Llama-style model pretrained on counting tasks (+1 -1 +3 -3);
the task LoRAs learn +2, -2 and +4 (`moleforge.demo.tasks`); the task shows in the prompt only
through its first two numbers.

CAT learns one input-independent weight per expert and module: the same mixture for every prompt.
Each LoRA here was trained on its own task alone, so no fixed mixture continues all three
sequences; CAT's weights are trained right (on one task's prompts alone they reach that LoRA's
accuracy), and they start at the mean of the experts (``start: "mean"``): from the sum, the
three updates added at full strength gave a loss of 3.8 that 150 steps only brought to 2.4, where
from the mean they reach 1.1 (exact match stays near 0 either way). The routers that see the
prompt (X-LoRA, MeteoRA, LoRA-Mixer) can pick a LoRA per token; X-LoRA's classifier learns slowest
of them here (150 steps on 30 prompts; it gains with more steps).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import moleforge as mf
from moleforge.cli.experts import with_experts
from moleforge.data import collate, encode_all, number_tasks
from moleforge.demo.loop import _train, evaluate, finetune, pretrain
from moleforge.demo.run import build_model
from moleforge.demo.tasks import make_tokenizer, task_record

TASKS = ("+2", "-2", "+4")
ROUTER = {"xlora": {"size": 64, "layerwise": True, "dropout": 0.0}}
"""Router settings for this small model (hidden 128): X-LoRA's classifier sized to it (the preset's is
PEFT's 2048-wide one), one set of scalings per adapted linear."""
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _examples(tokenizer, tasks=TASKS):
    """Every prompt of ``tasks``, with the task id of LoRA i = TASKS[i] (MeteoRA's labels)."""
    records = [dict(task_record(t, s), task=TASKS.index(t)) for t in tasks for s in range(10)]
    return number_tasks(encode_all(records, tokenizer, 64))[0]


def _peft_lora(base, examples, rank: int, steps: int, pad_id: int, seed: int, out: Path) -> Path:
    """A PEFT LoRA trained on ``examples`` with a plain loop, saved to ``out``."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES))
    gen = torch.Generator().manual_seed(seed)

    def batches(step: int):
        pick = torch.randint(0, len(examples), (32,), generator=gen).tolist()
        batch = collate([examples[i] for i in pick], pad_id)
        batch.pop("task_ids", None)
        return batch

    _train(model, [p for p in model.parameters() if p.requires_grad], batches, steps, 3e-3, out.name, False)
    model.save_pretrained(str(out))
    return out


def _scores(model, tokenizer, pad_id: int) -> dict[str, float]:
    batches = {}
    for t in TASKS:
        b = collate(encode_all([task_record(t, s) for s in range(10)], tokenizer, 64), pad_id)
        batches[t] = {k: v for k, v in b.items() if k != "task_ids"}  # no task labels at test time
    with torch.no_grad():
        return {t: s.exact for t, s in evaluate(model, batches).items()}


def _composed(base, preset: str, folders, examples, steps: int, pad_id: int, tokenizer):
    model = copy.deepcopy(base)
    spec = with_experts(mf.presets.load(preset), [",".join(map(str, folders))]).model_dump()
    for site in spec["sites"]:
        site["adapter"]["router"].update(ROUTER.get(preset, {}))
    handle = mf.compile(spec, model)
    finetune(handle, examples, steps, pad_id=pad_id, lr=1e-2, progress=False)
    return _scores(model, tokenizer, pad_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compose")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--lora-steps", type=int, default=200)
    ap.add_argument("--compose-steps", type=int, default=150)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    tokenizer = make_tokenizer()
    pad = tokenizer.pad_token_id
    torch.manual_seed(0)
    base = build_model()
    pretrain(base, args.pretrain_steps, progress=False)
    for p in base.parameters():
        p.requires_grad_(False)
    base.eval()

    folders = [_peft_lora(base, _examples(tokenizer, (t,)), args.rank, args.lora_steps, pad, i, out / f"lora{t}")
               for i, t in enumerate(TASKS)]
    mixed = _examples(tokenizer)
    multi = _peft_lora(base, mixed, len(TASKS) * args.rank, args.lora_steps * len(TASKS), pad, 9, out / "multitask")

    rows: dict[str, dict[str, float]] = {}
    for name, path in [*((f"LoRA {t}", f) for t, f in zip(TASKS, folders)),
                       (f"multi-task LoRA (rank {len(TASKS) * args.rank})", multi)]:
        model = copy.deepcopy(base)
        mf.from_peft(model, path)
        rows[name] = _scores(model, tokenizer, pad)
    for name, preset in [("X-LoRA", "xlora"), ("CAT / LoRA Soups", "lora_soups"), ("MeteoRA", "meteora"),
                         ("LoRA-Mixer", "lora_mixer")]:
        rows[name] = _composed(base, preset, folders, mixed, args.compose_steps, pad, tokenizer)

    width = max(map(len, rows))
    print("\nexact-match accuracy per task (10 prompts each); base pretrained on +1 -1 +3 -3\n")
    print(f"{'method':<{width}}  " + "  ".join(f"{t:>5}" for t in TASKS) + "   mean")
    for name, s in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{s[t]:5.2f}" for t in TASKS) + f"  {sum(s.values()) / len(s):5.2f}")


if __name__ == "__main__":
    main()
