"""Rectify-Router: give capacity's waste back — dropped slots and padding.

Legend: T tokens, E experts, K slots per token, C capacity, N experts per group.

Two corrections of top-k routing under a capacity (Rectify-Router, "Turn Waste into Worth"),
applied after the first capacity pass, each switchable:

- **Intra-group rectification** (``rectify_intra_group``): experts form contiguous groups of
  ``expert_groups`` experts. A slot ``(t, e)`` that capacity dropped moves to the expert of
  ``e``'s group with the highest router probability for ``t`` among the group's experts that
  ``t`` did not select and that have room left after the first pass (a later slot of ``t``
  whose best is an earlier one's stays dropped: one expert per token). One round: the moved
  slots compete for the room in ``drop_policy`` order (``probs``: by their new weight), and a
  slot that does not fit stays dropped. The slot's weight becomes ``w * p[t, e'] / p[t, e]`` (its
  weight scaled from the old expert's probability to the new one's). When a group lies on one
  expert-parallel rank, the moved slot goes to the rank its dropped one was bound for: no new
  destination, only the row capacity would have dropped before sending (the paper's
  *intra-GPU* rectification, with groups = ranks).
- **Fill-in rectification** (``rectify_fill_in``): every expert with ``r > 0`` rows of room left
  (after intra-group rectification, when on) takes the ``r`` tokens with the highest router
  probability for it among those that did not select it (ties to the earlier token), weighted
  ``p[t, e] * routed_scaling_factor``: the rows a padded expert would spend on padding compute
  real tokens. These are extra slots of the token (up to E more).

Both act within a micro-batch (the capacity's scope) before dispatch, so a layout that routes
whole micro-batches gives the single process's result (tested at ep2 and ep4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import torch
from torch import Tensor

from moetrain.moe.capacity import rank_within_expert

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.moe.{name}: {why}")


def validate_rectify(cfg: MoEConfig) -> None:
    groups = cfg.expert_groups
    if groups is not None:
        if not isinstance(groups, int) or groups < 1 or cfg.num_experts % groups:
            _fail(
                "expert_groups",
                f"must be a divisor of num_experts={cfg.num_experts} (experts per group), "
                f"got {groups!r}",
            )
        if not cfg.rectify_intra_group:
            _fail("expert_groups", "applies to rectify_intra_group only; set it or unset this")
    if cfg.rectify_intra_group and (groups is None or groups < 2):
        _fail(
            "rectify_intra_group",
            "needs model.moe.expert_groups >= 2 (experts per group: a dropped slot moves to "
            "another expert of its group)",
        )
    on = [n for n in ("rectify_intra_group", "rectify_fill_in") if getattr(cfg, n)]
    if not on:
        return
    name = on[0]
    if cfg.capacity_factor is None:
        _fail(name, "needs model.moe.capacity_factor (dropless routing drops nothing to rectify)")
    if cfg.router_type != "learned":
        _fail(name, f"needs router_type=learned (router probabilities), got {cfg.router_type!r}")
    for other, bad in (
        ("top_p", cfg.top_p is not None),
        ("expert_choice", cfg.expert_choice is not None),
        ("num_null_experts", cfg.num_extra_experts > 0),
        ("dense_to_sparse_steps", cfg.dense_to_sparse_steps is not None),
        ("top_k_schedule_steps", cfg.top_k_schedule_steps is not None),
    ):
        if bad:
            _fail(name, f"rectifies plain top-k routing: it does not combine with {other}")
    if cfg.bias_update_rate is not None and cfg.bias_load == "kept":
        _fail(
            name,
            "does not combine with bias_load=kept (aux-loss-free balancing would count the "
            "router's choices, not the rectified slots); use bias_load=assigned",
        )


def group_members(cfg: MoEConfig, ids_TK: Tensor) -> Tensor:
    """Boolean [T, K, E]: the experts of each slot's expert group."""
    assert cfg.expert_groups is not None
    E, N = cfg.num_experts, cfg.expert_groups
    group_E = torch.arange(E, device=ids_TK.device) // N
    return group_E == (ids_TK // N).unsqueeze(-1)


def _selected_TE(ids_TK: Tensor, E: int) -> Tensor:
    return torch.zeros(ids_TK.shape[0], E, dtype=torch.bool, device=ids_TK.device).scatter_(
        1, ids_TK, True
    )


def _room(ids_TK: Tensor, keep_TK: Tensor, E: int, capacity: int) -> Tensor:
    kept_E = torch.zeros(E, dtype=torch.long, device=ids_TK.device)
    kept_E.scatter_add_(0, ids_TK.flatten(), keep_TK.flatten().long())
    return capacity - kept_E


def intra_group(
    cfg: MoEConfig,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor,
    probs_TE: Tensor,
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Move dropped slots within their expert group; returns ``(ids_TK, weights_TK,
    keep_TK)``."""
    E = cfg.num_experts
    room_E = _room(ids_TK, keep_TK, E, capacity)
    p_TE = probs_TE.detach()
    # candidates of a dropped slot: its group's experts with room that the token did not select
    cand_TKE = group_members(cfg, ids_TK) & (room_E > 0) & ~_selected_TE(ids_TK, E).unsqueeze(1)
    cand_TKE &= (~keep_TK).unsqueeze(-1)
    score_TKE = p_TE.unsqueeze(1).expand_as(cand_TKE).masked_fill(~cand_TKE, -1.0)
    # the best candidate, ties to the lower expert id (a stable descending sort)
    best_TK = torch.sort(score_TKE, dim=-1, descending=True, stable=True).indices[..., 0]
    moved_TK = cand_TKE.any(-1)
    for k in range(1, ids_TK.shape[1]):  # one expert per token: an earlier slot's target wins
        taken = (moved_TK[:, :k] & (best_TK[:, :k] == best_TK[:, k : k + 1])).any(-1)
        moved_TK[:, k] &= ~taken
    new_ids_TK = torch.where(moved_TK, best_TK, ids_TK)
    p_old_TK = probs_TE.gather(-1, ids_TK)
    p_new_TK = probs_TE.gather(-1, new_ids_TK)
    new_w_TK = torch.where(moved_TK, weights_TK * p_new_TK / p_old_TK.clamp(min=1e-20), weights_TK)
    # moved slots compete for the room; everything else waits in a spare bin E
    bins_TK = new_ids_TK.masked_fill(~moved_TK, E)
    priority = new_w_TK.detach() if cfg.drop_policy == "probs" else None
    rank_TK = rank_within_expert(bins_TK, priority, E + 1)
    room_TK = torch.cat([room_E, room_E.new_zeros(1)]).gather(0, bins_TK.flatten())
    fits_TK = moved_TK & (rank_TK < room_TK.view_as(rank_TK))
    ids_out = torch.where(fits_TK, new_ids_TK, ids_TK)
    weights_out = torch.where(fits_TK, new_w_TK, weights_TK)
    return ids_out, weights_out, keep_TK | fits_TK


def fill_in(
    cfg: MoEConfig, ids_TK: Tensor, keep_TK: Tensor, probs_TE: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The fill-in slots: ``(ids_TE, weights_TE, active_TE)``, slot e of a token expert e,
    active when e took the token into its room."""
    T, E = probs_TE.shape
    room_E = _room(ids_TK, keep_TK, E, capacity).clamp(min=0)
    free_TE = ~_selected_TE(ids_TK, E)
    score_ET = probs_TE.detach().t().masked_fill(~free_TE.t(), -1.0)
    order_ET = torch.sort(score_ET, dim=-1, descending=True, stable=True).indices
    taken_ET = torch.arange(T, device=ids_TK.device) < room_E.unsqueeze(-1)
    active_ET = torch.zeros_like(taken_ET).scatter_(1, order_ET, taken_ET)
    active_TE = active_ET.t() & free_TE
    ids_TE = torch.arange(E, device=ids_TK.device).expand(T, E)
    weights_TE = probs_TE * active_TE * cfg.routed_scaling_factor
    return ids_TE, weights_TE, active_TE


def rectify(
    cfg: MoEConfig,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor,
    probs_TE: Tensor,
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both corrections as configured. Returns ``(ids, weights, keep, dropped_TK)``: the slots
    for the dispatcher (K, or K + E with fill-in) and the top-k slots still dropped."""
    if cfg.rectify_intra_group:
        ids_TK, weights_TK, keep_TK = intra_group(
            cfg, ids_TK, weights_TK, keep_TK, probs_TE, capacity
        )
    dropped_TK = ~keep_TK
    if not cfg.rectify_fill_in:
        return ids_TK, weights_TK, keep_TK, dropped_TK
    fill_ids, fill_w, fill_active = fill_in(cfg, ids_TK, keep_TK, probs_TE, capacity)
    ids = torch.cat([ids_TK, fill_ids], -1)
    weights = torch.cat([weights_TK, fill_w], -1)
    keep = torch.cat([keep_TK, fill_active], -1)
    return ids, weights, keep, dropped_TK
