"""Public MoE ops, registered in the ``moetrain`` torch.library namespace.

Each op's pure-torch reference is its ``CompositeExplicitAutograd`` kernel; a compiled kernel
registered for a device (``TORCH_LIBRARY_IMPL(moetrain, CPU|CUDA, ...)``) takes precedence.
"""

import torch

from moetrain.ops.permute import permute, unpermute

OPS = ("moetrain::permute", "moetrain::unpermute")


def active_backend(device_key: str = "CPU") -> str:
    """Which kernels run the ops on ``device_key`` ("CPU" or "CUDA"): compiled, or the
    pure-torch reference fallback. Printed at the start of training, so a fallback is never
    silent."""
    compiled = [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(op, device_key)]
    if len(compiled) == len(OPS):
        return f"compiled kernels ({device_key})"
    if compiled:
        return f"compiled for {', '.join(compiled)}; pure-torch reference for the rest"
    return "pure-torch reference (no compiled kernels registered)"


__all__ = ["OPS", "active_backend", "permute", "unpermute"]
