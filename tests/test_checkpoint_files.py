"""What ``mf.save`` leaves in a folder when it fails or is killed: the old adapter or the new
one, never a mix that loads; no temporary files; files with the usual mode."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moleforge as mf
from models import batch, tiny

ROOT = Path(__file__).resolve().parents[1]


def _spec(alpha: float, seed: int) -> mf.AdapterSpec:
    """LoRA on q: the same shapes for every alpha, so a mix of two saves fits the model."""
    return mf.AdapterSpec(sites=[mf.Site(target=mf.Target(roles=["q"]), adapter=mf.LoRA(rank=2, alpha=alpha),
                                         init=mf.Init(up="normal", std=0.5, seed=seed))])


def _logits(folder: Path) -> torch.Tensor:
    model = tiny("llama")
    mf.load(model, folder)
    with torch.no_grad():
        return model(input_ids=batch()).logits


def _save_in_subprocess(folder: Path, kill_at: str) -> int:
    """``mf.save`` of ``_spec(16, 2)`` into ``folder`` in a new process that ``os._exit``s at
    ``kill_at``: ``"between_renames"`` (the weights moved into place, the config not yet) or
    ``"writing_weights"`` (its temporary weights file half written)."""
    script = textwrap.dedent(f"""
        import os
        import pathlib
        import moleforge as mf
        from moleforge.interop import atomic, own_format
        from models import tiny
        from test_checkpoint_files import _spec

        real_replace, real_write = os.replace, pathlib.Path.write_bytes
        def replace(src, dst):
            real_replace(src, dst)
            if {kill_at!r} == "between_renames" and str(dst).endswith(own_format.WEIGHTS_NAME):
                os._exit(3)
        def write_bytes(self, data):
            if {kill_at!r} == "writing_weights":
                real_write(self, data[:100])
                os._exit(3)
            return real_write(self, data)
        atomic.os.replace, pathlib.Path.write_bytes = replace, write_bytes
        mf.save(mf.compile(_spec(16.0, 2), tiny("llama")), {str(folder)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=120).returncode


@pytest.fixture
def old_folder(tmp_path) -> tuple[Path, torch.Tensor]:
    folder = tmp_path / "adapter"
    mf.save(mf.compile(_spec(4.0, 1), tiny("llama")), folder)
    return folder, _logits(folder)


def test_a_save_killed_between_its_two_files_is_refused_on_load(old_folder):
    folder, _ = old_folder
    assert _save_in_subprocess(folder, "between_renames") == 3
    with pytest.raises(mf.CheckpointError, match="come from different saves") as info:
        mf.load(tiny("llama"), folder)
    assert str(folder) in str(info.value) and "save the adapter there again" in str(info.value)


def test_a_save_killed_while_writing_keeps_the_old_adapter_and_its_temp_file_is_removed_later(old_folder):
    folder, old = old_folder
    assert _save_in_subprocess(folder, "writing_weights") == 3
    left = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert left and all(n.endswith(".tmp") for n in left), "the killed process could not clean up"
    assert torch.equal(_logits(folder), old)
    mf.save(mf.compile(_spec(4.0, 1), tiny("llama")), folder)  # the next save removes the dead one's files
    assert sorted(p.name for p in folder.iterdir()) == ["moleforge_config.json", "moleforge_model.safetensors"]


def test_a_failed_save_leaves_the_old_adapter_and_no_temporary_files(old_folder, monkeypatch):
    folder, old = old_folder

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)  # the config, written after the weights
    with pytest.raises(OSError, match="No space left"):
        mf.save(mf.compile(_spec(16.0, 2), tiny("llama")), folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["moleforge_config.json", "moleforge_model.safetensors"]
    assert torch.equal(_logits(folder), old)


def test_saved_files_get_the_mode_of_new_files(tmp_path):
    previous = os.umask(0o022)
    try:
        mf.save(mf.compile("lora", tiny("llama")), tmp_path / "a")
        os.umask(0o002)
        mf.save(mf.compile("lora", tiny("llama")), tmp_path / "b")
    finally:
        os.umask(previous)
    for folder, mode in (("a", 0o644), ("b", 0o664)):
        for p in (tmp_path / folder).iterdir():
            assert p.stat().st_mode & 0o777 == mode, p


def test_a_save_overwrites_with_the_new_values(old_folder):
    folder, old = old_folder
    mf.save(mf.compile(_spec(16.0, 2), tiny("llama")), folder)
    new = _logits(folder)
    assert not torch.equal(new, old)


def test_a_folder_saved_without_save_ids_still_loads(old_folder):
    """Adapters saved before the files carried save ids have none in either file."""
    import json

    from safetensors.torch import load_file, save_file

    folder, old = old_folder
    config = json.loads((folder / "moleforge_config.json").read_text())
    del config["save_id"]
    (folder / "moleforge_config.json").write_text(json.dumps(config))
    weights = folder / "moleforge_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    assert torch.equal(_logits(folder), old)
