"""The HF ``Trainer`` pieces ``moleforge train`` uses: a dataset of encoded examples, a
padding collator, and a Trainer that resumes from checkpoints holding only the adapter.
Aux-loss and routing logs and the balancing update come from ``mf.MoleforgeTrainerCallback``."""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from ..data import Example, collate
from ..errors import CheckpointError
from ..integrations.handle import AdapterHandle
from ..interop import read_adapter

__all__ = ["ExampleDataset", "PadCollator", "AdapterTrainer", "checkpoint_dirs"]


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


class AdapterTrainer(Trainer):
    """``Trainer`` for a model holding a compiled adapter ``handle``: resuming reloads the
    adapter from a ``checkpoint-N`` folder (which ``save_model`` wrote in ``mf.save`` format,
    through the model's ``save_pretrained``), after checking it belongs to the same spec."""

    def __init__(self, *args, handle: AdapterHandle, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle = handle

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
