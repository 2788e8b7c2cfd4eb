"""MoELayer: router -> capacity -> aux losses -> dispatch -> experts -> combine (+ shared).

Legend: B sequences, S sequence length, T tokens (= B*S), D model dim, E experts, K top-k,
C capacity, R expert rows.

``layer(x, token_ids=None)`` takes ``[..., D]`` (``[T, D]`` or ``[B, S, D]``) and returns the same
shape. Aux losses are attached to the output through autograd; after each call
``layer.last_stats`` holds this call's loss values and routing statistics (detached tensors: read
them when you log, which is when the host syncs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moetrain.moe.aux_losses import (
    CountReduce,
    attach_aux_loss,
    expert_counts,
    load_balancing_loss,
    z_loss,
)
from moetrain.moe.capacity import capacity_keep_mask, drops_by_position, expert_capacity
from moetrain.moe.config import MoEConfig
from moetrain.moe.dispatcher import Dispatcher, Routing, TokenDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.policies import AdaptiveAuxCoefficient
from moetrain.moe.rectify import rectify
from moetrain.moe.router import Router, RouterOutput
from moetrain.moe.router_registry import build_router
from moetrain.moe.routes import (
    LogitChain,
    ZeroComputeExperts,
    balance_terms,
    expert_choice_select,
    ffn_slots,
    kind_counts,
    warn_non_causal,
)
from moetrain.moe.shared_experts import SharedExperts
from moetrain.moe.step_state import RoutingStep
from moetrain.phases import phase


@dataclass
class MoEStats:
    """One call's statistics. ``tokens_per_expert_E`` counts assignments before dropping;
    ``drops_by_position_S`` is None for flat ``[T, D]`` input; ``capacity`` None when dropless;
    ``router_entropy`` is the mean per-token entropy of the router probabilities.
    ``num_assignments`` counts the FFN assignments before dropping (a tensor when routes vary);
    ``route_counts`` the active slots per kind of route (``moetrain.moe.routes.KINDS``: ffn,
    null, zero, copy, constant) and ``unrouted_tokens`` the tokens no FFN expert computes
    (after dropping)."""

    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert_E: Tensor
    num_dropped: Tensor
    num_assignments: int | Tensor
    capacity: int | None
    drops_by_position_S: Tensor | None
    router_entropy: Tensor  # mean over tokens of -sum_e p log p (nats); 0 without learned scores
    num_tokens: int = 0
    route_counts: Tensor | None = None
    unrouted_tokens: Tensor | None = None


def router_entropy(probs_TE: Tensor | None) -> Tensor:
    """Mean per-token entropy of the router distribution (nats), detached; ln(E) is uniform."""
    if probs_TE is None:
        return torch.zeros(())
    return token_entropy(probs_TE.detach())


def token_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of ``-sum_e p log p`` (nats), differentiable."""
    return -(probs_TE * probs_TE.clamp(min=1e-20).log()).sum(-1).mean()


@dataclass
class RoutePlan:
    """A call's routing after capacity, for the statistics: ``dropped_TK`` the FFN slots
    capacity dropped (None: dropless), ``ffn_TK`` the active FFN slots (None: every slot),
    ``capacity`` C (rows per expert for expert-choice; None: dropless)."""

    dropped_TK: Tensor | None
    ffn_TK: Tensor | None
    capacity: int | None


class SequenceParallel(Protocol):
    """How a tensor-parallel layout feeds the layer (``moetrain.parallel.tp`` implements it).

    The layer routes the *whole* micro-batch on every tensor-parallel rank (so routing, aux
    losses and capacity equal the single-process layer's), then either dispatches only this
    rank's sequence chunk (``split_tokens``, experts not tensor-parallel) or all tokens with
    experts split on F (partial outputs, summed by ``scatter``).
    """

    split_tokens: bool
    aux_grad_scale: float  # each TP rank backpropagates the full aux loss; grads are summed

    def gather(self, x: Tensor) -> Tensor: ...  # local sequence chunk -> whole micro-batch

    def local_tokens(self, batch: int, seq_len: int, device: torch.device) -> Tensor: ...

    def local_chunk(self, x_BSD: Tensor) -> Tensor: ...  # whole micro-batch -> this rank's chunk

    def scatter(self, y_BSD: Tensor) -> Tensor: ...  # routed output -> this rank's chunk


def recomputing() -> bool:
    """True while autograd runs a forward again inside backward (activation checkpointing):
    statistics and balancing loads are recorded by the original forward only."""
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Args:
        cfg: the layer's options (validated on construction).
        layer_idx: index of this layer among the model's MoE layers (selects its entry of
            ``cfg.aux_loss_coeff_per_layer``).

    Attributes set from outside: ``dispatcher`` (expert-parallel dispatchers replace the local
    one; the layer calls its ``run`` with the experts and the shared experts),
    ``reduce_global_counts`` (sums expert counts over data-parallel ranks for the global
    aux-loss scope; None = this process only), ``routing_step`` (the step's call numbering,
    noise keys and global-scope running counts: :class:`moetrain.moe.step_state.RoutingStep`;
    call :meth:`start_step` before each optimizer step), ``aux_loss_scale`` (gradient scale of
    the aux losses, e.g. 1/number of accumulation micro-batches), ``sequence_parallel`` (tensor
    parallelism, see :class:`SequenceParallel`).

    When ``stats_log`` is a list (the trainer sets one and drains it once per step), every
    training call also appends its statistics to it; a recomputation under activation
    checkpointing appends nothing.
    """

    # methods train.compile keeps eager (moetrain.parallel.compile): host-side bookkeeping
    eager_under_compile = ("_log_stats", "_previous_logits")

    def __init__(self, cfg: MoEConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.aux_coeff = cfg.aux_coeff_for_layer(layer_idx)
        # Skywork-MoE's adaptive coefficient starts from the static one (moetrain.moe.policies)
        self.adaptive_aux: AdaptiveAuxCoefficient | None = None
        if cfg.adaptive_aux_smoothing is not None:
            self.adaptive_aux = AdaptiveAuxCoefficient(cfg, self.aux_coeff)
        self.router: Router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        zc = cfg.num_copy_experts + cfg.num_constant_experts
        self.zero_compute = ZeroComputeExperts(cfg) if zc else None
        # MoE++ gating residual: every MoE layer but the first adds the previous one's logits
        self.logit_chain: LogitChain | None = None  # the model sets one shared chain
        self._residual_inputs: list[Tensor | None] = []  # per training call, for recomputation
        # set with activation checkpointing (TransformerBlock): a recomputation will run again
        self.recomputed_in_backward = False
        if cfg.gating_residual and layer_idx:
            self.router.enable_gating_residual()  # type: ignore[operator]
        if cfg.expert_choice is not None and not layer_idx:
            warn_non_causal(cfg)
        self.dispatcher: Dispatcher = TokenDispatcher(cfg.num_experts)
        self.reduce_global_counts: CountReduce | None = None
        self.routing_step = RoutingStep()
        self.aux_loss_scale = 1.0
        self.sequence_parallel: SequenceParallel | None = None
        self.last_stats: MoEStats | None = None
        self.stats_log: list[MoEStats] | None = None  # a list: collect every training call
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        self.router.reset_parameters(std=std)
        self.experts.reset_parameters(std=std, out_std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(std=std, out_std=out_std)
        if self.zero_compute is not None:
            self.zero_compute.reset_parameters(std=std)
        if self.adaptive_aux is not None:
            self.adaptive_aux.reset_parameters()

    def start_step(self, step: int) -> None:
        """Begin optimizer step ``step`` (0-based), or an evaluation after ``step`` steps: the
        routing noise is keyed by it, and the global aux-loss scope's running counts restart."""
        self.routing_step.start(step)
        self._residual_inputs = []
        if self.router.uses_step:  # the routing schedules (moetrain.moe.policies)
            self.router.set_step(step)  # type: ignore[operator]

    def _check_input(self, x: Tensor) -> None:
        dim = self.cfg.dim
        if x.shape[-1] != dim:
            raise ValueError(f"MoELayer expects [..., {dim}] (model.moe.dim), got {tuple(x.shape)}")
        weight_dtype = self.experts.w1_EFD.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoELayer got {x.dtype} input but its weights are {weight_dtype}: cast the "
                "layer (layer.to(dtype)) or run under torch.autocast"
            )

    def _route(
        self, x: Tensor, token_ids: Tensor | None, call: int, recompute: bool
    ) -> RouterOutput:
        """The router on the whole (gathered) micro-batch ``x``; a router that draws noise gets
        this call's counter-keyed draws, one with a gating residual the previous MoE layer's
        logits."""
        x_TD = x.reshape(-1, self.cfg.dim)
        kwargs: dict[str, Any] = {}
        if self.cfg.gating_residual:
            kwargs["previous_logits_TE"] = self._previous_logits(call, recompute)
        with phase("moe/router"):  # named ranges: profiler traces, moetrain.phases timing
            if self.router.draws_noise:
                kwargs["noise"] = self.routing_step.noise(
                    call, self.training, self.layer_idx or 0, x
                )
            routed = self.router(x_TD, token_ids, **kwargs)
        if self.logit_chain is not None and not recompute:
            self.logit_chain.latest = routed.logits_TE
        return routed

    def _previous_logits(self, call: int, recompute: bool) -> Tensor | None:
        """The previous MoE layer's logits for this call (gating residual): from the chain, or,
        recomputing under activation checkpointing, the ones the original forward used (kept
        only where a recomputation will ask for them, and released once it has)."""
        if not self.layer_idx or self.logit_chain is None:
            return None
        if recompute:
            previous, self._residual_inputs[call] = self._residual_inputs[call], None
            return previous
        previous = self.logit_chain.latest
        if self.training and self.recomputed_in_backward and torch.is_grad_enabled():
            self._residual_inputs.append(previous)
        return previous

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        self._check_input(x)
        sp = self.sequence_parallel
        if sp is not None:
            if x.dim() != 3:
                raise ValueError("tensor-parallel MoE layers take [B, S, D] input")
            x = sp.gather(x)
        seq_len = x.shape[-2] if x.dim() == 3 else None
        x_TD = x.reshape(-1, cfg.dim)
        recompute = recomputing()
        call = self.routing_step.next_call(self.training, recompute)
        routed = self._route(x, token_ids, call, recompute)
        record = self.training and not recompute
        routing, plan = self._plan(routed, seq_len)
        if record:  # aux-loss-free balancing counts assignments, or kept ones (bias_load)
            ids, counted = routed.topk_ids_TK, routed.active_TK  # the slots that carry a route
            if plan.dropped_TK is not None and cfg.bias_load == "kept":
                kept = ~plan.dropped_TK
                counted = kept if counted is None else counted & kept
            if counted is None:  # a router's record_load may take the ids alone
                self.router.record_load(ids)
            else:
                self.router.record_load(ids, counted)
            if self.adaptive_aux is not None:  # the step's load, before dropping
                self.adaptive_aux.record(self._ffn_counts(ids, plan.ffn_TK))
        lb_loss, zl = self._aux_losses(routed, seq_len, call, recompute)
        out_shape = x.shape
        x_local_TD, local_idx = x_TD, None
        if sp is not None and (sp.split_tokens or self.zero_compute is not None):
            local_idx = sp.local_tokens(x.shape[0], x.shape[1], x.device)
        if sp is not None and sp.split_tokens and local_idx is not None:
            # experts not tensor-parallel: this rank dispatches its sequence chunk only
            x_local_TD = x_TD[local_idx]
            routing = Routing(
                routing.topk_ids_TK[local_idx],
                routing.topk_weights_TK[local_idx],
                None if routing.keep_TK is None else routing.keep_TK[local_idx],
                # expert-choice's rows are exact for the whole micro-batch: on a chunk, padding
                # to them would compute tp times the rows
                None if cfg.expert_choice is not None else routing.pad_to_capacity,
            )
            out_shape = torch.Size((x.shape[0], local_idx.numel() // x.shape[0], cfg.dim))
        with phase("moe/dispatcher"):
            routed_TD, shared_TD = self.dispatcher.run(
                x_local_TD, routing, self.experts, self._shared_fn(x)
            )
        y = routed_TD.view(out_shape)
        if sp is not None:
            y = sp.scatter(y)  # partial sums over F (expert TP) -> this rank's sequence chunk
        if self.zero_compute is not None:  # copy/constant experts: on this rank, no exchange
            y = y + self._zero_compute(x_TD, routed, local_idx).view(y.shape)
        if shared_TD is not None:
            y = y + shared_TD.view(y.shape)
        scale = self.aux_loss_scale * (sp.aux_grad_scale if sp is not None else 1.0)
        y = attach_aux_loss(y, lb_loss + zl, scale)
        if record or not self.training:
            self._log_stats(routed, plan, lb_loss, zl, seq_len, record)
        return y if sp is not None else y.view(x.shape)

    def _zero_compute(self, x_TD: Tensor, routed: RouterOutput, idx: Tensor | None) -> Tensor:
        assert self.zero_compute is not None
        ids, weights = routed.topk_ids_TK, routed.topk_weights_TK
        if idx is not None:  # tensor parallel: this rank's sequence chunk
            x_TD, ids, weights = x_TD[idx], ids[idx], weights[idx]
        return self.zero_compute(x_TD, ids, weights)

    def _log_stats(
        self,
        routed: RouterOutput,
        plan: RoutePlan,
        lb_loss: Tensor,
        zl: Tensor,
        seq_len: int | None,
        record: bool,
    ) -> None:
        """This call's statistics into ``last_stats`` and, for a recorded training call, onto
        ``stats_log`` (eager under torch.compile: a traced list append guards on its length and
        recompiles every micro-batch)."""
        cfg = self.cfg
        ids = routed.topk_ids_TK.detach()
        dropped_TK, ffn_TK = plan.dropped_TK, plan.ffn_TK
        if dropped_TK is None:
            num_dropped = torch.zeros((), dtype=torch.long, device=ids.device)
            by_pos = None
        else:
            num_dropped = dropped_TK.sum()
            by_pos = drops_by_position(~dropped_TK, seq_len) if seq_len is not None else None
        counts_E = self._ffn_counts(ids, ffn_TK)
        if ffn_TK is None:
            num_assignments: int | Tensor = ids.numel()
            unrouted = None if dropped_TK is None else (~dropped_TK).sum(-1).eq(0).sum()
        else:
            num_assignments = ffn_TK.sum()
            sent_TK = ffn_TK if dropped_TK is None else ffn_TK & ~dropped_TK
            unrouted = sent_TK.sum(-1).eq(0).sum()
        self.last_stats = MoEStats(
            aux_loss=lb_loss.detach(),
            z_loss=zl.detach(),
            tokens_per_expert_E=counts_E,
            num_dropped=num_dropped,
            num_assignments=num_assignments,
            capacity=plan.capacity,
            drops_by_position_S=by_pos,
            router_entropy=router_entropy(routed.probs_TE),
            num_tokens=ids.shape[0],
            route_counts=kind_counts(cfg, ids, routed.active_TK),
            unrouted_tokens=unrouted,
        )
        if record and self.stats_log is not None:
            self.stats_log.append(self.last_stats)

    def _ffn_counts(self, ids_TK: Tensor, ffn_TK: Tensor | None) -> Tensor:
        """Assignments per FFN expert (``ffn_TK``: the slots that go to one; None: all)."""
        E = self.cfg.num_experts
        if ffn_TK is None:
            return expert_counts(ids_TK.detach(), E)
        return expert_counts(ids_TK.detach().clamp(max=E), E + 1, ffn_TK)[:E]

    def _shared_fn(self, x: Tensor) -> Callable[[], Tensor] | None:
        """The shared experts on this rank's tokens, for the dispatcher to run where they hide
        its communication (the all-to-all dispatcher: while the first exchanges are in flight)."""
        shared = self.shared_experts
        if shared is None:
            return None
        sp = self.sequence_parallel

        def run() -> Tensor:
            shared_in = x if sp is None else sp.local_chunk(x)
            return shared(shared_in.reshape(-1, self.cfg.dim))

        return run

    def _plan(self, routed: RouterOutput, seq_len: int | None) -> tuple[Routing, RoutePlan]:
        """What the dispatcher gets: the FFN slots that survive capacity (null and
        zero-computation slots and inactive ones are masked out of ``keep_TK``, so they are never
        sent), and the plan the statistics read."""
        cfg = self.cfg
        ids_TK, weights_TK = routed.topk_ids_TK, routed.topk_weights_TK
        if cfg.expert_choice is not None:
            return self._expert_choice(routed, seq_len)
        ffn_TK = ffn_slots(cfg, ids_TK, routed.active_TK)
        dropped_TK, C = None, None
        keep_TK = ffn_TK
        if cfg.capacity_factor is not None:
            T, E = ids_TK.shape[0], cfg.num_experts
            k = cfg.top_k  # the top-k schedule's k while it runs
            if cfg.top_k_schedule_steps is not None:
                k = self.router.scheduled_k()  # type: ignore[operator]
            C = expert_capacity(T, E, k, cfg.capacity_factor, cfg.min_capacity)
            if ffn_TK is None:
                keep_TK = capacity_keep_mask(ids_TK, weights_TK, E, C, cfg.drop_policy)
                dropped_TK = ~keep_TK
            else:  # non-FFN slots go to a spare bin E that no capacity limits
                spare_TK = ids_TK.masked_fill(~ffn_TK, E)
                rank_ok = capacity_keep_mask(spare_TK, weights_TK, E + 1, C, cfg.drop_policy)
                keep_TK = ffn_TK & rank_ok
                dropped_TK = ffn_TK & ~rank_ok
        if ffn_TK is not None and cfg.num_extra_experts:
            ids_TK = ids_TK.clamp(max=cfg.num_experts - 1)  # masked slots: any valid id
        if C is not None and (cfg.rectify_intra_group or cfg.rectify_fill_in):
            assert routed.probs_TE is not None and keep_TK is not None
            ids_TK, weights_TK, keep_TK, dropped_TK = rectify(
                cfg, ids_TK, weights_TK, keep_TK, routed.probs_TE, C
            )
        pad = C if cfg.pad_to_capacity else None
        return Routing(ids_TK, weights_TK, keep_TK, pad), RoutePlan(dropped_TK, ffn_TK, C)

    def _expert_choice(
        self, routed: RouterOutput, seq_len: int | None
    ) -> tuple[Routing, RoutePlan]:
        """Expert-choice routing replaces the router's top-k: every expert takes its best C
        tokens of each scope; weights are the router probabilities (times
        ``routed_scaling_factor``). Every expert gets exactly its rows: fixed shapes."""
        assert routed.probs_TE is not None
        ids_TE, active_TE, rows = expert_choice_select(self.cfg, routed.probs_TE, seq_len)
        weights_TE = routed.probs_TE * active_TE * self.cfg.routed_scaling_factor
        routed.topk_ids_TK, routed.topk_weights_TK, routed.active_TK = ids_TE, weights_TE, active_TE
        routing = Routing(ids_TE, weights_TE, active_TE, rows)
        return routing, RoutePlan(None, active_TE, rows)

    def _aux_losses(
        self, routed: RouterOutput, seq_len: int | None, call: int, recompute: bool
    ) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        zero = routed.topk_weights_TK.new_zeros(())
        lb_loss = zl = zero
        if routed.probs_TE is None or routed.logits_TE is None:
            return lb_loss, zl
        # expert-choice needs no balancing: every expert takes the same number of tokens
        balanced = self.aux_coeff > 0 or self.adaptive_aux is not None
        if balanced and cfg.expert_choice is None:
            lb_loss = self._balance_loss(routed, seq_len, call, recompute)
        if cfg.entropy_loss_coeff > 0:  # top-p's dynamic loss: sharpen the router
            lb_loss = lb_loss + cfg.entropy_loss_coeff * token_entropy(routed.probs_TE)
        if cfg.z_loss_coeff > 0:
            zl = z_loss(routed.logits_TE, cfg.z_loss_coeff)
        return lb_loss, zl

    def _balance_loss(
        self, routed: RouterOutput, seq_len: int | None, call: int, recompute: bool
    ) -> Tensor:
        cfg = self.cfg
        assert routed.probs_TE is not None
        counts_E = None
        active = routed.active_TK
        if cfg.aux_loss_scope == "global":
            counts_E = self.routing_step.global_counts(
                expert_counts(routed.topk_ids_TK.detach(), cfg.num_routes, active),
                call,
                self.training,
                recompute,
                self.reduce_global_counts,
            )
        plain = cfg.num_null_experts < 2 and cfg.zero_compute_aux_weight == 1.0
        return load_balancing_loss(
            routed.probs_TE,
            routed.topk_ids_TK,
            self.aux_coeff if self.adaptive_aux is None else self.adaptive_aux.coeff,  # type: ignore[arg-type]
            scope=cfg.aux_loss_scope,
            seq_len=seq_len,
            counts_E=counts_E,
            active_TK=active,
            **({} if plain else {"terms": partial(balance_terms, cfg)}),
        )

    @torch.no_grad()
    def update_expert_bias(self, reduce_load: CountReduce | None = None) -> Tensor | None:
        """Once per optimizer step, from the step's loads summed by ``reduce_load``: aux-loss-free
        balancing (see ``Router.update_expert_bias``; its load is returned) and the adaptive
        aux coefficient (``moetrain.moe.policies``)."""
        if self.adaptive_aux is not None:
            self.adaptive_aux.update(reduce_load)
        return self.router.update_expert_bias(reduce_load)

    def discard_step(self) -> None:
        """A skipped optimizer step: drop what the router and the adaptive coefficient recorded
        for it."""
        self.router.discard_step_load()
        if self.adaptive_aux is not None:
            self.adaptive_aux.discard()
