"""Naive reference for the routing policies (:mod:`moetrain.moe.policies`,
:mod:`moetrain.moe.rectify`), one token or one slot at a time in Python, from the options'
definitions; :func:`moetrain.moe.reference_routes.reference_routes` calls these.

Legend: T tokens, E experts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moetrain.moe import noise as noise_streams
from moetrain.moe.noise import TokenNoise

if TYPE_CHECKING:
    from moetrain.moe.layer import MoELayer


def top_k_at(layer: MoELayer, step: int) -> int:
    """k of the top-k schedule at ``step``: linear from top_k_start, reached at the end."""
    cfg = layer.cfg
    n = cfg.top_k_schedule_steps
    if n is None or step >= n:
        return cfg.top_k
    return cfg.top_k_start + math.floor((cfg.top_k - cfg.top_k_start) * step / n)


def dense_choice(
    layer: MoELayer, logits: Tensor, step: int, noise: TokenNoise | None
) -> tuple[list[list[int]], list[list[Tensor]]] | None:
    """The dense-to-sparse gate's experts and weights per token, or None once it is sparse."""
    cfg = layer.cfg
    n = cfg.dense_to_sparse_steps
    if n is None or step >= n:
        return None
    t0, t1 = cfg.dense_to_sparse_temperature
    tau = t0 * (t1 / t0) ** (step / n)
    T, E = logits.shape
    u = None
    if layer.training:
        noise = TokenNoise.local(T, logits.device) if noise is None else noise
        u = noise.uniform(noise_streams.DENSE_GATE, E).double().clamp(min=2.0**-25)
    chosen, weights = [], []
    for t in range(T):
        z = [logits[t, e] + (0.0 if u is None else -math.log(-math.log(u[t, e]))) for e in range(E)]
        top = max(float(v) for v in z)
        ex = [torch.exp((v - top) / tau) for v in z]
        g = [v / sum(ex) for v in ex]
        order = sorted(range(E), key=lambda e: (-float(g[e]), e))
        threshold = cfg.dense_to_sparse_threshold
        picked = [e for j, e in enumerate(order) if j < cfg.top_k or float(g[e]) >= threshold]
        w = [g[e] for e in picked]
        if cfg.norm_topk_prob:
            total = sum(w, torch.zeros((), dtype=torch.float64))
            w = [v / (total + 1e-20) for v in w]
        chosen.append(picked)
        weights.append([v * cfg.routed_scaling_factor for v in w])
    return chosen, weights


def rectify_slots(layer: MoELayer, chosen, weights, keep, probs: Tensor, C: int) -> None:
    """Rectify-Router in place: dropped slots move within their expert group (one round, the
    moved slots filling the room in priority order), then under-full experts take their best
    tokens that did not select them (appended slots, kept)."""
    cfg = layer.cfg
    E = cfg.num_experts
    used = [0] * E
    for t, routes in enumerate(chosen):
        for k, e in enumerate(routes):
            used[e] += int(keep[t][k])
    if cfg.rectify_intra_group:
        N = cfg.expert_groups
        assert N is not None
        moves = []
        for t, routes in enumerate(chosen):
            targets: list[int] = []  # one expert per token: an earlier slot's target wins
            for k, e in enumerate(routes):
                if keep[t][k]:
                    continue
                group = range(e // N * N, e // N * N + N)
                cands = [c for c in group if c not in routes and used[c] < C]
                if not cands:
                    continue
                best = min(cands, key=lambda c: (-float(probs[t, c].detach()), c))
                if best in targets:
                    continue
                targets.append(best)
                w = weights[t][k] * probs[t, best] / probs[t, e]
                moves.append((t, k, best, w))
        if cfg.drop_policy == "probs":
            moves.sort(key=lambda m: -float(m[3].detach()))
        room = [C - n for n in used]
        for t, k, best, w in moves:
            if room[best] > 0:
                room[best] -= 1
                used[best] += 1
                chosen[t][k], weights[t][k], keep[t][k] = best, w, True
    if cfg.rectify_fill_in:
        base = [len(routes) for routes in chosen]
        for e in range(E):
            free = [t for t, routes in enumerate(chosen) if e not in routes[: base[t]]]
            free.sort(key=lambda t: (-float(probs[t, e].detach()), t))
            for t in free[: max(C - used[e], 0)]:
                chosen[t].append(e)
                weights[t].append(probs[t, e] * cfg.routed_scaling_factor)
                keep[t].append(True)


def node_aware_order(layer: MoELayer, scores: list[float]) -> list[int]:
    """A token's experts by descending selection score (ties to the lower id): the locality
    bias added on the router's ``home_experts``; with node-limited routing only the experts of
    the M node groups whose ``ceil(K / M)`` best scores sum highest (ties to the lower group)."""
    cfg = layer.cfg
    choice = list(scores)
    home = getattr(layer.router, "home_experts", None)
    if home is not None:
        for e in home:
            choice[e] += cfg.locality_bias
    allowed: list[int] = list(range(len(choice)))
    M = cfg.max_node_groups
    if M is not None:
        n = cfg.num_experts // cfg.num_node_groups
        best = min(math.ceil(cfg.top_k / M), n)
        group_score = [
            sum(sorted(choice[g * n : (g + 1) * n], reverse=True)[:best])
            for g in range(cfg.num_node_groups)
        ]
        kept = sorted(range(cfg.num_node_groups), key=lambda g: (-group_score[g], g))[:M]
        allowed = [e for g in sorted(kept) for e in range(g * n, (g + 1) * n)]
    return sorted(allowed, key=lambda e: (-choice[e], e))
