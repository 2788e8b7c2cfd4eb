"""RMSNorm computed in fp32 whatever the input dtype (as Llama): ``w * x / rms(x)``.

``model.norm_impl=apex`` (:func:`set_norm_impl` on a built model) runs CUDA inputs through
NVIDIA apex's fused RMSNorm kernel (``apex.normalization.fused_layer_norm``) instead of the torch
ops: the same function of the same parameter (``weight``), so checkpoints and Hugging Face exports
do not depend on it; CPU inputs (conversion, CPU tests) take the torch ops.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor, nn

from moetrain import apex
from moetrain.models.config import NORM_IMPLS


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim of size ``dim``.

    The normalization runs in fp32 and is cast back to the input dtype before the (learned,
    ones-initialized) scale is applied, matching ``transformers``' ``LlamaRMSNorm``; the result's
    dtype is the promotion of the input's and the weight's.

    ``impl="apex"``: CUDA inputs run apex's fused kernel, with autocast off around it (apex would
    cast input and weight to the autocast dtype; the torch ops keep fp32). Where input and weight
    dtypes match it equals the torch ops up to summation order; an input of lower precision than
    the weight (bf16 activations, fp32 weight) is normalized in fp32 and scaled without the
    torch ops' rounding of the normalized value to the input dtype (apex's mixed-dtype kernel),
    a difference within that dtype's rounding. The first CUDA call raises ``ValueError`` naming
    ``model.norm_impl`` when apex cannot be imported.
    """

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.impl = _checked(impl)
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "apex" and x.is_cuda:
            return self._apex_forward(x)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def _apex_forward(self, x: Tensor) -> Tensor:
        fused = _apex_fused_layer_norm()
        w, shape = self.weight, (self.weight.shape[0],)
        with torch.autocast("cuda", enabled=False):
            if x.dtype == w.dtype:
                return fused.fused_rms_norm_affine(x, w, shape, self.eps)
            if w.dtype == torch.promote_types(x.dtype, w.dtype):  # output in the weight's dtype
                return fused.mixed_dtype_fused_rms_norm_affine(x, w, shape, self.eps)
            # a weight of lower precision than the input: the torch ops upcast it
            return fused.fused_rms_norm_affine(x, w.to(x.dtype), shape, self.eps)

    def extra_repr(self) -> str:
        impl = "" if self.impl == "torch" else f", impl={self.impl}"
        return f"{self.weight.shape[0]}, eps={self.eps}{impl}"


def set_norm_impl(model: nn.Module, impl: str) -> None:
    """Every :class:`RMSNorm` in ``model`` computes with ``impl`` (``model.norm_impl``): ``torch``
    or ``apex``. Raises ``ValueError`` naming ``model.norm_impl`` for any other value."""
    impl = _checked(impl)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.impl = impl


def _checked(impl: str) -> str:
    if impl not in NORM_IMPLS:
        raise ValueError(f"model.norm_impl: must be one of {', '.join(NORM_IMPLS)}; got {impl!r}")
    return impl


@functools.cache  # a failed import is not cached: it raises again on the next call
def _apex_fused_layer_norm() -> ModuleType:
    """apex's ``fused_layer_norm`` module, with the two RMSNorm functions :class:`RMSNorm` calls."""
    setting, fallback = "model.norm_impl", "model.norm_impl=torch"
    module = apex.require(apex.NORMALIZATION, setting, fallback)
    missing = [
        name
        for name in ("fused_rms_norm_affine", "mixed_dtype_fused_rms_norm_affine")
        if not hasattr(module, name)
    ]
    if missing:
        why = f"the NVIDIA apex at {module.__file__} predates its fused RMSNorm ({missing[0]})"
        raise ValueError(apex.message(setting, why, fallback))
    return module
