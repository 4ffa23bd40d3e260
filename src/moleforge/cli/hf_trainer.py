"""The HF ``Trainer`` pieces ``moleforge train`` uses: a dataset of encoded examples, a
padding collator, and a Trainer that resumes from checkpoints holding only the adapter.
Aux-loss and routing logs and the balancing update come from ``mf.MoleforgeTrainerCallback``."""

from __future__ import annotations

import os

import torch

from ..data import Example, collate
from ..integrations.resumable_trainer import MoleforgeTrainer

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


AdapterTrainer = MoleforgeTrainer
"""The Trainer ``moleforge train`` runs (``mf.MoleforgeTrainer``)."""


def checkpoint_dirs(out: str | os.PathLike) -> list[str]:
    """``checkpoint-N`` folders in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [d for d in os.listdir(out) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return [os.path.join(out, d) for d in sorted(found, key=lambda d: int(d.split("-")[-1]))]
