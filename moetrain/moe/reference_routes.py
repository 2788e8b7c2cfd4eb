"""Naive reference for the routing-research options (:mod:`moetrain.moe.routes`).

Legend: T tokens, D model dim, E FFN experts, Et routes (FFN, null, zero, copy, constant).

Unlike :mod:`moetrain.moe.reference`, this redoes the router's *selection* too, one token (or
one expert) at a time in Python from the router's weights: logits, scores, top-k / top-p /
expert-choice, weights, capacity, each route's output and the aux losses, from the options'
definitions. ``reference_routes(layer, x)`` returns ``(y, aux_loss, picked)`` with ``picked``
each token's list of ``(route, weight)`` slots that carry a route (FFN slots dropped by
capacity excluded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moetrain.moe.capacity import expert_capacity
from moetrain.moe.experts import expert_mlp
from moetrain.moe.layer import MoELayer
from moetrain.moe.noise import TokenNoise
from moetrain.moe.reference_policies import (
    dense_choice,
    node_aware_order,
    rectify_slots,
    top_k_at,
)
from moetrain.moe.routes import route_starts


def _scores(layer: MoELayer, x_TD: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
    """(logits, scores) [T, Et] in float64 from the router's weights."""
    router = layer.router
    logits = x_TD.double() @ router.weight_ED.double().t()  # type: ignore[operator]
    residual = getattr(router, "residual_EE", None)
    if previous is not None and residual is not None:
        logits = logits + previous.double() @ residual.double().t()
    if layer.cfg.score_func == "sigmoid":
        return logits, 1 / (1 + torch.exp(-logits))
    rows = [torch.exp(row - row.max()) / torch.exp(row - row.max()).sum() for row in logits]
    return logits, torch.stack(rows)


def _probs(layer: MoELayer, scores: Tensor) -> Tensor:
    if layer.cfg.score_func == "sigmoid":
        return scores / scores.sum(-1, keepdim=True)
    return scores


def _token_choice(layer: MoELayer, scores: Tensor, probs: Tensor, k: int) -> list[list[int]]:
    """Each token's routes in order: top-k (``k``), or top-p within [min_k, max_k]."""
    cfg = layer.cfg
    scores, probs = scores.detach(), probs.detach()
    chosen = []
    for t in range(scores.shape[0]):
        order = node_aware_order(layer, [float(v) for v in scores[t]])
        if cfg.top_p is None:
            chosen.append(order[:k])
            continue
        picked: list[int] = []
        mass = 0.0
        for e in order:
            if len(picked) >= cfg.route_width:
                break
            if mass >= cfg.top_p and len(picked) >= cfg.min_k:
                break
            picked.append(e)
            mass += float(probs[t, e])
        chosen.append(picked)
    return chosen


def _expert_choice(layer: MoELayer, probs: Tensor, seq_len: int | None) -> list[list[int]]:
    """Each token's experts: every expert takes its C best tokens of each scope."""
    cfg = layer.cfg
    probs = probs.detach()
    T, E = probs.shape
    scope = seq_len if cfg.expert_choice == "sequence" and seq_len is not None else T
    assert cfg.capacity_factor is not None
    C = min(expert_capacity(scope, E, cfg.top_k, cfg.capacity_factor, cfg.min_capacity), scope)
    chosen: list[list[int]] = [[] for _ in range(T)]
    for start in range(0, T, scope):
        for e in range(E):
            tokens = sorted(range(start, start + scope), key=lambda t: (-float(probs[t, e]), t))
            for t in tokens[:C]:
                chosen[t].append(e)
    return [sorted(c) for c in chosen]


def _weights(layer: MoELayer, chosen, scores: Tensor) -> list[list[Tensor]]:
    """Differentiable slot weights: scores, renormalized over the non-null slots."""
    cfg = layer.cfg
    null = range(cfg.num_experts, cfg.num_experts + cfg.num_null_experts)
    out = []
    for t, routes in enumerate(chosen):
        w = [scores[t, e] for e in routes]
        if cfg.norm_topk_prob:
            total = sum((v for v, e in zip(w, routes) if e not in null), torch.zeros(()))
            w = [v / (total + 1e-20) for v in w]
        out.append([v * cfg.routed_scaling_factor for v in w])
    return out


def _drop(layer: MoELayer, chosen, weights, k: int) -> tuple[list[list[bool]], int | None]:
    """Capacity over the FFN slots (a Python fill in priority order); and C."""
    cfg = layer.cfg
    keep = [[True] * len(r) for r in chosen]
    if cfg.capacity_factor is None or cfg.expert_choice is not None:
        return keep, None
    E = cfg.num_experts
    C = expert_capacity(len(chosen), E, k, cfg.capacity_factor, cfg.min_capacity)
    slots = [(t, k) for t, r in enumerate(chosen) for k, e in enumerate(r) if e < E]
    if cfg.drop_policy == "probs":  # stable: ties keep the earlier (token, slot)
        slots.sort(key=lambda tk: -float(weights[tk[0]][tk[1]].detach()))
    used = [0] * E
    for t, k in slots:
        e = chosen[t][k]
        keep[t][k] = used[e] < C
        used[e] += int(keep[t][k])
    return keep, C


def _route_output(layer: MoELayer, e: int, x: Tensor) -> Tensor:
    cfg = layer.cfg
    _, null, _, copy, const, _ = route_starts(cfg)
    if e < null:
        ex = layer.experts
        w3 = None if ex.w3_EFD is None else ex.w3_EFD[e]
        return expert_mlp(x, ex.w1_EFD[e], w3, ex.w2_EDF[e]).double()
    if e < copy:  # null and zero experts
        return torch.zeros_like(x, dtype=torch.float64)
    if e < const:
        return x.double()
    zc = layer.zero_compute
    assert zc is not None and zc.gate_N2D is not None and zc.vectors_ND is not None
    j = e - const
    a = torch.softmax(zc.gate_N2D[j].double() @ x.double(), -1)
    return a[0] * x.double() + a[1] * zc.vectors_ND[j].double()


def _balance(layer: MoELayer, chosen, probs: Tensor, seq_len: int | None) -> Tensor:
    cfg = layer.cfg
    Et = cfg.num_routes
    T = len(chosen)
    scope = seq_len if cfg.aux_loss_scope == "sequence" and seq_len is not None else T
    _, null, zero, _, _, _ = route_starts(cfg)
    losses = []
    for start in range(0, T, scope):
        part = chosen[start : start + scope]
        n = sum(len(r) for r in part)
        f = [sum(r.count(e) for r in part) / max(n, 1) for e in range(Et)]
        P: list[Tensor] = [probs[start : start + scope, e].mean() for e in range(Et)]
        if cfg.num_null_experts > 1:  # one pool
            f_null = sum(f[null:zero]) / (zero - null)
            P_null = torch.stack(P[null:zero]).mean()
            f[null:zero] = [f_null] * (zero - null)
            P[null:zero] = [P_null] * (zero - null)
        eta = [1.0 if e < zero else cfg.zero_compute_aux_weight for e in range(Et)]
        losses.append(torch.stack([eta[e] * f[e] * P[e] for e in range(Et)]).sum())
    coeff = layer.aux_coeff if layer.adaptive_aux is None else layer.adaptive_aux.coeff.double()
    return coeff * Et * torch.stack(losses).mean()


def _aux(layer: MoELayer, chosen, logits: Tensor, probs: Tensor, seq_len: int | None) -> Tensor:
    cfg = layer.cfg
    total = torch.zeros((), dtype=torch.float64)
    balanced = layer.aux_coeff > 0 or layer.adaptive_aux is not None
    if balanced and cfg.expert_choice is None:
        total = total + _balance(layer, chosen, probs, seq_len)
    if cfg.entropy_loss_coeff > 0:
        ent = [-sum(p * torch.log(p.clamp(min=1e-20)) for p in row) for row in probs]
        total = total + cfg.entropy_loss_coeff * torch.stack(ent).mean()
    if cfg.z_loss_coeff > 0:
        lse = [torch.log(torch.exp(row).sum()) ** 2 for row in logits]
        total = total + cfg.z_loss_coeff * torch.stack(lse).mean()
    return total


def reference_routes(
    layer: MoELayer,
    x: Tensor,
    previous_logits: Tensor | None = None,
    step: int = 0,
    noise: TokenNoise | None = None,
) -> tuple[Tensor, Tensor, list[list[tuple[int, float]]]]:
    """The layer's output (shared experts excluded), aux loss and picked slots, from the
    definitions (``previous_logits``: the previous MoE layer's, for a gating residual; ``step``
    the optimizer step of the schedules; ``noise`` the call's key, for the dense gate)."""
    cfg = layer.cfg
    seq_len = x.shape[-2] if x.dim() == 3 else None
    x_TD = x.reshape(-1, cfg.dim)
    logits, scores = _scores(layer, x_TD, previous_logits)
    probs = _probs(layer, scores)
    if cfg.expert_choice is not None:
        chosen = _expert_choice(layer, probs, seq_len)
        scale = cfg.routed_scaling_factor
        weights = [[probs[t, e] * scale for e in r] for t, r in enumerate(chosen)]
    elif (dense := dense_choice(layer, logits, step, noise)) is not None:
        chosen, weights = dense
    else:
        k = top_k_at(layer, step)
        chosen = _token_choice(layer, scores, probs, k)
        weights = _weights(layer, chosen, scores)
    keep, C = _drop(layer, chosen, weights, top_k_at(layer, step))
    balance_chosen = [list(r) for r in chosen]  # the balance loss counts the router's choice
    if C is not None and (cfg.rectify_intra_group or cfg.rectify_fill_in):
        rectify_slots(layer, chosen, weights, keep, probs, C)
    rows, picked = [], []
    for t, routes in enumerate(chosen):
        acc = torch.zeros(cfg.dim, dtype=torch.float64)
        mine = []
        for k, e in enumerate(routes):
            if keep[t][k]:
                acc = acc + weights[t][k] * _route_output(layer, e, x_TD[t])
                mine.append((e, float(weights[t][k].detach())))
        rows.append(acc)
        picked.append(mine)
    y = torch.stack(rows).to(x.dtype).view(x.shape)
    return y, _aux(layer, balance_chosen, logits, probs, seq_len), picked
