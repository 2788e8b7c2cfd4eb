"""Public MoE ops, registered in the ``moetrain`` torch.library namespace.

Each op's pure-torch reference is its ``CompositeExplicitAutograd`` kernel; the compiled csrc
kernels (``TORCH_LIBRARY_IMPL(moetrain, CPU|CUDA, ...)`` in the ``moetrain._C`` extension) take
precedence for their device; on first use per device they are compared with the references and
give way to them on a mismatch (``selfcheck``: :func:`self_check`, :func:`selfcheck_results`).
``backend`` imports the op definitions (``permute``) before it loads the extension that registers
kernels for them.
"""

from moetrain.ops.backend import OPS, active_backend, extension_error, reference_kernels
from moetrain.ops.permute import permute, unpermute
from moetrain.ops.selfcheck import CsrcSelfCheckWarning, self_check, selfcheck_results
from moetrain.ops.sort import expert_sort

__all__ = [
    "OPS",
    "CsrcSelfCheckWarning",
    "active_backend",
    "expert_sort",
    "extension_error",
    "permute",
    "reference_kernels",
    "self_check",
    "selfcheck_results",
    "unpermute",
]
