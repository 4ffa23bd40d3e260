"""Materialise a site's declared tensors with their initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ir import ParamDecl

__all__ = ["ParamStore", "init_tensor"]


def init_tensor(decl: ParamDecl, up: str, std: float, generator: torch.Generator | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new tensor for ``decl``.

    ``kaiming``: U(-1/√fan_in, 1/√fan_in) (PyTorch's Linear default, as PEFT's lora_A);
    ``up``/``bias``: zeros, or N(0, std²) when ``up == "normal"``; ``one``: ones; ``keys``: U(-1/√g, 1/√g);
    ``gaussian``: N(0, 1/fan_in);
    ``sparse_random``: each row keeps ``density·d_in`` random inputs with N(0, 1/R²) weights,
    R the number of rows (FlyLoRA).
    """
    shape = tuple(decl.shape)
    t = torch.zeros(shape, dtype=dtype)
    match decl.init:
        case "kaiming" | "keys":
            fan_in = decl.fan_in or shape[-1]
            bound = 1.0 / math.sqrt(fan_in)
            t.uniform_(-bound, bound, generator=generator)
        case "up" | "bias":
            if up == "normal":
                t.normal_(0.0, std, generator=generator)
        case "sparse_random":
            rows = t.reshape(-1, shape[-1])
            R, d = rows.shape
            nnz = max(1, round(decl.density * d))
            for i in range(R):
                cols = torch.randperm(d, generator=generator)[:nnz]
                rows[i, cols] = torch.randn(nnz, generator=generator, dtype=dtype) / R
        case "gaussian":
            t.normal_(0.0, 1.0 / math.sqrt(decl.fan_in or shape[-1]), generator=generator)
        case "zero":
            pass
        case "one":
            t.fill_(1.0)
        case "mean":
            t.fill_(1.0 / decl.shape[-1])
        case other:
            raise ValueError(f"unknown initialisation {other!r} for {decl.name}")
    return t


class ParamStore(nn.Module):
    """Holds a site's tensors as attributes named as declared; trainable ones are
    ``nn.Parameter``, the rest buffers. Routers with balancing biases also get a
    non-persistent ``<bias>_counts`` buffer of selections since the last update."""

    def __init__(self, decls: tuple[ParamDecl, ...], up: str = "zero", std: float = 0.02,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        for d in decls:
            t = init_tensor(d, up, std, generator, dtype)
            if d.trainable:
                setattr(self, d.name, nn.Parameter(t))
            else:
                self.register_buffer(d.name, t)
