"""The learned router: a linear map to per-expert scores, then top-k selection.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups, M kept groups
(``topk_groups``), e experts per group.

All router math runs in fp32 whatever the model dtype. Scores are softmax or sigmoid; options:
group-limited top-k (DeepSeek-V3), gating-logit normalization (Skywork-MoE), top-k
renormalization, a routed scaling factor, input jitter (Switch) and a per-expert score bias used
for selection only (DeepSeek-V3 aux-loss-free balancing). ``router_type: learned``.

It also scores null and zero-computation experts (E then counts every route), selects top-p
(dynamic width) instead of top-k, and adds MoE++'s gating residual (the previous MoE layer's
logits through a learned [E, E] map): :mod:`moetrain.moe.routes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe import noise as noise_streams
from moetrain.moe.aux_losses import CountReduce, expert_counts
from moetrain.moe.node_routing import add_locality_bias, group_best
from moetrain.moe.noise import TokenNoise
from moetrain.moe.policies import dense_select, dense_temperature, gumbel, scheduled_top_k
from moetrain.moe.router import Router, RouterOutput, apply_keeping_fp32
from moetrain.moe.routes import combine_weights, top_p_select

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


class TopKRouter(Router):
    """Learned linear router ``logits_TE = x_TD @ weight_ED.T`` (fp32), top-k of its scores.

    State: parameter ``weight_ED``; persistent buffer ``expert_bias_E`` (aux-loss-free
    balancing bias, fp32 even when the module is cast); non-persistent ``step_load_E``.
    """

    uses_expert_bias = True
    supports_groups = True
    eager_under_compile = ("jitter_draws", "gumbel_draws", "scheduled_k")

    expert_bias_E: Tensor
    step_load_E: Tensor
    gate_tau: Tensor  # with dense_to_sparse_steps only
    residual_EE: nn.Parameter | None

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        # no noise keys to build without jitter or the dense-to-sparse gate's Gumbel noise
        self.draws_noise = cfg.router_jitter > 0 or cfg.dense_to_sparse_steps is not None
        # the schedules (moetrain.moe.policies) read the optimizer step, which the layer sets
        self.uses_step = (
            cfg.dense_to_sparse_steps is not None or cfg.top_k_schedule_steps is not None
        )
        self.step = 0
        # the dense-to-sparse gate: its temperature lives on the device, set once per step
        self.has_gate = cfg.dense_to_sparse_steps is not None
        self.dense_phase = self.has_gate
        if self.has_gate:
            self.register_buffer("gate_tau", torch.ones(()), persistent=False)
        E = cfg.num_routes  # FFN experts, then null and zero-computation experts
        self.weight_ED = nn.Parameter(torch.empty(E, cfg.dim))
        self.residual_EE = None  # MoE++ gating residual: enable_gating_residual()
        # LocMoE: the experts on this rank's node (the EP placement sets them; None: all local)
        self.home_experts: range | None = None
        # Aux-loss-free balancing state: the bias (selection only) and this step's loads.
        self.register_buffer("expert_bias_E", torch.zeros(E), persistent=True)
        self.register_buffer("step_load_E", torch.zeros(E, dtype=torch.float32), persistent=False)
        if cfg.freeze_router:  # SMoE-Dropout's fixed random router
            self.weight_ED.requires_grad_(False)

    def enable_gating_residual(self) -> None:
        """Add MoE++'s gating residual: ``forward(..., previous_logits_TE=L)`` adds
        ``L @ residual_EE.T`` to the logits (``residual_EE`` starts at zero, so the router starts
        as without it). The layer enables it on every MoE layer but the first."""
        E = self.cfg.num_routes
        self.residual_EE = nn.Parameter(torch.zeros(E, E, device=self.weight_ED.device))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight_ED, std=std)
        if self.residual_EE is not None:
            nn.init.zeros_(self.residual_EE)
        self.expert_bias_E.zero_()
        self.step_load_E.zero_()
        if self.has_gate:
            self.gate_tau.fill_(dense_temperature(self.cfg, 0) or 1.0)

    def set_step(self, step: int) -> None:
        """Optimizer step ``step`` begins (the layer calls it): the schedules follow it. The
        gate's temperature is written to its buffer here, outside any compiled code, so a forward
        reads it without a host-to-device copy."""
        self.step = step
        if self.has_gate:
            temperature = dense_temperature(self.cfg, step)
            self.dense_phase = temperature is not None
            if temperature is not None:
                self.gate_tau.fill_(temperature)

    def forward(
        self,
        x_TD: Tensor,
        token_ids_T: Tensor | None = None,
        noise: TokenNoise | None = None,
        previous_logits_TE: Tensor | None = None,
    ) -> RouterOutput:
        """``previous_logits_TE``: the previous MoE layer's logits (gating residual)."""
        # fp32 router math even under autocast (which would run F.linear in bf16)
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD, noise, previous_logits_TE)

    def _route(
        self, x_TD: Tensor, noise: TokenNoise | None, previous_logits_TE: Tensor | None = None
    ) -> RouterOutput:
        cfg = self.cfg
        x = x_TD.float()
        if self.training and cfg.router_jitter > 0:
            # Switch's multiplicative jitter, uniform in [1 - eps, 1 + eps], counter-keyed
            noise = TokenNoise.local(x.shape[0], x.device) if noise is None else noise
            u_TD = self.jitter_draws(noise, x.shape[1])
            x = x * (1 - cfg.router_jitter + 2 * cfg.router_jitter * u_TD)
        logits_TE = F.linear(x, self.weight_ED.float())
        if previous_logits_TE is not None and self.residual_EE is not None:
            logits_TE = logits_TE + F.linear(previous_logits_TE.float(), self.residual_EE.float())
        scores_TE = self._scores(logits_TE)
        probs_TE = self._probs(scores_TE)
        choice_TE = scores_TE.detach()
        if cfg.bias_update_rate is not None:
            choice_TE = choice_TE + self.expert_bias_E
        if cfg.num_groups > 1:
            choice_TE = mask_to_top_groups(choice_TE, cfg.num_groups, cfg.topk_groups)
        choice_TE = add_locality_bias(cfg, choice_TE, self.home_experts)  # LocMoE
        if cfg.max_node_groups is not None:  # DeepSeek-V3's node-limited routing
            choice_TE = mask_to_top_groups(
                choice_TE, cfg.num_node_groups, cfg.max_node_groups, group_best(cfg)
            )
        active_TK = None
        if self.has_gate and self.dense_phase:  # EvoMoE's dense-to-sparse gate, while it lasts
            gumbel_TE = None
            if self.training:
                noise = TokenNoise.local(x.shape[0], x.device) if noise is None else noise
                gumbel_TE = self.gumbel_draws(noise, logits_TE.shape[-1])
            ids_TE, weights_TE, active_TE = dense_select(cfg, logits_TE, self.gate_tau, gumbel_TE)
            return RouterOutput(ids_TE, weights_TE, logits_TE, probs_TE, active_TE)
        if cfg.top_p is None:
            topk_ids_TK = _stable_topk_indices(choice_TE, cfg.top_k)
            k = cfg.top_k if cfg.top_k_schedule_steps is None else self.scheduled_k()
            if k < cfg.top_k:  # SMoE-Dropout's schedule: the first k slots carry routes
                active_TK = torch.arange(cfg.top_k, device=x.device) < k
                active_TK = active_TK.expand_as(topk_ids_TK)
        else:
            order_TE = _stable_topk_indices(choice_TE, choice_TE.shape[-1])
            topk_ids_TK, active_TK = top_p_select(cfg, order_TE, probs_TE)
        weights_TK = combine_weights(cfg, scores_TE.gather(-1, topk_ids_TK), topk_ids_TK, active_TK)
        return RouterOutput(topk_ids_TK, weights_TK, logits_TE, probs_TE, active_TK)

    def jitter_draws(self, noise: TokenNoise, width: int) -> Tensor:
        """The jitter's [T, width] uniforms. Eager under ``train.compile``: the key's hash
        prefix is Python-int math on the step number, which a traced draw would guard on (a
        recompilation every step)."""
        return noise.uniform(noise_streams.JITTER, width)

    def gumbel_draws(self, noise: TokenNoise, width: int) -> Tensor:
        """The dense gate's [T, width] Gumbel noise; eager under ``train.compile`` as
        :meth:`jitter_draws` is."""
        return gumbel(noise, width)

    def scheduled_k(self) -> int:
        """The top-k schedule's k at ``self.step``. Eager under ``train.compile``: a traced step
        number would be a guard (a recompilation per step; k itself changes a few times)."""
        return scheduled_top_k(self.cfg, self.step)

    def _scores(self, logits_TE: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.logit_norm_scale is not None:
            # Skywork-MoE gating-logit normalization: standardize each token's logits, rescale.
            mean = logits_TE.mean(-1, keepdim=True)
            std = logits_TE.std(-1, keepdim=True)
            logits_TE = cfg.logit_norm_scale * (logits_TE - mean) / (std + 1e-6)
        if cfg.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def _probs(self, scores_TE: Tensor) -> Tensor:
        # Aux losses need a distribution over experts: sigmoid scores are normalized per token
        # (as DeepSeek-V3's sequence-wise balance loss does).
        if self.cfg.score_func == "sigmoid":
            return scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        return scores_TE

    @torch.no_grad()
    def record_load(self, topk_ids_TK: Tensor, keep_TK: Tensor | None = None) -> None:
        """Add one micro-batch's selections (the kept ones with ``keep_TK``) to this step's load
        (aux-loss-free balancing). The layer calls it in training; calling the router alone
        records nothing."""
        if self.cfg.bias_update_rate is not None:
            self.step_load_E += expert_counts(topk_ids_TK, self.cfg.num_routes, keep_TK)

    def _apply(self, fn, recurse=True):
        # .to(bf16) must not round the balancing state: 256 + 1 == 256 and 0.5 + 1e-3 == 0.5 in bf16
        fp32 = ("expert_bias_E", "step_load_E", *(("gate_tau",) if self.has_gate else ()))
        apply_keeping_fp32(self, fp32, lambda: super(TopKRouter, self)._apply(fn, recurse))
        return self

    @torch.no_grad()
    def discard_step_load(self) -> None:
        self.step_load_E.zero_()

    @torch.no_grad()
    def update_expert_bias(self, reduce_load: CountReduce | None = None) -> Tensor | None:
        """Apply ``b_i += rate * sign(mean_load - load_i)`` from this step's accumulated loads.

        Call once per optimizer step, after every micro-batch's forward. ``reduce_load`` (e.g. an
        all-reduce over data-parallel ranks) maps the local load to the global one; identity in
        one process. Returns the load used (or None when aux-loss-free balancing is off).
        """
        if self.cfg.bias_update_rate is None:
            return None
        load_E = self.step_load_E.clone()
        if reduce_load is not None:
            load_E = reduce_load(load_E)
        self.expert_bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.step_load_E.zero_()
        return load_E


def mask_to_top_groups(
    scores_TE: Tensor, num_groups: int, topk_groups: int, best: int | None = None
) -> Tensor:
    """Keep the experts of each token's best ``topk_groups`` groups; others get -inf.

    A group's score is the sum of its ``best`` best expert scores (default: two, or one when a
    group has a single expert, as in DeepSeek-V3's group-limited routing). Ties between groups
    go to the lower group index.
    """
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, num_groups, E // num_groups)
    best = min(2, E // num_groups) if best is None else best
    group_score_TG = grouped_TGe.topk(best, dim=-1).values.sum(-1)
    top_groups_TM = _stable_topk_indices(group_score_TG, topk_groups)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TM, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(T, E)
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


def _stable_topk_indices(x: Tensor, k: int) -> Tensor:
    # torch.topk does not promise which of equal values wins; a stable descending sort does.
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
