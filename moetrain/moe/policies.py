"""Routing research II: routing policies that change over training.

Legend: T tokens, E experts, K slots per token.

- **Dense-to-sparse gate** (EvoMoE): for the first ``dense_to_sparse_steps`` optimizer steps a
  token may go to every expert. Its gate is ``g = softmax((logits + gumbel) / tau)`` (Gumbel
  noise in training only, counter-keyed: :mod:`moetrain.moe.noise`), and it takes every expert
  with ``g >= dense_to_sparse_threshold`` (at least its ``top_k`` best). ``tau`` anneals
  geometrically from ``dense_to_sparse_temperature[0]`` to ``[1]``:
  ``tau(s) = tau0 * (tau1 / tau0) ** (s / steps)``; from step ``steps`` on the router is the
  plain top-k router. Combine weights are ``g`` over the taken experts (renormalized with
  ``norm_topk_prob``, times ``routed_scaling_factor``).
- **Top-k schedule** (SMoE-Dropout): at step ``s`` a token takes
  ``k(s) = top_k_start + (top_k - top_k_start) * s // top_k_schedule_steps`` experts (``top_k``
  from step ``top_k_schedule_steps`` on); ``freeze_router`` keeps the router at its random
  initialization, SMoE-Dropout's fixed random router. Capacity counts ``k(s)`` assignments per
  token.
- **Adaptive per-layer aux coefficients** (Skywork-MoE): each MoE layer's balance coefficient
  ``alpha`` is updated after every optimizer step from that layer's drop rate ``d`` over the
  step's tokens (all micro-batches, all data-parallel ranks):
  ``alpha <- beta * alpha + (1 - beta) * xi * d`` (``beta = adaptive_aux_smoothing``,
  ``xi = adaptive_aux_sensitivity``), starting from the static coefficient (``aux_loss_coeff``
  or the layer's ``aux_loss_coeff_per_layer`` entry). ``d`` is the fraction of the step's FFN
  assignments above a capacity of ``cf * assignments / E`` per expert (``cf`` the configured
  ``capacity_factor``, or 1.0 when dropless): the drop rate such a capacity would give, so a
  dropless layer is still measured. ``alpha`` is checkpointed.

Every schedule is a pure function of the optimizer step (which a checkpoint restores), so a
resumed run continues bit-exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import Tensor, nn

from moetrain.moe import noise as noise_streams
from moetrain.moe.aux_losses import CountReduce
from moetrain.moe.noise import TokenNoise
from moetrain.moe.router import apply_keeping_fp32
from moetrain.moe.routes import combine_weights

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.moe.{name}: {why}")


# ----------------------------------------------------------------------------- validation


def validate_policies(cfg: MoEConfig) -> None:
    """Checks of the routing-policy options (``MoEConfig.validate`` calls it)."""
    from moetrain.moe.node_routing import validate_node_routing
    from moetrain.moe.rectify import validate_rectify

    validate_rectify(cfg)
    validate_node_routing(cfg)
    _validate_dense_to_sparse(cfg)
    _validate_top_k_schedule(cfg)
    _validate_adaptive_aux(cfg)
    if cfg.freeze_router and cfg.router_type != "learned":
        _fail("freeze_router", f"needs router_type=learned, got {cfg.router_type!r}")


def _learned_top_k_only(cfg: MoEConfig, name: str) -> None:
    """``name`` schedules the learned router's top-k selection: refuse what replaces it."""
    if cfg.router_type != "learned":
        _fail(name, f"needs router_type=learned, got {cfg.router_type!r}")
    for other, bad in (
        ("top_p", cfg.top_p is not None),
        ("expert_choice", cfg.expert_choice is not None),
        ("num_null_experts", cfg.num_extra_experts > 0),
    ):
        if bad:
            _fail(name, f"does not combine with {other} (it replaces the top-k selection)")


def _validate_dense_to_sparse(cfg: MoEConfig) -> None:
    steps = cfg.dense_to_sparse_steps
    if steps is None:
        return
    if not isinstance(steps, int) or steps < 1:
        _fail("dense_to_sparse_steps", f"must be a positive integer or null, got {steps!r}")
    temps = list(cfg.dense_to_sparse_temperature)
    if len(temps) != 2 or not all(t > 0 and math.isfinite(t) for t in temps):
        _fail("dense_to_sparse_temperature", f"must be [start, end], both > 0; got {temps}")
    if not 0 < cfg.dense_to_sparse_threshold < 1:
        threshold = cfg.dense_to_sparse_threshold
        _fail("dense_to_sparse_threshold", f"must be in (0, 1), got {threshold}")
    _learned_top_k_only(cfg, "dense_to_sparse_steps")
    for other, bad in (
        ("capacity_factor", cfg.capacity_factor is not None),
        ("top_k_schedule_steps", cfg.top_k_schedule_steps is not None),
        ("num_groups", cfg.num_groups > 1),
        ("bias_update_rate", cfg.bias_update_rate is not None),
    ):
        if bad:
            _fail(
                "dense_to_sparse_steps",
                f"does not combine with {other} (the dense phase may route a token to every "
                "expert); set one of them",
            )


def _validate_top_k_schedule(cfg: MoEConfig) -> None:
    steps = cfg.top_k_schedule_steps
    if not 1 <= cfg.top_k_start <= cfg.top_k:
        _fail("top_k_start", f"must lie in [1, top_k={cfg.top_k}], got {cfg.top_k_start}")
    if steps is None:
        return
    if not isinstance(steps, int) or steps < 1:
        _fail("top_k_schedule_steps", f"must be a positive integer or null, got {steps!r}")
    _learned_top_k_only(cfg, "top_k_schedule_steps")


def _validate_adaptive_aux(cfg: MoEConfig) -> None:
    beta = cfg.adaptive_aux_smoothing
    if not cfg.adaptive_aux_sensitivity >= 0:
        _fail("adaptive_aux_sensitivity", f"must be >= 0, got {cfg.adaptive_aux_sensitivity}")
    if beta is None:
        return
    if not 0 <= beta < 1:
        _fail("adaptive_aux_smoothing", f"must be in [0, 1) or null (static), got {beta}")
    if cfg.router_type != "learned":
        _fail("adaptive_aux_smoothing", f"needs router_type=learned, got {cfg.router_type!r}")
    if cfg.expert_choice is not None:
        _fail("adaptive_aux_smoothing", "expert_choice has no balance loss to adapt")


# ------------------------------------------------------------------------------ schedules


def scheduled_top_k(cfg: MoEConfig, step: int) -> int:
    """Experts per token at optimizer step ``step`` (the top-k schedule; ``top_k`` without)."""
    n = cfg.top_k_schedule_steps
    if n is None or step >= n:
        return cfg.top_k
    return cfg.top_k_start + (cfg.top_k - cfg.top_k_start) * step // n


def dense_temperature(cfg: MoEConfig, step: int) -> float | None:
    """The dense-to-sparse gate's temperature at ``step``; None once the gate is sparse."""
    n = cfg.dense_to_sparse_steps
    if n is None or step >= n:
        return None
    t0, t1 = (float(t) for t in cfg.dense_to_sparse_temperature)
    return t0 * (t1 / t0) ** (step / n)


def gumbel(noise: TokenNoise, width: int) -> Tensor:
    """[T, width] standard Gumbel draws ``-log(-log(u))`` from the counter-keyed uniforms
    (k / 2**24, k < 2**24: at most 1 - 2**-24, so finite; 0 is moved to half a step)."""
    u = noise.uniform(noise_streams.DENSE_GATE, width).clamp(min=2.0**-25)
    return -torch.log(-torch.log(u))


def dense_select(
    cfg: MoEConfig, logits_TE: Tensor, temperature: Tensor, gumbel_TE: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The dense-to-sparse gate: ``(ids_TE, weights_TE, active_TE)``, slot j of a token its
    j-th best expert by gate value, active when the gate value reaches the threshold or j <
    top_k. ``temperature`` is a 0-dim tensor (under ``train.compile`` no step value is traced)."""
    z_TE = logits_TE if gumbel_TE is None else logits_TE + gumbel_TE
    g_TE = torch.softmax(z_TE / temperature, dim=-1)
    ids_TE = torch.sort(g_TE.detach(), dim=-1, descending=True, stable=True).indices
    g_sorted = g_TE.gather(-1, ids_TE)
    first_k = torch.arange(ids_TE.shape[1], device=ids_TE.device) < cfg.top_k
    active_TE = (g_sorted.detach() >= cfg.dense_to_sparse_threshold) | first_k
    return ids_TE, combine_weights(cfg, g_sorted, ids_TE, active_TE), active_TE


# ----------------------------------------------------------- adaptive aux-loss coefficients


def drop_rate(counts_E: Tensor, capacity_factor: float | None) -> Tensor:
    """The fraction of the assignments counted in ``counts_E`` above a capacity of
    ``cf * assignments / E`` per expert (``cf = capacity_factor`` or 1.0), 0-dim fp32."""
    counts = counts_E.float()
    total = counts.sum()
    cf = 1.0 if capacity_factor is None else float(capacity_factor)
    over = (counts - cf * total / counts.numel()).clamp(min=0).sum()
    return over / total.clamp(min=1.0)


class AdaptiveAuxCoefficient(nn.Module):
    """One MoE layer's adaptive balance coefficient (Skywork-MoE). Buffers: persistent
    ``coeff`` (fp32 scalar, in checkpoints), non-persistent ``step_counts_E`` (this step's FFN
    assignments per expert on this rank)."""

    coeff: Tensor
    step_counts_E: Tensor

    def __init__(self, cfg: MoEConfig, initial: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.initial = initial
        self.register_buffer("coeff", torch.tensor(float(initial)), persistent=True)
        self.register_buffer("step_counts_E", torch.zeros(cfg.num_experts), persistent=False)

    def reset_parameters(self) -> None:
        self.coeff.fill_(self.initial)
        self.step_counts_E.zero_()

    @torch.no_grad()
    def record(self, counts_E: Tensor) -> None:
        self.step_counts_E += counts_E.float()

    @torch.no_grad()
    def discard(self) -> None:
        self.step_counts_E.zero_()

    @torch.no_grad()
    def update(self, reduce: CountReduce | None = None) -> Tensor:
        """``alpha <- beta * alpha + (1 - beta) * xi * d`` from this step's counts (``reduce``
        sums them over data-parallel ranks); returns ``d``."""
        cfg = self.cfg
        counts = self.step_counts_E.clone()
        if reduce is not None:
            counts = reduce(counts)
        d = drop_rate(counts, cfg.capacity_factor)
        beta = float(cfg.adaptive_aux_smoothing or 0.0)
        self.coeff.mul_(beta).add_((1 - beta) * cfg.adaptive_aux_sensitivity * d)
        self.step_counts_E.zero_()
        return d

    def _apply(self, fn, recurse=True):
        # a bf16 cast must not round the coefficient or the counts
        names = ("coeff", "step_counts_E")
        apply_keeping_fp32(
            self, names, lambda: super(AdaptiveAuxCoefficient, self)._apply(fn, recurse)
        )
        return self
