"""``python kill_after_checkpoint.py N ARGS...`` runs ``moleforge ARGS...`` and kills its own
process with SIGKILL right after the Trainer wrote ``checkpoint-N`` (every rank first meets at a
barrier, so all of the checkpoint is on disk): a run stopped as by ``kill -9``, at a known step."""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from moleforge.cli import hf_trainer, main

KILL_AT = int(sys.argv.pop(1))
_save = hf_trainer.AdapterTrainer._save_checkpoint


def _save_then_die(self, model, trial) -> None:
    _save(self, model, trial)
    if self.state.global_step == KILL_AT:
        if dist.is_initialized():
            dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)


hf_trainer.AdapterTrainer._save_checkpoint = _save_then_die

if __name__ == "__main__":
    sys.exit(main())
