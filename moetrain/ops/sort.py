"""Stable sort of expert assignments by expert id, with the per-expert histogram.

Legend: A assignments (flattened token-major ``[T, K]``, possibly reordered by the caller), B bins
(experts, plus one for dropped assignments where the caller uses it).

``expert_sort(expert_ids_A, num_bins) -> (indices_A, tokens_per_expert_B)``: ``indices_A`` is the
stable argsort of ``expert_ids_A`` (expert-major; original order inside each expert) and
``tokens_per_expert_B`` its histogram. The compiled kernels run it as a counting sort in O(A + B);
the reference (a comparison/radix ``torch.sort`` and a ``scatter_add`` histogram) is also the
fallback. Integer outputs: nothing to differentiate. The wrapper runs the compiled kernels'
first-use self-check (``moetrain.ops.selfcheck``) before the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moetrain.ops.selfcheck import ensure_checked

_LIB = torch.library.Library("moetrain", "FRAGMENT")
_LIB.define("expert_sort(Tensor expert_ids, int num_bins) -> (Tensor, Tensor)")


def expert_sort_reference(expert_ids_A: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Stable argsort and histogram of ``expert_ids_A`` (values in ``[0, num_bins)``)."""
    indices = torch.sort(expert_ids_A, stable=True).indices
    # scatter_add, not bincount: bincount reads max(ids) on the host (a sync on a GPU)
    ids = expert_ids_A.long()
    counts = torch.zeros(num_bins, dtype=torch.long, device=ids.device)
    return indices, counts.scatter_add_(0, ids, torch.ones_like(ids))


REFERENCES: dict[str, Callable[..., Any]] = {"expert_sort": expert_sort_reference}
_LIB.impl("expert_sort", expert_sort_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("moetrain::expert_sort")
def _expert_sort_fake(expert_ids: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    device = expert_ids.device
    return (
        torch.empty(expert_ids.shape, dtype=torch.long, device=device),
        torch.empty(num_bins, dtype=torch.long, device=device),
    )


def expert_sort(expert_ids_A: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Order assignments by expert. Args: ``expert_ids_A`` int64/int32 [A], values in
    ``[0, num_bins)``; ``num_bins`` B. Returns ``(indices_A, tokens_per_expert_B)``, both int64:
    the stable argsort (ties keep their order) and the count of each id."""
    ensure_checked(expert_ids_A)
    return torch.ops.moetrain.expert_sort(expert_ids_A, num_bins)
