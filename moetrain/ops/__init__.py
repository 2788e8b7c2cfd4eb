"""Public MoE ops, registered in the ``moetrain`` torch.library namespace.

Each op's pure-torch reference is its ``CompositeExplicitAutograd`` kernel; a compiled kernel
registered for a device (``TORCH_LIBRARY_IMPL(moetrain, CPU|CUDA, ...)``) takes precedence.
"""

from moetrain.ops.permute import permute, unpermute

__all__ = ["permute", "unpermute"]
