"""Export backends: moleforge's own adapter format (more formats live beside it)."""

from .own_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter, write_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_adapter", "write_adapter"]
