"""The HF ``Trainer`` pieces ``moleforge train`` uses: a dataset of encoded examples, a
padding collator, and a Trainer that logs the aux loss, steps balancing biases, and
checkpoints only the adapter (``mf.save`` format), so resuming reloads just that."""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from ..backends.export import read_adapter
from ..compiler import AdapterHandle, save
from ..data import Example, collate
from ..errors import CheckpointError

__all__ = ["ExampleDataset", "PadCollator", "AdapterTrainer", "BalancingCallback"]


class ExampleDataset(torch.utils.data.Dataset):
    """Encoded examples, one dict of token-id lists per item (the collator pads them)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class PadCollator:
    """``collate`` with a fixed pad id: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id)


class BalancingCallback(TrainerCallback):
    """Step the SMoRA / FlyLoRA balancing biases once per optimizer step."""

    def __init__(self, handle: AdapterHandle):
        self.handle = handle

    def on_step_end(self, args, state, control, **kwargs):
        self.handle.update_balancing()


class AdapterTrainer(Trainer):
    """``Trainer`` for a model holding a compiled adapter ``handle``.

    - logs ``aux_loss``: the mean weighted aux loss of the training forwards since the
      last log (``out.loss`` already includes it; this shows its share);
    - ``_save`` writes the adapter with ``mf.save`` (``moleforge_config.json`` +
      ``moleforge_model.safetensors``) instead of the whole model;
    - ``_load_from_checkpoint`` loads those tensors back into the adapter on resume.
    """

    def __init__(self, *args, handle: AdapterHandle, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle = handle
        self._aux_sum = 0.0
        self._aux_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux is not None and model.training:
            self._aux_sum += float(aux.detach())
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._aux_count and "loss" in logs:
            logs["aux_loss"] = round(self._aux_sum / self._aux_count, 6)
            self._aux_sum, self._aux_count = 0.0, 0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save(self.handle, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        config, tensors = read_adapter(resume_from_checkpoint)
        own = self.handle.state_dict()
        if config.get("spec") != self.handle.spec.model_dump(mode="json"):
            raise CheckpointError(f"{resume_from_checkpoint} holds an adapter of another spec "
                                  f"({config.get('spec', {}).get('name')!r}); resume with the spec it was trained "
                                  "with, or choose another --out")
        problems = sorted(set(own) ^ set(tensors))
        problems += [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
        if problems:
            raise CheckpointError(f"{resume_from_checkpoint} does not fit this model: {', '.join(problems[:5])}"
                                  + (" ..." if len(problems) > 5 else ""))
        self.handle.load_state_dict(tensors)


def checkpoint_dirs(out: str | os.PathLike) -> list[str]:
    """``checkpoint-N`` folders in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [d for d in os.listdir(out) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return [os.path.join(out, d) for d in sorted(found, key=lambda d: int(d.split("-")[-1]))]
