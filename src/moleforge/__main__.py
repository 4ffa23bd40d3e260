"""``python -m moleforge``: the same as the ``moleforge`` command."""

from .cli import main

main(prog_name="moleforge")
