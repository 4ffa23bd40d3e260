"""The ops lowered adapter code calls, with their autograd functions; they run the Triton and
CPU kernels where the kernel policy chooses them."""
