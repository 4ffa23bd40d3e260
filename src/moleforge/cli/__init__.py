"""The ``moleforge`` command: presets, schema, inspect, train, export, demo.

Heavy imports (transformers, matplotlib) happen inside the subcommands that need them,
so ``moleforge --help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from .common import friendly_errors
from .export_cmd import export_cmd
from .inspect_cmd import inspect_cmd
from .train_cmd import train_cmd

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moleforge")
def main() -> None:
    """moleforge: compile Mixture-of-LoRA-Experts specs into trainable adapters inside
    HuggingFace models.

    \b
    Start here:
      moleforge demo                      fine-tune S'MoRE, MoLoRA and LoRA on a small model, with pictures
      moleforge presets                   the methods that ship as presets
      moleforge inspect smore --model M   where a spec goes in model M and what it costs
      moleforge train smore --model M --data train.jsonl --out run
      moleforge export run --merged run-merged     (LoRA-reducible adapters)
    """


@main.command("presets")
def presets_cmd() -> None:
    """List the shipped presets, one line each (use a name as SPEC)."""
    from ..specs import presets

    described = presets.describe()
    width = max(map(len, described))
    for name, text in described.items():
        click.echo(f"{name:<{width}}  {text}")


@main.command("schema")
@click.option("--markdown", is_flag=True, help="Print the Markdown reference (docs/spec_reference.md) instead.")
def schema_cmd(markdown: bool) -> None:
    """Print the JSON Schema of a spec (AdapterSpec)."""
    from ..specs import AdapterSpec

    schema = AdapterSpec.model_json_schema()
    if markdown:
        from .schema_doc import render_reference

        click.echo(render_reference(schema), nl=False)
        return
    click.echo(json.dumps(schema, indent=2, ensure_ascii=False))


@main.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, metavar="DIR",
              help="Folder for the pictures, report, base model, data and adapters.")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Fine-tuning steps per method.")
@click.option("--pretrain-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Pretraining steps of the small base model.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def demo_cmd(out_dir: str, steps: int, pretrain_steps: int, seed: int, quiet: bool) -> None:
    """Fine-tune S'MoRE, MoLoRA and LoRA at one budget side by side, offline, on a CPU.

    Builds a small Llama-style model from a config shipped with moleforge, pretrains it
    on four counting tasks, then fine-tunes the `smore` preset, a MoLoRA and a LoRA with the
    same number of trainable parameters on four new ones, and says which did best. Writes
    loss curves, an expert-load heatmap, S'MoRE routing trees, a report, the base model, the
    data and the three adapters. Under a minute on two CPU cores with the defaults.
    """
    from ..demo import DemoConfig, run_demo

    out = Path(out_dir)
    paths = run_demo(out, DemoConfig(steps=steps, pretrain_steps=pretrain_steps, seed=seed), progress=not quiet,
                     echo=click.echo)
    click.echo("\nwritten:")
    width = max(map(len, paths))
    for what, path in paths.items():
        click.echo(f"  {what:<{width}}  {path}")
    prog = sys.argv[0] if Path(sys.argv[0]).name == "moleforge" else "moleforge"
    click.echo(f"\nnext: {prog} inspect smore --model {paths['base model']}\n"
               f"      {prog} train smore --model {paths['base model']} --data {paths['training data']} "
               f"--out {out / 'my-smore'}")


main.add_command(inspect_cmd)
main.add_command(train_cmd)
main.add_command(export_cmd)
