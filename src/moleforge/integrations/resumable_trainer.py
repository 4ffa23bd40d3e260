"""A HuggingFace ``Trainer`` whose checkpoints hold the adapter and resume bit-exactly.

The plain ``Trainer`` resumes only from weight files it knows (``model.safetensors``, PEFT
adapters) and writes a checkpoint file by file. ``MoleforgeTrainer`` (``mf.MoleforgeTrainer``,
which ``moleforge train`` uses) reloads the adapter that ``save_model`` wrote, restores the
adapter's noise generators with torch's RNG states, and publishes each checkpoint in one rename:

    handle = mf.compile("smore", model)
    trainer = mf.MoleforgeTrainer(model=model, args=args, train_dataset=ds, handle=handle,
                                  callbacks=[mf.MoleforgeTrainerCallback(handle)])
    handle.seed_noise(args.seed)         # after the Trainer set up torch.distributed
    trainer.train(resume_from_checkpoint=last_checkpoint_or_None)
"""

from __future__ import annotations

import os
import shutil

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from ..errors import CheckpointError
from ..interop.own_format import read_adapter
from .handle import AdapterHandle
from .noise_state import load_noise_states, save_noise_states

__all__ = ["MoleforgeTrainer", "STAGING"]


class MoleforgeTrainer(Trainer):
    """``Trainer`` for a model holding a compiled adapter ``handle`` whose runs resume bit-exactly
    (on the same number of processes): resuming reloads the
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
                                  "with, or choose another output folder")
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
    try:
        fd = os.open(os.path.dirname(final), os.O_RDONLY)
    except OSError:  # a folder cannot be opened outside POSIX systems
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
