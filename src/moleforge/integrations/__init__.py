"""HuggingFace model surgery (sites, MLP tracing, module swaps, siblings), the adapter handle
and the Trainer glue."""
