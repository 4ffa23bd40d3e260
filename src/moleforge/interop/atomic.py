"""Atomic file writes: write beside the target, fsync, then ``os.replace``.

Temporary files are hidden (``.NAME.PID.RANDOM.tmp``) in the target's folder, created with the
mode of any new file (``0o666`` less the umask, as ``open`` gives), and removed when the write
fails. A process killed mid-write cannot remove its own: the next write of the same file removes
those of processes that no longer run (on POSIX systems)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["atomic_write", "atomic_write_many"]

Writer = Callable[[str], None]


def atomic_write(path: str | os.PathLike, write: Writer) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one step, so ``path``
    holds either the old or the new content, never a half-written file."""
    atomic_write_many([(path, write)])


def atomic_write_many(files: Sequence[tuple[str | os.PathLike, Writer]]) -> None:
    """Write every file to its temporary file first, then move them over their targets in
    order, one right after the other: a failure while writing (an exception, a full disk)
    leaves every target as it was. Only a kill between the moves can leave some files new and
    the rest old; readers that must tell (``moleforge_config.json`` and its weights) record a
    shared save id in each file."""
    paths = [Path(p) for p, _ in files]
    temps: list[Path] = []
    try:
        for path, (_, write) in zip(paths, files):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(path)
            temps.append(_new_temp(path))
            mode = temps[-1].stat().st_mode & 0o777
            write(str(temps[-1]))
            os.chmod(temps[-1], mode)  # writers that replace the file themselves (safetensors) make it 0o600
            _fsync(temps[-1])
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(p.parent for p in paths):
        _fsync_dir(folder)


def _new_temp(path: Path) -> Path:
    """An empty new file ``.NAME.PID.RANDOM.tmp`` beside ``path``, mode ``0o666`` less the umask."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by processes that were killed while writing it."""
    if os.name != "posix":
        return
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX; elsewhere a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
