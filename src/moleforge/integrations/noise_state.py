"""The state of an adapter's own noise generators, saved beside a checkpoint so that a resumed run
draws the router noise and the dropout masks an uninterrupted run would have drawn.

``handle.seed_noise(seed)`` gives every site a ``torch.Generator`` (router noise, input jitter,
dropout); the HF Trainer's ``rng_state*.pth`` holds torch's global generators only. Each rank writes
its own file, ``moleforge_noise_{rank}.safetensors`` (one ``uint8`` state per site, keyed by module
name), atomically; a run that never seeded the handle writes nothing, and draws from torch's global
generator, which the Trainer restores itself."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..interop.atomic import atomic_write
from .handle import AdapterHandle

__all__ = ["noise_file", "noise_states", "restore_noise_states", "save_noise_states", "load_noise_states"]


def noise_file(folder: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank``'s generator states go in a checkpoint ``folder``."""
    return Path(folder, f"moleforge_noise_{rank}.safetensors")


def noise_states(handle: AdapterHandle) -> dict[str, torch.Tensor]:
    """Every seeded site's generator state (a ``uint8`` tensor), by module name."""
    out = {}
    for name, mod in handle.modules.items():
        gen = getattr(mod.site, "noise_generator", None)
        if gen is not None:
            out[name] = gen.get_state()
    return out


def restore_noise_states(handle: AdapterHandle, states: dict[str, torch.Tensor], source: str) -> None:
    """Put the generators back where ``states`` found them; refuses states of other sites."""
    here = {name for name, mod in handle.modules.items() if getattr(mod.site, "noise_generator", None) is not None}
    if set(states) != here:
        raise CheckpointError(f"{source}: noise generator states for sites {sorted(states)[:4]}, but this adapter "
                              f"draws its noise at {sorted(here)[:4]}; resume with the spec and the seed the run "
                              "was started with")
    for name, state in states.items():
        handle.modules[name].site.noise_generator.set_state(state.cpu())


def save_noise_states(handle: AdapterHandle, folder: str | os.PathLike, rank: int) -> Path | None:
    """Write ``handle``'s generator states to ``folder`` (nothing when the handle is unseeded)."""
    states = noise_states(handle)
    if not states:
        return None
    path = noise_file(folder, rank)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in states.items()}, tmp))
    return path


def load_noise_states(handle: AdapterHandle, folder: str | os.PathLike, rank: int) -> bool:
    """Restore the states rank ``rank`` saved in ``folder``; ``False`` when it saved none."""
    path = noise_file(folder, rank)
    if not path.is_file():
        if noise_states(handle):
            raise CheckpointError(f"{folder} holds no {path.name}: it was saved by a run without seeded noise or on "
                                  "fewer processes; resume on the same number of processes with the same seed")
        return False
    try:
        states = load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot read the noise generator states ({e})") from None
    restore_noise_states(handle, states, str(path))
    return True
