"""FSSDP placement planner: which ranks materialize which experts this step, and where rows go.

Legend: N ranks of the FSSDP group, seen as P (the rank a row comes from) or Q (the rank that
computes it); E experts (global).

Input: ``counts_PE[p, e]``, the rows rank p routed to expert e this call (after capacity
dropping and padding) — every rank's, so every rank derives the same plan. Output: a
:class:`Placement` whose ``rows_PEQ[p, e, q]`` says how many of p's rows of expert e rank q
computes; rank q materializes expert e when it computes any of its rows.

Algorithm (integer arithmetic, every tie broken by the lower index, so deterministic):

1. Loads ``load_E = counts_PE.sum(0)``; each rank may compute at most
   ``cap = ceil(total * (1 + slack) / N)`` rows.
2. Experts with rows, heaviest first (LPT): an expert above ``cap`` is cut into
   ``ceil(load / cap)`` near-equal pieces; each piece (or a whole expert) goes to the
   least-loaded rank not yet holding that expert, and what does not fit under ``cap`` there
   moves on to the next least-loaded rank. So a hot expert ends up on several ranks, a cold
   one on one, an unused one nowhere, and no rank computes more than ``cap`` rows. ``slack``
   trades balance for fewer materializations: a cold expert is split only when it fits whole
   nowhere, which a little slack makes rare.
3. Rows to holders: each holder first takes its own rows of the expert (up to its share: they
   do not travel); the remaining rows — sources in rank order, each source's rows in order —
   fill the remaining shares in holder-rank order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_SLACK = 0.05


@dataclass(frozen=True)
class Placement:
    """One call's plan. ``rows_PEQ`` int64 CPU [N, E, N]: rows of (source p, expert e)
    computed on rank q."""

    rows_PEQ: Tensor

    @property
    def num_ranks(self) -> int:
        return self.rows_PEQ.shape[0]

    @property
    def num_experts(self) -> int:
        return self.rows_PEQ.shape[1]

    @property
    def rows_EQ(self) -> Tensor:
        """Rows of expert e computed on rank q (summed over sources)."""
        return self.rows_PEQ.sum(0)

    @property
    def holds_EQ(self) -> Tensor:
        """Rank q materializes expert e."""
        return self.rows_EQ > 0

    @property
    def replicas_E(self) -> Tensor:
        """Ranks materializing each expert (0 for an expert without rows)."""
        return self.holds_EQ.sum(1)

    @property
    def rows_Q(self) -> Tensor:
        """Rows each rank computes."""
        return self.rows_PEQ.sum((0, 1))

    def experts_on(self, q: int) -> Tensor:
        """The experts rank q materializes, ascending (int64)."""
        return self.holds_EQ[:, q].nonzero().flatten()

    def max_over_mean(self) -> float:
        """The straggler factor: the busiest rank's rows over the mean (1.0 = balanced)."""
        rows = self.rows_Q.double()
        mean = rows.mean().item()
        return rows.max().item() / mean if mean > 0 else 1.0

    def stats(self) -> PlanStats:
        return PlanStats(
            replicas_E=self.replicas_E.clone(),
            experts_Q=self.holds_EQ.sum(0),
            rows_Q=self.rows_Q.clone(),
            materialized=int(self.holds_EQ.sum()),
            max_over_mean=self.max_over_mean(),
        )


@dataclass
class PlanStats:
    """What the trainer logs about a plan: ranks materializing each expert, experts each rank
    materializes, rows per rank, the (expert, rank) materializations and the straggler factor
    (max / mean rows per rank)."""

    replicas_E: Tensor
    experts_Q: Tensor
    rows_Q: Tensor
    materialized: int
    max_over_mean: float


def _least_loaded(rows_Q: list[int], cap: int, avoid: dict[int, int]) -> int:
    """The rank with the fewest rows and room left, preferring ranks not in ``avoid`` (ties:
    the lower rank)."""
    open_ranks = [q for q, rows in enumerate(rows_Q) if rows < cap]
    fresh = [q for q in open_ranks if q not in avoid] or open_ranks
    if not fresh:  # unreachable: N * cap >= total leaves room somewhere
        raise AssertionError("FSSDP planner ran out of room")
    return min(fresh, key=lambda q: (rows_Q[q], q))


def rank_shares(load_E: list[int], num_ranks: int, slack: float) -> list[list[tuple[int, int]]]:
    """Step 2 of the module docstring: for each expert, its ``(rank, rows)`` shares, by rank.

    An expert above ``cap`` is first cut into ``ceil(load / cap)`` near-equal pieces (so a hot
    expert is spread evenly, not as full ranks plus a remainder); each piece goes to the
    least-loaded rank not yet holding the expert, and what does not fit under ``cap`` there
    moves on to the next one."""
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    total = sum(load_E)
    cap = max(1, math.ceil(total * (1 + slack) / num_ranks)) if total else 0
    rows_Q = [0] * num_ranks
    shares: list[list[tuple[int, int]]] = [[] for _ in load_E]
    for e in sorted(range(len(load_E)), key=lambda i: (-load_E[i], i)):
        load = load_E[e]
        if load == 0:
            continue
        num_pieces = -(-load // cap)
        pieces = [load // num_pieces + (i < load % num_pieces) for i in range(num_pieces)]
        share: dict[int, int] = {}
        for piece in pieces:
            while piece > 0:
                q = _least_loaded(rows_Q, cap, share)
                take = min(piece, cap - rows_Q[q])
                share[q] = share.get(q, 0) + take
                rows_Q[q] += take
                piece -= take
        shares[e] = sorted(share.items())
    return shares


def _fill_rows(counts_P: list[int], shares: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Step 3 for one expert: ``(p, q, rows)`` for every source p whose rows holder q computes."""
    left_P = list(counts_P)
    room = dict(shares)
    out = []
    for q in room:  # a holder's own rows stay on it
        keep = min(left_P[q], room[q])
        if keep:
            out.append((q, q, keep))
            left_P[q] -= keep
            room[q] -= keep
    holders = [q for q, _ in shares]
    h = 0
    for p, left in enumerate(left_P):
        while left > 0:
            while room[holders[h]] == 0:
                h += 1
            q = holders[h]
            take = min(left, room[q])
            out.append((p, q, take))
            left -= take
            room[q] -= take
    return out


def plan_placement(counts_PE: Tensor, slack: float = DEFAULT_SLACK) -> Placement:
    """The placement for every rank's rows per expert ``counts_PE`` [N, E] (module docstring).
    ``slack`` >= 0: how far above the mean a rank's rows may go before an expert is split."""
    counts = counts_PE.detach().cpu().long()
    N, E = counts.shape
    per_source = counts.t().tolist()  # [E][N]
    shares = rank_shares([sum(c) for c in per_source], N, slack)
    entries = [(p, e, q, n) for e in range(E) for p, q, n in _fill_rows(per_source[e], shares[e])]
    rows_PEQ = torch.zeros(N, E, N, dtype=torch.long)
    if entries:
        p, e, q, n = torch.tensor(entries, dtype=torch.long).unbind(1)
        rows_PEQ.index_put_((p, e, q), n, accumulate=True)
    return Placement(rows_PEQ)


def static_ep_rows(counts_PE: Tensor) -> Tensor:
    """Rows each rank computes under static expert parallelism over the same N ranks (rank q
    holds experts [q*E/N, (q+1)*E/N)): the baseline the straggler factor is compared with."""
    load_E = counts_PE.sum(0)
    N = counts_PE.shape[0]
    return load_E.view(N, -1).sum(1)
