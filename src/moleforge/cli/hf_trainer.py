"""The HF ``Trainer`` pieces ``moleforge train`` uses: a dataset of encoded examples, a
padding collator, and a Trainer that resumes from checkpoints holding only the adapter.
Aux-loss and routing logs and the balancing update come from ``mf.MoleforgeTrainerCallback``."""

from __future__ import annotations

import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from ..data import Example, collate
from ..errors import CheckpointError
from ..integrations.handle import AdapterHandle
from ..integrations.noise_state import load_noise_states, save_noise_states
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
    through the model's ``save_pretrained``), after checking it belongs to the same spec, and
    the adapter's noise generators with the Trainer's RNG states.

    A checkpoint is written whole or not at all: every rank writes its part (adapter, optimizer,
    scheduler, RNG states, the noise generators) into ``OUT/.staging/checkpoint-N``, and once all
    have, the main process moves the folder to ``OUT/checkpoint-N`` in one rename. A process
    killed while writing leaves no ``checkpoint-N`` folder; the next save clears the staging."""

    def __init__(self, *args, handle: AdapterHandle, **kwargs):
        super().__init__(*args, **kwargs)
        self.handle = handle
        self._staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
            save_noise_states(self.handle, os.path.join(self._staging, name), self.args.process_index)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _publish(os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            load_noise_states(self.handle, checkpoint, self.args.process_index)

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


STAGING = ".staging"
"""The folder in ``OUT`` where a checkpoint is written before it is moved into place."""


def _publish(staged: str, final: str) -> None:
    """Move a complete checkpoint folder into place and make the rename durable."""
    if os.path.isdir(final):  # a run resumed from an earlier checkpoint saves this step again
        shutil.rmtree(final)
    os.replace(staged, final)
    shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(out: str | os.PathLike) -> list[str]:
    """``checkpoint-N`` folders in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [d for d in os.listdir(out) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return [os.path.join(out, d) for d in sorted(found, key=lambda d: int(d.split("-")[-1]))]
