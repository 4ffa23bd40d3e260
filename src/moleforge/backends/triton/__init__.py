"""Triton kernels for fused routed low-rank nodes and residual-tree steps."""
