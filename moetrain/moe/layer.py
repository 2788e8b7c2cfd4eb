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
from typing import Protocol

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
from moetrain.moe.router import Router, RouterOutput
from moetrain.moe.router_registry import build_router
from moetrain.moe.shared_experts import SharedExperts
from moetrain.moe.step_state import RoutingStep
from moetrain.phases import phase


@dataclass
class MoEStats:
    """One call's statistics. ``tokens_per_expert_E`` counts assignments before dropping;
    ``drops_by_position_S`` is None for flat ``[T, D]`` input; ``capacity`` None when dropless;
    ``router_entropy`` is the mean per-token entropy of the router probabilities."""

    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert_E: Tensor
    num_dropped: Tensor
    num_assignments: int
    capacity: int | None
    drops_by_position_S: Tensor | None
    router_entropy: Tensor  # mean over tokens of -sum_e p log p (nats); 0 without learned scores


def router_entropy(probs_TE: Tensor | None) -> Tensor:
    """Mean per-token entropy of the router distribution (nats), detached; ln(E) is uniform."""
    if probs_TE is None:
        return torch.zeros(())
    p = probs_TE.detach()
    return -(p * p.clamp(min=1e-20).log()).sum(-1).mean()


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
    eager_under_compile = ("_log_stats",)

    def __init__(self, cfg: MoEConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.aux_coeff = cfg.aux_coeff_for_layer(layer_idx)
        self.router: Router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
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

    def start_step(self, step: int) -> None:
        """Begin optimizer step ``step`` (0-based), or an evaluation after ``step`` steps: the
        routing noise is keyed by it, and the global aux-loss scope's running counts restart."""
        self.routing_step.start(step)

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

    def _route(self, x: Tensor, token_ids: Tensor | None, call: int) -> RouterOutput:
        """The router on the whole (gathered) micro-batch ``x``; a router that draws noise gets
        this call's counter-keyed draws."""
        x_TD = x.reshape(-1, self.cfg.dim)
        with phase("moe/router"):  # named ranges: profiler traces, moetrain.phases timing
            if not self.router.draws_noise:
                return self.router(x_TD, token_ids)
            noise = self.routing_step.noise(call, self.training, self.layer_idx or 0, x)
            return self.router(x_TD, token_ids, noise=noise)

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
        routed = self._route(x, token_ids, call)
        record = self.training and not recompute
        keep_TK, capacity = self._apply_capacity(routed)
        if record:  # aux-loss-free balancing counts assignments, or kept ones (bias_load)
            ids = routed.topk_ids_TK
            kept_only = keep_TK is not None and cfg.bias_load == "kept"
            if kept_only:
                self.router.record_load(ids, keep_TK)
            else:
                self.router.record_load(ids)
        lb_loss, zl = self._aux_losses(routed, seq_len, call, recompute)
        routing = Routing(
            routed.topk_ids_TK,
            routed.topk_weights_TK,
            keep_TK,
            capacity if cfg.pad_to_capacity else None,
        )
        out_shape = x.shape
        x_local_TD = x_TD
        if sp is not None and sp.split_tokens:
            # experts not tensor-parallel: this rank dispatches its sequence chunk only
            idx = sp.local_tokens(x.shape[0], x.shape[1], x.device)
            x_local_TD = x_TD[idx]
            routing = Routing(
                routing.topk_ids_TK[idx],
                routing.topk_weights_TK[idx],
                None if keep_TK is None else keep_TK[idx],
                routing.pad_to_capacity,
            )
            out_shape = torch.Size((x.shape[0], idx.numel() // x.shape[0], cfg.dim))
        with phase("moe/dispatcher"):
            routed_TD, shared_TD = self.dispatcher.run(
                x_local_TD, routing, self.experts, self._shared_fn(x)
            )
        y = routed_TD.view(out_shape)
        if sp is not None:
            y = sp.scatter(y)  # partial sums over F (expert TP) -> this rank's sequence chunk
        if shared_TD is not None:
            y = y + shared_TD.view(y.shape)
        scale = self.aux_loss_scale * (sp.aux_grad_scale if sp is not None else 1.0)
        y = attach_aux_loss(y, lb_loss + zl, scale)
        if record or not self.training:
            self._log_stats(routed, keep_TK, capacity, lb_loss, zl, seq_len, record)
        return y if sp is not None else y.view(x.shape)

    def _log_stats(
        self,
        routed: RouterOutput,
        keep_TK: Tensor | None,
        capacity: int | None,
        lb_loss: Tensor,
        zl: Tensor,
        seq_len: int | None,
        record: bool,
    ) -> None:
        """This call's statistics into ``last_stats`` and, for a recorded training call, onto
        ``stats_log`` (eager under torch.compile: a traced list append guards on its length and
        recompiles every micro-batch)."""
        ids = routed.topk_ids_TK
        if keep_TK is None:
            num_dropped = torch.zeros((), dtype=torch.long, device=ids.device)
            by_pos = None
        else:
            num_dropped = (~keep_TK).sum()
            by_pos = drops_by_position(keep_TK, seq_len) if seq_len is not None else None
        self.last_stats = MoEStats(
            aux_loss=lb_loss.detach(),
            z_loss=zl.detach(),
            tokens_per_expert_E=expert_counts(ids.detach(), self.cfg.num_experts),
            num_dropped=num_dropped,
            num_assignments=ids.numel(),
            capacity=capacity,
            drops_by_position_S=by_pos,
            router_entropy=router_entropy(routed.probs_TE),
        )
        if record and self.stats_log is not None:
            self.stats_log.append(self.last_stats)

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

    def _apply_capacity(self, routed: RouterOutput) -> tuple[Tensor | None, int | None]:
        cfg = self.cfg
        if cfg.capacity_factor is None:
            return None, None
        T = routed.topk_ids_TK.shape[0]
        C = expert_capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.min_capacity)
        keep_TK = capacity_keep_mask(
            routed.topk_ids_TK, routed.topk_weights_TK, cfg.num_experts, C, cfg.drop_policy
        )
        return keep_TK, C

    def _aux_losses(
        self, routed: RouterOutput, seq_len: int | None, call: int, recompute: bool
    ) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        zero = routed.topk_weights_TK.new_zeros(())
        lb_loss = zl = zero
        if routed.probs_TE is None or routed.logits_TE is None:
            return lb_loss, zl
        if self.aux_coeff > 0:
            counts_E = None
            if cfg.aux_loss_scope == "global":
                counts_E = self.routing_step.global_counts(
                    expert_counts(routed.topk_ids_TK.detach(), cfg.num_experts),
                    call,
                    self.training,
                    recompute,
                    self.reduce_global_counts,
                )
            lb_loss = load_balancing_loss(
                routed.probs_TE,
                routed.topk_ids_TK,
                self.aux_coeff,
                scope=cfg.aux_loss_scope,
                seq_len=seq_len,
                counts_E=counts_E,
            )
        if cfg.z_loss_coeff > 0:
            zl = z_loss(routed.logits_TE, cfg.z_loss_coeff)
        return lb_loss, zl

    @torch.no_grad()
    def update_expert_bias(self, reduce_load: CountReduce | None = None) -> Tensor | None:
        """Aux-loss-free balancing: once per optimizer step (see ``Router.update_expert_bias``)."""
        return self.router.update_expert_bias(reduce_load)

    def discard_step(self) -> None:
        """A skipped optimizer step: drop what the router recorded for it."""
        self.router.discard_step_load()
