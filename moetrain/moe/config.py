"""MoEConfig: every option of one MoE layer (it becomes ``model.moe`` in the Hydra config).

Field types are the ones OmegaConf accepts (str validated against a set of choices, Optional,
List[float]); ``validate()`` raises a ``ValueError`` naming the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, NoReturn, Optional

from moetrain.moe.router_registry import ROUTERS

ACTIVATIONS = ("swiglu", "gelu")
EXPERTS_IMPLS = ("auto", "loop", "grouped_mm")
DROP_POLICIES = ("probs", "position")
SCORE_FUNCS = ("softmax", "sigmoid")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global")
BIAS_LOADS = ("assigned", "kept")
EXPERT_CHOICE_SCOPES = ("sequence", "micro_batch")


@dataclass
class MoEConfig:
    """Options of one MoE layer. Defaults give a dropless, softmax top-2 layer (Mixtral-like).

    Shapes: ``dim`` D, ``hidden_dim`` F (per routed expert), ``num_experts`` E, ``top_k`` K.
    ``capacity_factor=None`` is dropless; otherwise each expert keeps at most
    ``C = max(ceil(capacity_factor * T * K / E), min_capacity)`` of the T*K assignments.
    """

    num_experts: int = 8
    top_k: int = 2
    dim: int = 128
    hidden_dim: int = 256
    activation: str = "swiglu"
    # how the routed experts' GEMMs run: auto | loop | grouped_mm (docs/moe.md)
    experts_impl: str = "auto"
    # capacity / dropping
    capacity_factor: Optional[float] = None
    min_capacity: int = 4
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    # router
    score_func: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    logit_norm_scale: Optional[float] = None
    router_jitter: float = 0.0
    router_type: str = "learned"  # a key of moetrain.moe.router_registry.ROUTERS
    bias_update_rate: Optional[float] = None
    bias_load: str = "assigned"  # what aux-loss-free balancing counts: assigned | kept tokens
    # auxiliary losses
    aux_loss_coeff: float = 0.01
    aux_loss_coeff_per_layer: Optional[List[float]] = field(default=None)
    aux_loss_scope: str = "micro_batch"
    z_loss_coeff: float = 0.0
    # shared experts
    num_shared_experts: int = 0
    shared_hidden_dim: Optional[int] = None
    shared_gate: bool = False
    # routing research (docs/moe.md "Routing research"): experts that cost nothing, routes of
    # varying width; all off by default
    num_null_experts: int = 0  # AdaMoE: FLOP-free experts that output zero
    num_zero_experts: int = 0  # MoE++ zero-computation experts: zero (discard) ...
    num_copy_experts: int = 0  # ... copy (skip: the input) ...
    num_constant_experts: int = 0  # ... constant (a learned vector mixed with the input)
    zero_compute_aux_weight: float = 1.0  # MoE++'s tau: their weight in the balance loss
    gating_residual: bool = False  # MoE++: the previous MoE layer's logits feed the router
    top_p: Optional[float] = None  # dynamic routing: experts until probability mass >= top_p
    min_k: int = 1  # top_p: at least this many experts per token
    max_k: Optional[int] = None  # top_p: at most this many (null: every expert)
    entropy_loss_coeff: float = 0.0  # top_p's dynamic loss: coeff * mean router entropy
    expert_choice: Optional[str] = None  # experts choose tokens within a sequence | micro_batch
    # routing research II (docs/moe.md "Routing policies"): policies over training and
    # topology; all off by default
    expert_groups: Optional[int] = None  # Rectify-Router: experts per group (contiguous)
    rectify_intra_group: bool = False  # a capacity-dropped slot moves to its group's best expert
    rectify_fill_in: bool = False  # under-full experts take their best unrouted tokens
    dense_to_sparse_steps: Optional[int] = None  # EvoMoE: steps of the dense-to-sparse gate
    dense_to_sparse_temperature: List[float] = field(default_factory=lambda: [2.0, 0.3])
    dense_to_sparse_threshold: float = 0.05  # the dense gate's experts: weight >= threshold
    top_k_schedule_steps: Optional[int] = None  # SMoE-Dropout: k grows to top_k over these steps
    top_k_start: int = 1  # the top-k schedule's first k
    freeze_router: bool = False  # SMoE-Dropout's fixed random router: its weights never train
    adaptive_aux_smoothing: Optional[float] = None  # Skywork-MoE's beta: adaptive coefficients
    adaptive_aux_sensitivity: float = 0.1  # Skywork-MoE's xi: coefficient per unit drop rate
    num_node_groups: int = 1  # node groups of experts (contiguous), placed one per node or more
    max_node_groups: Optional[int] = None  # DeepSeek-V3: a token's experts in <= M node groups
    locality_bias: float = 0.0  # LocMoE: selection bonus of the experts on the token's node

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_extra_experts(self) -> int:
        """Experts that are not FFNs: null, zero, copy and constant ones."""
        return (
            self.num_null_experts
            + self.num_zero_experts
            + self.num_copy_experts
            + self.num_constant_experts
        )

    @property
    def num_routes(self) -> int:
        """Router outputs: the FFN experts first, then null, zero, copy, constant experts."""
        return self.num_experts + self.num_extra_experts

    @property
    def route_width(self) -> int:
        """Expert slots per token: top_k, or max_k with top_p (every route when unbounded)."""
        if self.top_p is None:
            return self.top_k
        return self.num_routes if self.max_k is None else self.max_k

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        _positive(self, "num_experts", "dim", "hidden_dim", "top_k", "num_groups", "topk_groups")
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "experts_impl", EXPERTS_IMPLS)
        _choice(self, "drop_policy", DROP_POLICIES)
        _choice(self, "score_func", SCORE_FUNCS)
        _choice(self, "router_type", tuple(ROUTERS))
        _choice(self, "aux_loss_scope", AUX_LOSS_SCOPES)
        _choice(self, "bias_load", BIAS_LOADS)
        if self.top_k > self.num_routes:
            routes = f"num_experts={self.num_experts}"
            if self.num_extra_experts:
                routes = f"the {self.num_routes} routes (FFN, null and zero-computation experts)"
            _fail("top_k", f"{self.top_k} exceeds {routes}; lower top_k")
        self._validate_groups()
        self._validate_capacity()
        self._validate_router()
        self._validate_losses()
        from moetrain.moe.routes import validate_routes  # the options' own checks

        validate_routes(self)
        from moetrain.moe.policies import validate_policies

        validate_policies(self)
        if self.num_shared_experts < 0:
            _fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.shared_hidden_dim is not None and self.shared_hidden_dim <= 0:
            _fail("shared_hidden_dim", f"must be positive or null, got {self.shared_hidden_dim}")
        if self.shared_gate and self.num_shared_experts == 0:
            _fail(
                "shared_gate", "needs num_shared_experts >= 1 (there is no shared expert to gate)"
            )

    def _validate_groups(self) -> None:
        if self.num_experts % self.num_groups:
            _fail(
                "num_groups",
                f"{self.num_groups} does not divide num_experts={self.num_experts}; "
                "pick a divisor of num_experts",
            )
        if self.topk_groups > self.num_groups:
            _fail("topk_groups", f"{self.topk_groups} exceeds num_groups={self.num_groups}")
        per_group = self.num_experts // self.num_groups
        if self.top_k > self.topk_groups * per_group:
            _fail(
                "top_k",
                f"{self.top_k} exceeds the experts in the kept groups "
                f"(topk_groups={self.topk_groups} x {per_group} experts per group)",
            )

    def _validate_capacity(self) -> None:
        cf = self.capacity_factor
        if cf is not None and not (cf > 0 and math.isfinite(cf)):
            _fail("capacity_factor", f"must be a positive number or null (dropless), got {cf}")
        if self.min_capacity < 0:
            _fail("min_capacity", f"must be >= 0, got {self.min_capacity}")
        if self.pad_to_capacity and cf is None:
            _fail("pad_to_capacity", "needs capacity_factor set (dropless has no capacity)")

    def _validate_router(self) -> None:
        if not self.routed_scaling_factor > 0:
            _fail("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
        if self.logit_norm_scale is not None and not self.logit_norm_scale > 0:
            _fail("logit_norm_scale", f"must be > 0 or null (off), got {self.logit_norm_scale}")
        if not 0 <= self.router_jitter < 1:
            _fail("router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        if self.bias_update_rate is not None:
            if self.bias_update_rate < 0:
                _fail("bias_update_rate", f"must be >= 0 or null, got {self.bias_update_rate}")
            if not ROUTERS[self.router_type].uses_expert_bias:
                _fail("bias_update_rate", f"applies to {_routers_with('uses_expert_bias')} only")
        if self.num_groups > 1 and not ROUTERS[self.router_type].supports_groups:
            _fail(
                "num_groups",
                f"group-limited routing applies to {_routers_with('supports_groups')} only",
            )

    def _validate_losses(self) -> None:
        if self.aux_loss_coeff < 0:
            _fail("aux_loss_coeff", f"must be >= 0, got {self.aux_loss_coeff}")
        if self.z_loss_coeff < 0:
            _fail("z_loss_coeff", f"must be >= 0, got {self.z_loss_coeff}")
        per_layer = self.aux_loss_coeff_per_layer
        if per_layer is not None and any(c < 0 for c in per_layer):
            _fail("aux_loss_coeff_per_layer", f"coefficients must be >= 0, got {list(per_layer)}")

    def aux_coeff_for_layer(self, layer_idx: int | None) -> float:
        """The load-balancing coefficient of MoE layer ``layer_idx`` (counted among MoE layers)."""
        per_layer = self.aux_loss_coeff_per_layer
        if per_layer is None:
            return self.aux_loss_coeff
        if layer_idx is None or not 0 <= layer_idx < len(per_layer):
            _fail(
                "aux_loss_coeff_per_layer",
                f"has {len(per_layer)} entries but MoE layer index {layer_idx} was asked for; "
                "give one coefficient per MoE layer",
            )
        return float(per_layer[layer_idx])

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared-expert MLP (default: num_shared_experts * hidden_dim)."""
        if self.shared_hidden_dim is not None:
            return self.shared_hidden_dim
        return self.num_shared_experts * self.hidden_dim


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.moe.{name}: {why}")


def _routers_with(flag: str) -> str:
    """``router_type='learned'`` (or ``'a' or 'b'``): the registered routers with ``flag`` set."""
    names = [repr(name) for name, cls in ROUTERS.items() if getattr(cls, flag)]
    return "router_type=" + " or ".join(names)


def _positive(cfg: MoEConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            _fail(name, f"must be a positive integer, got {value!r}")


def _choice(cfg: MoEConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        _fail(name, f"must be one of {', '.join(choices)}; got {value!r}")
