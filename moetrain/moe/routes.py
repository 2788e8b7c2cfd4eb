"""Routing research I: experts that cost nothing and routes of varying width.

Legend: B sequences, S sequence length, T tokens, D model dim, E FFN experts, X extra
(non-FFN) experts, Et = E + X router outputs ("routes"), K slots per token, C capacity.

A router with these options scores ``Et`` routes: the E FFN experts first, then
``num_null_experts`` null experts (AdaMoE), then MoE++'s zero-computation experts —
``num_zero_experts`` zero, ``num_copy_experts`` copy and ``num_constant_experts`` constant ones.
Every non-FFN route is computed on the token's own rank: the layer sends only FFN slots to the
dispatcher (the others are masked out of its ``keep_TK``), so they cost no all-to-all traffic.
A route's slot may also be inactive (top-p routing: fewer experts than ``max_k``; expert-choice:
an expert did not pick the token); ``active_TK`` marks the slots that carry a route.

Outputs of the non-FFN routes, for a slot of weight ``w``: null and zero experts ``0``; copy
``w * x``; constant expert j ``w * (a1 * x + a2 * v_j)`` with ``[a1, a2] = softmax(G_j x)``
(MoE++; ``v_j`` [D] and ``G_j`` [2, D] are learned).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import Tensor, nn

from moetrain.moe.capacity import expert_capacity

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig

KINDS = ("ffn", "null", "zero", "copy", "constant")


class NonCausalRoutingWarning(UserWarning):
    """Expert-choice routing lets a token's experts depend on later tokens of its scope."""


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.moe.{name}: {why}")


_EXTRA = ("num_null_experts", "num_zero_experts", "num_copy_experts", "num_constant_experts")


def validate_routes(cfg: MoEConfig) -> None:
    """The routing-research options' own checks (``MoEConfig.validate`` calls it)."""
    for name in _EXTRA:
        if getattr(cfg, name) < 0:
            _fail(name, f"must be >= 0, got {getattr(cfg, name)}")
    if not cfg.zero_compute_aux_weight >= 0:
        _fail("zero_compute_aux_weight", f"must be >= 0, got {cfg.zero_compute_aux_weight}")
    if not cfg.entropy_loss_coeff >= 0:
        _fail("entropy_loss_coeff", f"must be >= 0, got {cfg.entropy_loss_coeff}")
    used = _options_in_use(cfg)
    if used and cfg.router_type != "learned":
        _fail(used[0], f"needs router_type=learned (router scores); got {cfg.router_type!r}")
    extra = [n for n in _EXTRA if getattr(cfg, n)]
    if extra:
        _refuse_with(cfg, f"{extra[0]} (non-FFN experts)")
    _validate_top_p(cfg)
    _validate_expert_choice(cfg)


def _options_in_use(cfg: MoEConfig) -> list[str]:
    names = [
        "num_null_experts",
        "num_zero_experts",
        "num_copy_experts",
        "num_constant_experts",
        "gating_residual",
        "top_p",
        "expert_choice",
        "entropy_loss_coeff",
    ]
    return [n for n in names if getattr(cfg, n) not in (0, 0.0, False, None)]


def _refuse_with(cfg: MoEConfig, what: str) -> None:
    if cfg.num_groups > 1:
        _fail("num_groups", f"group-limited routing does not combine with {what}; set 1")
    if cfg.bias_update_rate is not None:
        _fail("bias_update_rate", f"aux-loss-free balancing does not combine with {what}")


def _validate_top_p(cfg: MoEConfig) -> None:
    if cfg.min_k < 1:
        _fail("min_k", f"must be >= 1, got {cfg.min_k}")
    if cfg.top_p is None:
        return
    if not 0 < cfg.top_p <= 1:
        _fail("top_p", f"must be in (0, 1] or null (top-k routing), got {cfg.top_p}")
    _refuse_with(cfg, "top_p")
    max_k = cfg.route_width
    if not cfg.min_k <= max_k <= cfg.num_routes:
        _fail(
            "max_k",
            f"must lie in [min_k={cfg.min_k}, {cfg.num_routes} routes], got {cfg.max_k}",
        )


def _validate_expert_choice(cfg: MoEConfig) -> None:
    if cfg.expert_choice is None:
        return
    from moetrain.moe.config import EXPERT_CHOICE_SCOPES

    if cfg.expert_choice not in EXPERT_CHOICE_SCOPES:
        _fail(
            "expert_choice",
            f"must be one of {', '.join(EXPERT_CHOICE_SCOPES)} or null; got {cfg.expert_choice!r}",
        )
    if cfg.capacity_factor is None:
        _fail(
            "expert_choice",
            "needs model.moe.capacity_factor: each expert takes "
            "C = ceil(capacity_factor * tokens * top_k / num_experts) tokens of its scope",
        )
    extra = [n for n in _EXTRA if getattr(cfg, n)]
    for name, bad in (
        ("top_p", cfg.top_p is not None),
        (extra[0] if extra else "", bool(extra)),
        ("pad_to_capacity", cfg.pad_to_capacity),
    ):
        if bad:
            _fail(name, "does not combine with expert_choice (experts pick the tokens)")
    _refuse_with(cfg, "expert_choice")


# ---------------------------------------------------------------------------- route kinds


def route_starts(cfg: MoEConfig) -> list[int]:
    """First route id of each kind of :data:`KINDS`, then ``Et``."""
    sizes = [
        cfg.num_experts,
        cfg.num_null_experts,
        cfg.num_zero_experts,
        cfg.num_copy_experts,
        cfg.num_constant_experts,
    ]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    return starts


def route_kind(cfg: MoEConfig, ids_TK: Tensor) -> Tensor:
    """The index into :data:`KINDS` of each route id (comparisons with Python ints: no tensor
    built on the host, so no host-to-device copy on a GPU)."""
    kinds = torch.zeros_like(ids_TK)
    for start in route_starts(cfg)[1:-1]:
        kinds = kinds + (ids_TK >= start).long()
    return kinds


def kind_counts(cfg: MoEConfig, ids_TK: Tensor, active_TK: Tensor | None) -> Tensor:
    """Active slots per kind of :data:`KINDS`, fp32 [5] (detached)."""
    kinds = route_kind(cfg, ids_TK.detach()).flatten()
    ones = torch.ones_like(kinds) if active_TK is None else active_TK.flatten().long()
    return (
        torch.zeros(len(KINDS), dtype=torch.long, device=kinds.device)
        .scatter_add_(0, kinds, ones)
        .float()
    )


def ffn_slots(cfg: MoEConfig, ids_TK: Tensor, active_TK: Tensor | None) -> Tensor | None:
    """Boolean [T, K]: the slots that go to an FFN expert (None: every slot does)."""
    if cfg.num_extra_experts == 0:
        return active_TK
    ffn = ids_TK < cfg.num_experts
    return ffn if active_TK is None else ffn & active_TK


def combine_weights(
    cfg: MoEConfig, scores_TK: Tensor, ids_TK: Tensor, active_TK: Tensor | None
) -> Tensor:
    """The slots' combine weights from their scores: inactive slots 0; with ``norm_topk_prob``
    null slots 0 (AdaMoE: a null expert outputs nothing and takes no share of the weight); with
    ``norm_topk_prob`` renormalized over the token's other active slots; then
    ``routed_scaling_factor``."""
    w_TK = scores_TK if active_TK is None else scores_TK * active_TK
    if cfg.num_null_experts:  # weight 0: a token of null slots only then has no tiny divisor
        E = cfg.num_experts
        w_TK = w_TK.masked_fill((ids_TK >= E) & (ids_TK < E + cfg.num_null_experts), 0.0)
    if cfg.norm_topk_prob:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    return w_TK * cfg.routed_scaling_factor


# ------------------------------------------------------------------------------ selection


def top_p_select(cfg: MoEConfig, order_TE: Tensor, probs_TE: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic (top-p) routing: each token takes routes in ``order_TE`` (the router's
    descending preference) until their probabilities sum to at least ``top_p``, bounded by
    ``[min_k, max_k]``. Returns ``(ids_TK, active_TK)`` with K = max_k."""
    K = cfg.route_width
    ids_TK = order_TE[:, :K]
    p_TK = probs_TE.detach().gather(-1, ids_TK)
    before_TK = torch.cumsum(p_TK, -1) - p_TK  # probability mass of the better routes
    assert cfg.top_p is not None
    n_T = (before_TK < cfg.top_p).sum(-1).clamp(min=cfg.min_k, max=K)
    active_TK = torch.arange(K, device=ids_TK.device) < n_T.unsqueeze(-1)
    return ids_TK, active_TK


def expert_choice_capacity(cfg: MoEConfig, scope_tokens: int) -> int:
    """Tokens each expert takes from a scope of ``scope_tokens`` tokens:
    ``ceil(capacity_factor * tokens * top_k / E)`` (at least ``min_capacity``), at most the
    scope's tokens."""
    assert cfg.capacity_factor is not None
    C = expert_capacity(
        scope_tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.min_capacity
    )
    return min(C, scope_tokens)


def expert_choice_select(
    cfg: MoEConfig, scores_TE: Tensor, seq_len: int | None
) -> tuple[Tensor, Tensor, int]:
    """Expert-choice routing: every expert takes the C tokens of each scope (a sequence, or the
    whole micro-batch) with its highest scores (ties to the earlier token). Returns ``(ids_TE,
    active_TE, rows_per_expert)``: slot e of a token is expert e, active when e picked it."""
    T, E = scores_TE.shape
    if cfg.expert_choice == "sequence":
        if seq_len is None:
            raise ValueError(
                "model.moe.expert_choice=sequence needs [B, S, D] input (the layer got [T, D]); "
                "pass sequences or use expert_choice=micro_batch"
            )
        scope = seq_len
    else:
        scope = T
    C = expert_choice_capacity(cfg, scope)
    s_BSE = scores_TE.detach().reshape(T // scope, scope, E)
    picked = torch.sort(s_BSE, dim=1, descending=True, stable=True).indices[:, :C]  # [B, C, E]
    active = torch.zeros_like(s_BSE, dtype=torch.bool).scatter_(1, picked, True)
    ids_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
    return ids_TE, active.reshape(T, E), (T // scope) * C


def warn_non_causal(cfg: MoEConfig) -> None:
    """Once per process: expert-choice routing is not causal."""
    warnings.warn(
        f"model.moe.expert_choice={cfg.expert_choice}: expert-choice routing is non-causal — "
        "whether an expert takes a token depends on the later tokens of its "
        f"{cfg.expert_choice}, which an autoregressive model cannot see when it generates; "
        "validation loss is optimistic and generation differs from training",
        NonCausalRoutingWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------- zero-computation experts


class ZeroComputeExperts(nn.Module):
    """MoE++'s copy and constant experts (zero and null experts need nothing): their output is
    computed on the token's own rank. Parameters (constant experts only): ``vectors_ND`` (v_j)
    and ``gate_N2D`` (G_j)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        starts = route_starts(cfg)
        self.copy_start, self.const_start = starts[3], starts[4]
        N = cfg.num_constant_experts
        self.vectors_ND = nn.Parameter(torch.empty(N, cfg.dim)) if N else None
        self.gate_N2D = nn.Parameter(torch.empty(N, 2, cfg.dim)) if N else None

    def reset_parameters(self, std: float = 0.02) -> None:
        if self.vectors_ND is not None and self.gate_N2D is not None:
            nn.init.normal_(self.vectors_ND, std=std)
            nn.init.normal_(self.gate_N2D, std=std)

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """``sum_k w_tk * route_{e_tk}(x_t)`` over the copy and constant slots (every other
        slot must carry weight 0 or another kind)."""
        cfg = self.cfg
        copy_TK = (ids_TK >= self.copy_start) & (ids_TK < self.const_start)
        out_TD = (weights_TK * copy_TK).sum(-1, keepdim=True).to(x_TD.dtype) * x_TD
        if self.vectors_ND is None or self.gate_N2D is None:
            return out_TD
        N = cfg.num_constant_experts
        const_TK = ids_TK >= self.const_start
        j_TK = (ids_TK - self.const_start).clamp(min=0, max=N - 1)
        w_TN = torch.zeros(
            ids_TK.shape[0], N, dtype=weights_TK.dtype, device=ids_TK.device
        ).scatter_add(1, j_TK, weights_TK * const_TK)
        a_TN2 = torch.softmax(torch.einsum("td,nad->tna", x_TD.float(), self.gate_N2D.float()), -1)
        mix_TN = w_TN * a_TN2[..., 0]  # weight on x
        out_TD = out_TD + mix_TN.sum(-1, keepdim=True).to(x_TD.dtype) * x_TD
        const_TD = (w_TN * a_TN2[..., 1]) @ self.vectors_ND.float()
        return out_TD + const_TD.to(x_TD.dtype)


# ----------------------------------------------------------------------- balancing weights


def balance_terms(cfg: MoEConfig, f_E: Tensor, P_E: Tensor) -> Tensor:
    """``sum_i eta_i * f_i * P_i`` over the routes (last dim): null experts are balanced as one
    pool (AdaMoE: their f and P are replaced by the pool's means, so only their total use is
    steered, not which identical null expert a token takes); zero-computation experts weigh
    ``zero_compute_aux_weight`` (MoE++'s tau), FFN experts 1."""
    E, n_null = cfg.num_experts, cfg.num_null_experts
    if n_null > 1:
        f_E, P_E = _pool(f_E, E, E + n_null), _pool(P_E, E, E + n_null)
    terms = f_E * P_E
    zc = cfg.num_zero_experts + cfg.num_copy_experts + cfg.num_constant_experts
    if zc and cfg.zero_compute_aux_weight != 1.0:
        eta = torch.ones(terms.shape[-1], dtype=terms.dtype, device=terms.device)
        eta[E + n_null :] = cfg.zero_compute_aux_weight
        terms = terms * eta
    return terms.sum(-1)


def _pool(v: Tensor, lo: int, hi: int) -> Tensor:
    mean = v[..., lo:hi].mean(-1, keepdim=True).expand(*v.shape[:-1], hi - lo)
    return torch.cat([v[..., :lo], mean, v[..., hi:]], -1)


class LogitChain:
    """MoE++'s gating residual across layers: each MoE layer of a model publishes its router
    logits here and the next MoE layer (dense layers between them are skipped) reads them. The
    model owns one chain and gives it to every MoE layer (``MoELayer.logit_chain``); a pipeline
    stage boundary would cut it, so ``gating_residual`` is refused with ``parallel.pp > 1``."""

    def __init__(self) -> None:
        self.latest: Tensor | None = None


def research_options(cfg: MoEConfig) -> list[str]:
    """The routing-research options ``cfg`` sets, as ``model.moe.KEY=VALUE`` (no Hugging Face
    or Megatron-LM architecture expresses them: exports refuse such models)."""
    # the entropy loss only trains the router: the model it leaves is an ordinary one
    names = [n for n in _options_in_use(cfg) if n != "entropy_loss_coeff"]
    if cfg.max_node_groups is not None:  # node-limited selection: not DeepSeek-V3's group rule
        names.append("max_node_groups")
    return [f"model.moe.{n}={getattr(cfg, n)} (routing research)" for n in names]


def nominal_ffn_experts(cfg: MoEConfig) -> int | float:
    """FFN experts per token that active-parameter counts and MFU assume: ``top_k``; with null
    or zero-computation experts the balanced share ``top_k * E / Et``; with expert-choice
    ``top_k * capacity_factor``. (Top-p spends what its router learns: ``top_k`` here, the
    measured count is the logged ``ffn_experts_per_token``.)"""
    if cfg.expert_choice is not None and cfg.capacity_factor is not None:
        return cfg.top_k * cfg.capacity_factor
    if cfg.num_extra_experts:
        return cfg.top_k * cfg.num_experts / cfg.num_routes
    return cfg.top_k
