"""The router interface: what every MoE router returns and which hooks the layer calls on it.

Legend: T tokens, D model dim, E experts, K top-k.

A router maps ``x_TD`` (and, for routers that need them, the token ids) to K expert ids and K
combine weights per token. The learned router is :class:`moetrain.moe.topk_router.TopKRouter`;
``random`` and ``hash`` are ablation baselines (:mod:`moetrain.moe.baseline_routers`). The layer
builds its router from ``model.moe.router_type`` through :mod:`moetrain.moe.router_registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from moetrain.moe.aux_losses import CountReduce
from moetrain.moe.noise import TokenNoise

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


@dataclass
class RouterOutput:
    """What a router decides for T tokens.

    ``topk_ids_TK`` int64 expert ids; ``topk_weights_TK`` fp32 combine weights (differentiable);
    ``logits_TE`` fp32 raw router logits and ``probs_TE`` fp32 per-expert probabilities (each row
    sums to 1) for the aux losses — both None for routers without learned scores.
    ``active_TK`` marks the slots that carry a route (None: every slot does): routes of varying
    width (top-p, expert-choice) leave the rest inactive, with weight 0
    (:mod:`moetrain.moe.routes`). With null or zero-computation experts, ids and E cover every
    route (FFN experts first).
    """

    topk_ids_TK: Tensor
    topk_weights_TK: Tensor
    logits_TE: Tensor | None = None
    probs_TE: Tensor | None = None
    active_TK: Tensor | None = None


def apply_keeping_fp32(module: nn.Module, names: tuple[str, ...], apply: Callable[[], Any]) -> None:
    """Run ``apply()`` (``nn.Module._apply``: a cast or a move) without rounding the fp32
    buffers ``names``: a cast to bf16 would round 0.01 to 0.010009765625 and lose the small
    increments they accumulate, so they keep their fp32 values, moved where the cast put them."""
    before = {name: module.get_buffer(name) for name in names}
    apply()
    for name, old in before.items():
        new = module.get_buffer(name)
        if new.dtype == torch.float32:
            continue
        if old.is_meta or new.is_meta:  # no values to keep (meta construction, to_empty)
            setattr(module, name, new.float())
        else:
            setattr(module, name, old.to(device=new.device, dtype=torch.float32))


class Router(nn.Module, ABC):
    """Base class of every MoE router.

    A subclass is built as ``cls(cfg)`` from the layer's :class:`MoEConfig` and implements
    :meth:`forward`; the hooks below default to no-ops for routers without learned state.
    Checkpointed state lives in the subclass's parameters and persistent buffers.

    Class attributes read by config validation (defaults: a plain router):
    ``needs_token_ids`` — routes by token id (so only where the ids reach the layer, e.g. not on
    later pipeline stages); ``uses_expert_bias`` — supports ``bias_update_rate`` (aux-loss-free
    balancing); ``supports_groups`` — supports group-limited routing (``num_groups > 1``);
    ``draws_noise`` — stochastic: the layer passes ``noise=`` to :meth:`forward` (routers
    without it may keep the two-argument signature; an instance may set it from its config, so
    routers that draw only under some options build no noise keys otherwise); ``uses_step`` —
    routing schedules: the layer calls the router's ``set_step(step)`` with the optimizer step
    at each ``start_step`` (an instance flag too);
    ``eager_under_compile`` — names of methods that must run eagerly inside a compiled block
    (``train.compile`` wraps them in ``torch.compiler.disable``), e.g. host-side work whose
    Python values would otherwise become guards, recompiled on every change.
    """

    needs_token_ids: ClassVar[bool] = False
    eager_under_compile: ClassVar[tuple[str, ...]] = ()
    draws_noise: bool = False
    uses_step: bool = False
    uses_expert_bias: ClassVar[bool] = False
    supports_groups: ClassVar[bool] = False

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @abstractmethod
    def forward(
        self, x_TD: Tensor, token_ids_T: Tensor | None = None, noise: TokenNoise | None = None
    ) -> RouterOutput:
        """Route T tokens: K distinct expert ids per token and their combine weights.

        ``token_ids_T`` (any shape with T entries) is None where the caller has no token ids;
        a router that needs them raises ``ValueError``. ``noise`` gives the counter-keyed draws
        of these tokens (:mod:`moetrain.moe.noise`; the layer passes the step's key); a
        stochastic router must draw only from it, never from torch's RNG, so that every layout
        draws the same noise for the same token. None: ``TokenNoise.local`` (seed 0, step 0,
        positions 0..T-1). Calling the router records nothing.
        """

    def reset_parameters(self, std: float = 0.02) -> None:
        """(Re)initialize learned weights with normal(0, ``std``) and clear balancing state.
        The layer calls it from its own ``reset_parameters``."""

    def record_load(self, topk_ids_TK: Tensor, keep_TK: Tensor | None = None) -> None:
        """Count one call's selections toward this optimizer step's expert load. The layer calls
        it on every training call that is not an activation-checkpointing recomputation; with
        ``model.moe.bias_load=kept`` and a capacity factor, or with slots that may carry no route
        (top-p, the top-k schedule), it also passes ``keep_TK``, the selections to count, so a
        router used with those options must accept it (otherwise it is called with the ids
        alone)."""

    def update_expert_bias(self, reduce_load: CountReduce | None = None) -> Tensor | None:
        """Once per optimizer step, after every micro-batch's forward: update balancing state
        from the recorded load (``reduce_load`` maps the local load to the global one, e.g. an
        all-reduce over data-parallel ranks) and clear it. Returns the load used, or None when
        the router does no such balancing."""
        return None

    def discard_step_load(self) -> None:
        """Forget the load recorded during this optimizer step without using it (the step was
        skipped, e.g. for a non-finite loss)."""

    def learned_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that make the routing decision. The optimizer keeps them out of
        weight decay (decay pulls the logits toward uniform, against the balance the aux
        losses set). Default: all of this module's parameters."""
        return self.parameters()
