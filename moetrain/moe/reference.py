"""Naive references for the MoE layer: the slow, obviously-correct versions it is tested against.

Legend: T tokens, D model dim, E experts, K top-k, C capacity.

They take the layer's own router decision (routers are tested on their own against hand-computed
cases) and redo everything after it without the layer's machinery: capacity with a Python loop
over assignments, experts one token at a time (``reference_moe_per_token``) or one expert at a
time with boolean indexing (``reference_moe_per_expert``, fast enough for benchmark shapes),
and the aux losses from their formulas. Both return ``(y, aux_loss)`` where ``y`` has x's shape
and ``aux_loss`` is the value the layer attaches through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moetrain.moe.capacity import expert_capacity
from moetrain.moe.experts import expert_mlp
from moetrain.moe.layer import MoELayer
from moetrain.moe.router import RouterOutput


def naive_keep(
    topk_ids_TK: Tensor, topk_weights_TK: Tensor, num_experts: int, capacity: int, drop_policy: str
) -> list[list[bool]]:
    """Fill each expert up to ``capacity`` in priority order: weight desc (``probs``) or
    token order (``position``), ties to the earlier assignment."""
    ids = topk_ids_TK.tolist()
    weights = topk_weights_TK.detach().tolist()
    T, K = len(ids), len(ids[0]) if ids else 0
    order = [(t, k) for t in range(T) for k in range(K)]
    if drop_policy == "probs":
        order.sort(key=lambda tk: (-weights[tk[0]][tk[1]], tk[0] * K + tk[1]))
    used = [0] * num_experts
    keep = [[False] * K for _ in range(T)]
    for t, k in order:
        e = ids[t][k]
        if used[e] < capacity:
            used[e] += 1
            keep[t][k] = True
    return keep


def _route(layer: MoELayer, x: Tensor, token_ids: Tensor | None):
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.dim)
    noise = layer.routing_step.last_noise  # the draws of the layer's latest call, if any
    if layer.router.draws_noise and noise is not None:
        routed: RouterOutput = layer.router(x_TD, token_ids, noise=noise)
    else:
        routed = layer.router(x_TD, token_ids)
    T, K = routed.topk_ids_TK.shape
    if cfg.capacity_factor is None:
        keep = [[True] * K for _ in range(T)]
    else:
        C = expert_capacity(T, cfg.num_experts, K, cfg.capacity_factor, cfg.min_capacity)
        keep = naive_keep(
            routed.topk_ids_TK, routed.topk_weights_TK, cfg.num_experts, C, cfg.drop_policy
        )
    return x_TD, routed, keep


def _shared(layer: MoELayer, x_TD: Tensor) -> Tensor:
    s = layer.shared_experts
    if s is None:
        return torch.zeros_like(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        out = expert_mlp(x_TD[t], s.w1_HD, s.w3_HD, s.w2_DH)
        if s.gate_1D is not None:
            out = torch.sigmoid(s.gate_1D[0] @ x_TD[t]) * out
        rows.append(out)
    return torch.stack(rows)


def reference_aux_loss(layer: MoELayer, routed: RouterOutput, seq_len: int | None) -> Tensor:
    """Load-balancing + z-loss from their formulas, expert by expert (micro-batch or sequence
    scope; in one process the global scope equals the micro-batch scope on a step's first call,
    later calls add the step's earlier counts: tests/unit/test_routing_step.py)."""
    cfg = layer.cfg
    total = routed.topk_weights_TK.new_zeros(())
    if routed.probs_TE is None or routed.logits_TE is None:
        return total
    E, K = cfg.num_experts, cfg.top_k
    ids = routed.topk_ids_TK
    groups = [slice(None)]
    if cfg.aux_loss_scope == "sequence" and seq_len is not None:
        groups = [slice(b * seq_len, (b + 1) * seq_len) for b in range(ids.shape[0] // seq_len)]
    if layer.aux_coeff > 0:
        per_group = []
        for g in groups:
            ids_g, probs_g = ids[g], routed.probs_TE[g]
            n = ids_g.shape[0]
            terms = [(ids_g == i).sum() / (n * K) * probs_g[:, i].mean() for i in range(E)]
            per_group.append(layer.aux_coeff * E * torch.stack(terms).sum())
        total = total + torch.stack(per_group).mean()
    if cfg.z_loss_coeff > 0:
        lse = [torch.log(torch.exp(row).sum()) ** 2 for row in routed.logits_TE.double()]
        total = total + cfg.z_loss_coeff * torch.stack(lse).mean().to(total.dtype)
    return total


def _experts(layer: MoELayer):
    ex = layer.experts
    return ex.w1_EFD, ex.w3_EFD, ex.w2_EDF


def reference_moe_per_token(
    layer: MoELayer, x: Tensor, token_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token loop: ``y_t = sum_k keep_tk * w_tk * expert_{e_tk}(x_t)`` (+ shared)."""
    x_TD, routed, keep = _route(layer, x, token_ids)
    w1, w3, w2 = _experts(layer)
    ids = routed.topk_ids_TK.tolist()
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1], dtype=torch.float32)
        for k, e in enumerate(ids[t]):
            if keep[t][k]:
                out = expert_mlp(x_TD[t], w1[e], None if w3 is None else w3[e], w2[e])
                acc = acc + routed.topk_weights_TK[t, k] * out.float()
        rows.append(acc.to(x.dtype))
    y_TD = torch.stack(rows) + _shared(layer, x_TD)
    seq_len = x.shape[-2] if x.dim() == 3 else None
    return y_TD.view(x.shape), reference_aux_loss(layer, routed, seq_len)


def reference_moe_per_expert(
    layer: MoELayer, x: Tensor, token_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-expert loop with boolean indexing (the textbook MoE forward); same result as
    ``reference_moe_per_token``. Shared experts run as one dense MLP here."""
    x_TD, routed, keep = _route(layer, x, token_ids)
    w1, w3, w2 = _experts(layer)
    keep_TK = torch.tensor(keep, dtype=torch.bool).view_as(routed.topk_ids_TK)
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for e in range(layer.cfg.num_experts):
        token_idx, slot = torch.where((routed.topk_ids_TK == e) & keep_TK)
        out = expert_mlp(x_TD[token_idx], w1[e], None if w3 is None else w3[e], w2[e])
        weight = routed.topk_weights_TK[token_idx, slot].unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_idx, weight * out.float())
    y_TD = y_TD.to(x.dtype)
    s = layer.shared_experts
    if s is not None:
        shared = expert_mlp(x_TD, s.w1_HD, s.w3_HD, s.w2_DH)
        if s.gate_1D is not None:
            shared = torch.sigmoid(x_TD @ s.gate_1D.t()) * shared
        y_TD = y_TD + shared
    seq_len = x.shape[-2] if x.dim() == 3 else None
    return y_TD.view(x.shape), reference_aux_loss(layer, routed, seq_len)
