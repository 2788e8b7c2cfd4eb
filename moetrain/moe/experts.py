"""Routed experts: E MLPs held as 3-D weights, run as one grouped GEMM over variable row counts.

Legend: R rows (in expert order), D model dim, F expert hidden dim, E experts.

Weights: ``w1_EFD`` and ``w3_EFD`` (gate and up projections, [E, F, D]; w3 only for SwiGLU) and
``w2_EDF`` (down projection, [E, D, F]). Expert e computes ``w2_e @ act(w1_e x, w3_e x)``.

Grouped GEMM path (measured on CPU, see docs/moe.md): a Python loop over experts whose inputs
and weights are taken with one ``split``/``unbind`` each, so autograd has one backward node per
tensor instead of building a full-size gradient per expert (indexing ``w[e]`` in the loop was
~9x slower); ``torch._grouped_mm`` was 2-2.5x slower in backward on CPU. With fixed shapes
(pad_to_capacity) the experts run as batched matmuls.
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


class GroupedExperts(nn.Module):
    """``num_experts`` MLPs; ``forward(rows_RD, tokens_per_expert_E)`` runs expert e on its
    ``tokens_per_expert_E[e]`` consecutive rows. Under expert parallelism ``num_experts`` is the
    local count."""

    def __init__(self, cfg: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        E = num_experts if num_experts is not None else cfg.num_experts
        D, Fh = cfg.dim, cfg.hidden_dim
        self.num_experts = E
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
        (CPU int64 counts); returns [R, D].

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
        return grouped_mlp(rows_RD, tokens_per_expert_E, w1, w3, w2)


def grouped_mlp(
    rows_RD: Tensor, tokens_per_expert_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor
) -> Tensor:
    """Expert e (weights ``w1[e]``, ``w3[e]``, ``w2[e]``) on its ``tokens_per_expert_E[e]``
    consecutive rows of ``rows_RD``."""
    counts = tokens_per_expert_E.tolist()
    if len(counts) != w1.shape[0]:
        raise ValueError(f"got row counts for {len(counts)} experts, hold {w1.shape[0]}")
    if len(set(counts)) == 1:  # fixed shapes (padded to capacity, or perfectly even)
        x_ECD = rows_RD.view(w1.shape[0], counts[0], rows_RD.shape[-1])
        return expert_mlp(x_ECD, w1, w3, w2).flatten(0, 1)
    xs = rows_RD.split(counts)
    w1s = w1.unbind(0)
    w3s = w3.unbind(0) if w3 is not None else [None] * w1.shape[0]
    w2s = w2.unbind(0)
    outs = [expert_mlp(*args) for args in zip(xs, w1s, w3s, w2s)]
    return torch.cat(outs)
