"""``python kill_after_checkpoint.py N ARGS...`` runs ``moleforge ARGS...`` and kills its own
process with SIGKILL while the Trainer writes ``checkpoint-N``: after the adapter, the optimizer
and the scheduler are on disk, before the RNG states. A run stopped as by ``kill -9`` at a known
step, in the middle of a save; every earlier checkpoint is complete."""

from __future__ import annotations

import os
import signal
import sys

from moleforge.cli import hf_trainer, main

KILL_AT = int(sys.argv.pop(1))
_save_rng_state = hf_trainer.AdapterTrainer._save_rng_state


def _die_while_saving(self, output_dir: str) -> None:
    if self.state.global_step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    _save_rng_state(self, output_dir)


hf_trainer.AdapterTrainer._save_rng_state = _die_while_saving

if __name__ == "__main__":
    sys.exit(main())
