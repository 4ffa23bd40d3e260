"""``moleforge export DIR --merged OUT | --peft OUT``: hand a trained adapter to the rest of the
ecosystem, as a merged HuggingFace model or a PEFT LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..interop import CONFIG_NAME
from .common import friendly_errors, load_model, load_tokenizer

__all__ = ["export_cmd"]


def _adapter_dir(path: str) -> Path:
    """``DIR`` itself, or ``DIR/adapter`` for a ``moleforge train --out`` folder."""
    p = Path(path)
    for candidate in (p, p / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not p.exists():
        raise click.BadParameter(f"{path!r} does not exist", param_hint="DIR")
    raise click.BadParameter(f"{path!r} holds no saved adapter ({CONFIG_NAME}); give an adapter folder "
                             "(mf.save) or a `moleforge train --out` folder", param_hint="DIR")


def _recorded_model(adapter: Path) -> str | None:
    """The base model ``moleforge train`` recorded beside the adapter, if any."""
    summary = adapter.parent / "train_summary.json"
    if not summary.is_file():
        return None
    try:
        model = json.loads(summary.read_text(encoding="utf-8")).get("model")
    except (ValueError, AttributeError) as e:  # bad JSON or UTF-8, or not a JSON object
        raise click.ClickException(f"{summary} is damaged ({type(e).__name__}: {str(e)[:80]}), so the base model "
                                   "it records cannot be read; give --model DIR") from None
    if model is not None and not isinstance(model, str):
        raise click.ClickException(f"{summary}: 'model' is {json.dumps(model)[:40]}, not a folder; give --model DIR")
    return model


def _out_dir(path: str | None, option: str) -> None:
    """``--merged`` and ``--peft`` name folders: refuse an existing file before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise click.BadParameter(f"{path!r} is a file; {option} names a folder to write", param_hint=option)


@click.command("export")
@click.argument("adapter_path", metavar="DIR")
@click.option("--merged", "merged_out", metavar="OUT",
              help="Write a HuggingFace model directory with the adapter folded into the weights.")
@click.option("--peft", "peft_out", metavar="OUT",
              help="Write a PEFT LoRA adapter (adapter_config.json + weights); an X-LoRA adapter as a PEFT X-LoRA "
                   "folder (the classifier, the experts in subfolders 0, 1, ...).")
@click.option("--model", "model_dir", metavar="DIR",
              help="The base model the adapter was trained on.  [default: the one `moleforge train` recorded]")
@click.option("--static-only", is_flag=True,
              help="With --merged: fold the input-independent sites and keep routed ones as a moleforge "
                   "adapter in OUT.")
@friendly_errors
def export_cmd(adapter_path: str, merged_out: str | None, peft_out: str | None, model_dir: str | None,
               static_only: bool) -> None:
    """Export the adapter in DIR as a merged model (--merged) or a PEFT LoRA (--peft).

    DIR is an adapter folder (mf.save format) or a `moleforge train --out` folder. Only
    input-independent adapters merge or become one LoRA (plain LoRA, static pools); a site
    that routes on its input is refused with its name and router (see --static-only).

    \b
    Example:
      moleforge export runs/my-lora --merged runs/my-lora-merged
    """
    import moleforge as mf

    if merged_out is None and peft_out is None:
        raise click.UsageError("say what to write: --merged OUT, --peft OUT, or both")
    if static_only and merged_out is None:
        raise click.UsageError("--static-only goes with --merged")
    _out_dir(merged_out, "--merged")
    _out_dir(peft_out, "--peft")
    adapter = _adapter_dir(adapter_path)
    model_dir = model_dir or _recorded_model(adapter)
    if model_dir is None:
        raise click.UsageError(f"no base model recorded beside {adapter}; give --model DIR")
    model = load_model(model_dir)
    handle = mf.load(model, adapter)
    if merged_out is not None:
        try:
            path = mf.export_merged(handle, merged_out, static_only=static_only)
        except mf.NotMergeableError as e:
            raise click.ClickException(f"{e}\n(on the command line: --merged OUT --static-only)") from None
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        click.echo(f"merged model written to {path}  (AutoModelForCausalLM.from_pretrained({str(path)!r}))")
        if (Path(path) / CONFIG_NAME).is_file():
            click.echo(f"the routed sites stay a moleforge adapter in the same folder (mf.load(model, {str(path)!r}))")
    if peft_out is not None:
        path = mf.export_peft(handle, peft_out)
        if hasattr(handle, "xlora_layers"):  # a PEFT X-LoRA folder: PEFT is told where the experts are
            click.echo(f"PEFT X-LoRA folder written to {path}  (PeftModel.from_pretrained(base_model, {str(path)!r}, "
                       f"adapters={{'0': {str(Path(path) / '0')!r}, ...}}))")
        else:
            click.echo(f"PEFT adapter written to {path}  (PeftModel.from_pretrained(base_model, {str(path)!r}))")
