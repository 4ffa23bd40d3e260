"""What every subcommand shares: reading SPEC and --model arguments, and turning library
errors into one clear message instead of a traceback."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import click

from ..errors import MoleforgeError
from ..specs import AdapterSpec, presets

__all__ = ["load_spec", "load_model", "load_tokenizer", "friendly_errors"]

F = TypeVar("F", bound=Callable)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"Warning: {message}", err=True)


def friendly_errors(fn: F) -> F:
    """Run a command body; a :class:`MoleforgeError` (spec, data, checkpoint ...) or an
    ``OSError`` (a file that cannot be read or written) becomes a ``click.ClickException``
    carrying its message, so the user sees ``Error: ...``; Python warnings print as one
    ``Warning: ...`` line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except MoleforgeError as e:
                raise click.ClickException(str(e)) from None
            except OSError as e:  # a file the command reads or writes: say which and why
                where = f"{e.filename}: " if e.filename else ""
                raise click.ClickException(f"{where}{e.strerror or e}") from None
    return wrapper  # type: ignore[return-value]


def load_spec(arg: str) -> AdapterSpec:
    """A preset name or the path of a JSON spec file.

    Raises:
        click.BadParameter: neither a preset nor an existing file.
        click.ClickException: the file is not a valid spec (every bad field is listed).
    """
    path = Path(arg)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {arg}: {e}", param_hint="SPEC") from None
        try:
            return AdapterSpec.model_validate_json(text)
        except MoleforgeError as e:
            raise click.ClickException(f"{arg}: {e}") from None
    if arg in presets.names():
        return presets.load(arg)
    if arg.endswith(".json") or "/" in arg:
        raise click.BadParameter(f"spec file {arg!r} does not exist", param_hint="SPEC")
    raise click.BadParameter(f"{arg!r} is neither a preset nor a JSON file; presets: {', '.join(presets.names())}",
                             param_hint="SPEC")


def _model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise click.BadParameter(f"model directory {path!r} does not exist", param_hint="--model")
    if not (p / "config.json").is_file():
        raise click.BadParameter(f"{path!r} has no config.json; give a directory written by save_pretrained",
                                 param_hint="--model")
    return p


def load_model(path: str):
    """``AutoModelForCausalLM.from_pretrained(path)`` in float32, from local files only."""
    import torch
    from transformers import AutoModelForCausalLM

    p = _model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - damaged weights raise anything (SafetensorError, UnpicklingError ...)
        raise click.ClickException(f"could not load a causal language model from {path}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """The first line of an exception's message, with its type when that says more than the text."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if type(e).__name__ in ("OSError", "ValueError", "KeyError", "RuntimeError") and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_tokenizer(path: str | None):
    """The tokenizer saved in ``path``, or ``None`` when it has none (token-id data needs none)."""
    from transformers import AutoTokenizer

    if path is None:
        return None
    p = Path(path)
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return None
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(f"could not load the tokenizer in {path}: {first}") from None
