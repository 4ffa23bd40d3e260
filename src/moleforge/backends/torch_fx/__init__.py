"""The torch backend: IR -> torch.fx GraphModules, injected into HF models."""
