"""Routed experts: E MLPs held as 3-D weights, run as one grouped GEMM over variable row counts.

Legend: R rows (in expert order), D model dim, F expert hidden dim, E experts.

Weights: ``w1_EFD`` and ``w3_EFD`` (gate and up projections, [E, F, D]; w3 only for SwiGLU) and
``w2_EDF`` (down projection, [E, D, F]). Expert e computes ``w2_e @ act(w1_e x, w3_e x)``.

Two implementations of the grouped GEMM (``model.moe.experts_impl``, see docs/moe.md):

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` where it is
  missing) with the group offsets on the rows' device: one kernel per projection, forward and
  backward, and no host sync — the split sizes never leave the device.
- ``loop``: a Python loop over experts whose inputs and weights are taken with one
  ``split``/``unbind`` each, so autograd has one backward node per tensor instead of building a
  full-size gradient per expert (indexing ``w[e]`` in the loop was ~9x slower on CPU). It needs
  the split sizes on the host: one host sync when they live on the device.

``auto`` is ``grouped_mm`` on CUDA where its kernel runs (bf16 compute, dims multiples of 8; fp32
experts on CUDA take the loop) and the faster of the two measured on CPU (``loop``). With
fixed shapes (pad_to_capacity, or perfectly even counts known on the host) either runs the
experts as batched matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe.config import MoEConfig

# every routed-expert weight and the dim that holds F ([E, F, D] or [E, D, F]); the other
# non-expert dim holds D. Sharding code (expert TP, FSSDP, FSDP of experts) reads it from here.
EXPERT_WEIGHTS = (("w1_EFD", 1), ("w3_EFD", 1), ("w2_EDF", 2))
EXPERT_F_DIM = dict(EXPERT_WEIGHTS)

# the public name (torch >= 2.11 has it); older releases only have the private op (same semantics)
_GROUPED_MM: Callable[..., Tensor] | None = getattr(F, "grouped_mm", None) or getattr(
    torch, "_grouped_mm", None
)


def _local(w: Tensor | None) -> Tensor | None:
    from torch.distributed.tensor import DTensor  # lazy: config checks import this module

    return w.to_local() if isinstance(w, DTensor) else w


def expert_mlp(x_ND: Tensor, w1_FD: Tensor, w3_FD: Tensor | None, w2_DF: Tensor) -> Tensor:
    """One expert (or any stack of them, with batched weights): SwiGLU when ``w3`` is given,
    else GELU."""
    h = x_ND @ w1_FD.transpose(-1, -2)
    if w3_FD is None:
        h = F.gelu(h)
    else:
        h = F.silu(h) * (x_ND @ w3_FD.transpose(-1, -2))
    return h @ w2_DF.transpose(-1, -2)


def resolve_experts_impl(
    impl: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    dim: int = 8,
    hidden_dim: int = 8,
) -> str:
    """``auto`` -> the implementation used on ``device`` for experts computing in ``dtype`` with
    model dim ``dim`` and hidden size ``hidden_dim``: ``grouped_mm`` on CUDA where its kernel
    runs (bf16, both sizes multiples of 8), else ``loop`` (CPU and other devices: the faster one
    measured there); ``loop`` and ``grouped_mm`` are returned as they are."""
    if impl != "auto":
        return impl
    if device.type != "cuda" or _GROUPED_MM is None:
        return "loop"
    fits = dtype == torch.bfloat16 and dim % 8 == 0 and hidden_dim % 8 == 0
    return "grouped_mm" if fits else "loop"


class GroupedExperts(nn.Module):
    """``num_experts`` MLPs; ``forward(rows_RD, tokens_per_expert_E)`` runs expert e on its
    ``tokens_per_expert_E[e]`` consecutive rows. Under expert parallelism ``num_experts`` is the
    local count."""

    def __init__(self, cfg: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        E = num_experts if num_experts is not None else cfg.num_experts
        D, Fh = cfg.dim, cfg.hidden_dim
        self.num_experts = E
        self.impl = cfg.experts_impl  # auto | loop | grouped_mm (resolved per call's device)
        self.w1_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, D)) if cfg.activation == "swiglu" else None
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal init; ``out_std`` (default ``std``) for the down projection, which models
        often scale with depth."""
        nn.init.normal_(self.w1_EFD, std=std)
        if self.w3_EFD is not None:
            nn.init.normal_(self.w3_EFD, std=std)
        nn.init.normal_(self.w2_EDF, std=std if out_std is None else out_std)

    def local_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(w1, w3, w2) as plain tensors: this rank's experts (and F slice) when the weights are
        DTensors sharded by expert / tensor parallelism; gradients flow back to the shards."""
        return _local(self.w1_EFD), _local(self.w3_EFD), _local(self.w2_EDF)  # type: ignore[return-value]

    def forward(
        self,
        rows_RD: Tensor,
        tokens_per_expert_E: Tensor | None = None,
        chunked: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Run expert e on its ``tokens_per_expert_E[e]`` consecutive rows of ``rows_RD`` [R, D]
        (int64 counts on the host or the rows' device); returns [R, D].

        ``chunked`` (the overlapped expert-parallel dispatcher's pipeline, or FSSDP's, which
        materializes full experts from the local shards) replaces the one grouped GEMM: it is
        called as ``chunked(rows_RD, self.compute, (w1, w3, w2))`` with the local weights and
        calls ``compute`` on its own rows and weights, interleaved with its exchanges. It
        runs inside this forward so that FSDP's weight all-gather and backward hooks, which wrap
        the module call, cover every chunk.
        """
        w1, w3, w2 = self.local_weights()
        if chunked is not None:
            return chunked(rows_RD, self.compute, (w1, w3, w2))
        if tokens_per_expert_E is None:
            raise ValueError("GroupedExperts needs tokens_per_expert_E")
        return self.compute(rows_RD, tokens_per_expert_E, w1, w3, w2)

    def compute(
        self,
        rows_RD: Tensor,
        tokens_per_expert_E: Tensor,
        w1: Tensor,
        w3: Tensor | None,
        w2: Tensor,
    ) -> Tensor:
        """The grouped GEMM on explicit weights (``forward`` passes its local weights)."""
        return grouped_mlp(rows_RD, tokens_per_expert_E, w1, w3, w2, self.impl)


def grouped_mlp(
    rows_RD: Tensor,
    tokens_per_expert_E: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    impl: str = "loop",
) -> Tensor:
    """Expert e (weights ``w1[e]``, ``w3[e]``, ``w2[e]``) on its ``tokens_per_expert_E[e]``
    consecutive rows of ``rows_RD`` [R, D]; returns [R, D].

    ``tokens_per_expert_E`` (int64, [E], summing to R) may live on the host or on the rows'
    device. ``impl``: ``grouped_mm`` (no host sync), ``loop`` (one host sync when the counts are
    on the device) or ``auto`` (:func:`resolve_experts_impl`).
    Raises ``ValueError`` when the counts do not match the experts, or when ``grouped_mm`` cannot
    run the requested dtype/shape on this device.
    """
    if tokens_per_expert_E.shape != (w1.shape[0],):
        raise ValueError(
            f"got row counts of shape {tuple(tokens_per_expert_E.shape)} for {w1.shape[0]} experts"
        )
    dims = (rows_RD.shape[-1], w1.shape[1])
    if resolve_experts_impl(impl, rows_RD.device, _compute_dtype(rows_RD), *dims) == "grouped_mm":
        return grouped_mm_mlp(rows_RD, tokens_per_expert_E, w1, w3, w2)
    return loop_mlp(rows_RD, tokens_per_expert_E, w1, w3, w2)


def loop_mlp(
    rows_RD: Tensor, tokens_per_expert_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor
) -> Tensor:
    """The per-expert loop (one ``split``/``unbind`` per tensor; batched matmuls when every
    expert has the same count)."""
    counts = tokens_per_expert_E.tolist()  # host sync when the counts are on the device
    if len(set(counts)) == 1:  # fixed shapes (padded to capacity, or perfectly even)
        x_ECD = rows_RD.view(w1.shape[0], counts[0], rows_RD.shape[-1])
        return expert_mlp(x_ECD, w1, w3, w2).flatten(0, 1)
    xs = rows_RD.split(counts)
    w1s = w1.unbind(0)
    w3s = w3.unbind(0) if w3 is not None else [None] * w1.shape[0]
    w2s = w2.unbind(0)
    outs = [expert_mlp(*args) for args in zip(xs, w1s, w3s, w2s)]
    return torch.cat(outs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects a stride-0 gradient (``y.sum().backward()`` produces one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs compute in: the autocast dtype inside autocast, else x's."""
    device_type = x.device.type
    if device_type == "meta":  # shape-only runs: no autocast state for the meta device
        return x.dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_grouped_mm(x: Tensor, w1: Tensor, dtype: torch.dtype) -> None:
    if _GROUPED_MM is None:
        raise ValueError(
            f"model.moe.experts_impl=grouped_mm needs torch.nn.functional.grouped_mm or "
            f"torch._grouped_mm, which torch {torch.__version__} lacks; use experts_impl=loop"
        )
    if x.device.type != "cuda":
        return
    # the CUDA kernel takes bf16 operands whose rows are 16-byte aligned
    if dtype != torch.bfloat16:
        raise ValueError(
            f"model.moe.experts_impl=grouped_mm on CUDA computes in bf16, got {dtype}: set "
            "train.dtype=bf16, or experts_impl=loop (or auto) for fp32 experts"
        )
    D, Fh = x.shape[-1], w1.shape[1]
    if D % 8 or Fh % 8:
        raise ValueError(
            f"model.moe.experts_impl=grouped_mm on CUDA needs model.moe.dim ({D}) and the "
            f"expert hidden size ({Fh}) to be multiples of 8; use experts_impl=loop"
        )


def grouped_mm_mlp(
    rows_RD: Tensor, tokens_per_expert_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor
) -> Tensor:
    """One grouped GEMM per projection, group ends ``cumsum(tokens_per_expert_E)`` on the rows'
    device (int32, as the kernel wants): nothing is read back to the host. Under autocast the
    operands are cast to the autocast dtype, as the loop's matmuls would be."""
    dtype = _compute_dtype(rows_RD)
    _check_grouped_mm(rows_RD, w1, dtype)
    assert _GROUPED_MM is not None
    x = rows_RD.to(dtype)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    w3 = None if w3 is None else w3.to(dtype)
    if x.shape[0] == 0:  # no rows (a shape, known on the host): the kernel's backward rejects
        # empty operands; batched matmuls over [E, 0, D] give the zero gradients, in `dtype`
        return expert_mlp(x.view(w1.shape[0], 0, x.shape[-1]), w1, w3, w2).flatten(0, 1)
    counts = tokens_per_expert_E.to(x.device, non_blocking=True)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = _GROUPED_MM(x, w1.transpose(-1, -2), offs=offs)
    if w3 is None:
        h = F.gelu(h)
    else:
        h = F.silu(h) * _GROUPED_MM(x, w3.transpose(-1, -2), offs=offs)
    out = _GROUPED_MM(h, w2.transpose(-1, -2), offs=offs)
    return _ContiguousGrad.apply(out)
