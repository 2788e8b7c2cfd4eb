"""Routing research II: routing that knows where experts live.

Legend: T tokens, E experts, K top-k, G node groups, M kept node groups.

Experts form ``num_node_groups`` contiguous **node groups** (E/G experts each). Under expert
parallelism a node group must lie on one node (config validation checks it against
``parallel.ep`` and ``parallel.ep_ranks_per_node``); in one process the groups are just the
config's, so one process computes what any layout does.

- **Node-limited routing** (DeepSeek-V3, ``max_node_groups`` = M): each token first keeps the
  M node groups with the highest sum of their ``ceil(K / M)`` best expert scores (selection
  scores: with aux-loss-free balancing, bias included), then takes its top-k among their
  experts. So its experts lie on at most M nodes, and with a node-deduplicating exchange
  (``parallel.ep_a2a=node_dedup``) each token crosses to at most M nodes (M - 1 besides its
  own, when its own node is among them) per exchange, whatever K is.
- **Locality bias** (LocMoE, ``locality_bias`` = b): b is added to the selection score of the
  experts on the token's own node (selection only; combine weights stay the router's scores),
  converting inter-node traffic into intra-node traffic. The token's node is where it is
  computed: the expert-parallel placement sets each rank's ``home_experts``; in one process every
  expert is local and the bias changes nothing. It is the one routing option whose choice
  depends on the layout, by design.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NoReturn

from torch import Tensor

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.moe.{name}: {why}")


def validate_node_routing(cfg: MoEConfig) -> None:
    G, M = cfg.num_node_groups, cfg.max_node_groups
    if not isinstance(G, int) or G < 1 or cfg.num_experts % G:
        _fail("num_node_groups", f"must divide num_experts={cfg.num_experts}, got {G!r}")
    if not cfg.locality_bias >= 0:
        _fail("locality_bias", f"must be >= 0, got {cfg.locality_bias}")
    on = [
        name
        for name, used in (
            ("max_node_groups", M is not None),
            ("locality_bias", cfg.locality_bias > 0),
        )
        if used
    ]
    if not on:
        return
    if G < 2:
        _fail(on[0], "needs model.moe.num_node_groups >= 2 (node groups of experts)")
    if M is not None:
        if not 1 <= M <= G:
            _fail("max_node_groups", f"must lie in [1, num_node_groups={G}], got {M}")
        if cfg.top_k > M * (cfg.num_experts // G):
            _fail(
                "max_node_groups",
                f"{M} node groups of {cfg.num_experts // G} experts hold fewer than "
                f"top_k={cfg.top_k} experts; raise it",
            )
    if cfg.router_type != "learned":
        _fail(on[0], f"needs router_type=learned, got {cfg.router_type!r}")
    for other, bad in (
        ("num_groups", cfg.num_groups > 1),
        ("top_p", cfg.top_p is not None),
        ("expert_choice", cfg.expert_choice is not None),
        ("num_null_experts", cfg.num_extra_experts > 0),
        ("dense_to_sparse_steps", cfg.dense_to_sparse_steps is not None),
        ("rectify_fill_in", cfg.rectify_fill_in),
    ):
        if bad:
            _fail(on[0], f"does not combine with {other} (it selects experts across nodes)")
    groups = cfg.expert_groups
    if cfg.rectify_intra_group and groups and (cfg.num_experts // G) % groups:
        _fail(
            "expert_groups",
            f"{groups} experts per group must nest in the node groups of "
            f"{cfg.num_experts // G} (a rectified slot stays on its node)",
        )


def group_best(cfg: MoEConfig) -> int:
    """Experts whose scores make a node group's score: ``ceil(top_k / max_node_groups)``."""
    assert cfg.max_node_groups is not None
    return min(math.ceil(cfg.top_k / cfg.max_node_groups), cfg.num_experts // cfg.num_node_groups)


def add_locality_bias(cfg: MoEConfig, choice_TE: Tensor, home: range | None) -> Tensor:
    """``choice_TE`` with ``locality_bias`` added on the experts ``home`` (None: all local)."""
    if home is None or cfg.locality_bias == 0:
        return choice_TE
    bonus_TE = choice_TE.new_zeros(choice_TE.shape)
    bonus_TE[:, home.start : home.stop] = cfg.locality_bias
    return choice_TE + bonus_TE


def node_limit_bound(cfg: MoEConfig, nodes: int) -> int:
    """Inter-node copies of one token per exchange with the node-deduplicating exchange, at
    most: ``min(M, nodes - 1)`` under node-limited routing (``nodes - 1`` without)."""
    M = cfg.max_node_groups
    remote = max(nodes - 1, 0)
    return remote if M is None else min(M, remote)
