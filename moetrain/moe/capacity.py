"""Expert capacity and token dropping.

Legend: T tokens, E experts, K top-k, C capacity per expert, A = T*K assignments.

With ``capacity_factor`` set, each expert keeps at most ``C = max(ceil(cf * T * K / E),
min_capacity)`` assignments, computed in exact rational arithmetic (``expert_capacity``); the
rest are dropped (the token keeps its residual path and its other experts' outputs). Which ones
are kept is the drop policy:

- ``probs``: each expert keeps its highest-weight assignments; ties go to the earlier token.
- ``position``: each expert keeps the earliest tokens in flattened, sequence-major batch order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from moetrain.ops import expert_sort


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """``C = max(ceil(capacity_factor * T * K / E), min_capacity)``, exactly.

    The factor is taken as the decimal it prints as (``Fraction(str(capacity_factor))``): the
    shortest decimal that round-trips to the float, which is the decimal the user wrote whenever
    it has at most 15 significant digits. So ``1.1`` means 11/10, not the binary float just
    above it, and ``T=25, K=2, E=5, cf=1.1`` gives ``ceil(11) = 11`` where float arithmetic
    gives 12. (``limit_denominator`` would instead snap a factor like 0.3333333 to 1/3, a value
    the user did not write.) The product and the ceiling are exact rationals, so the result
    never depends on rounding for any T. ``int``, ``Decimal`` and ``Fraction`` factors are
    taken exactly as well.
    """
    factor = Fraction(str(capacity_factor))
    return max(math.ceil(factor * num_tokens * top_k / num_experts), min_capacity)


def rank_within_expert(topk_ids_TK: Tensor, priority_TK: Tensor | None, num_experts: int) -> Tensor:
    """Each assignment's 0-based rank among the assignments of its expert, [T, K] int64.

    Rank order is descending ``priority_TK`` with ties (and ``priority_TK=None``) broken by
    flattened assignment order (token-major), so results are deterministic.
    """
    flat_ids = topk_ids_TK.flatten()
    order = torch.arange(flat_ids.numel(), device=flat_ids.device)
    if priority_TK is not None:
        order = torch.sort(priority_TK.flatten(), descending=True, stable=True).indices
    # A stable sort by expert keeps the priority order inside each expert.
    sorted_idx, counts_E = expert_sort(flat_ids[order], num_experts)
    by_expert = order[sorted_idx]
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    ranks_sorted = (
        torch.arange(flat_ids.numel(), device=flat_ids.device) - starts_E[flat_ids[by_expert]]
    )
    ranks = torch.empty_like(ranks_sorted).scatter_(0, by_expert, ranks_sorted)
    return ranks.view_as(topk_ids_TK)


def capacity_keep_mask(
    topk_ids_TK: Tensor, topk_weights_TK: Tensor, num_experts: int, capacity: int, drop_policy: str
) -> Tensor:
    """Boolean [T, K]: True for the assignments each expert keeps under its capacity."""
    priority = topk_weights_TK.detach() if drop_policy == "probs" else None
    return rank_within_expert(topk_ids_TK, priority, num_experts) < capacity


def drops_by_position(keep_TK: Tensor, seq_len: int) -> Tensor:
    """Dropped assignments per sequence position, int64 [S] (rows of T are sequence-major)."""
    dropped_T = (~keep_TK).sum(-1)
    return dropped_T.view(-1, seq_len).sum(0)
