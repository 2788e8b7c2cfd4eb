"""Megatron-LM's training arguments <-> moetrain's :class:`ModelConfig`, both ways.

Megatron-LM stores its ``argparse.Namespace`` (Megatron-LM's argument names: ``num_layers``,
``hidden_size``, ``num_attention_heads``, ``num_query_groups``, ``num_experts``,
``moe_router_topk``, ``swiglu``, ...) as ``args`` in every checkpoint; :func:`config_from_args`
reads the model from them (as a plain dict: ``vars(args)`` plus the user's overrides) and names,
in one line, the first feature moetrain cannot express (a non-SwiGLU activation, MTP layers,
fp8, MLA, learned position embeddings, ...). :func:`args_from_config` is the inverse, for
``moetrain-convert --format megatron``; :func:`export_problems` lists what does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from moetrain.checkpoint.errors import CheckpointError
from moetrain.models.config import ModelConfig
from moetrain.moe.config import MoEConfig
from moetrain.moe.routes import research_options

# what the importer needs from args (each the fix flag can give): the shape, and the options
# whose Megatron-LM defaults (GeLU, LayerNorm, learned positions) moetrain cannot express, so
# that an absent one is never taken for what moetrain has
REQUIRED = (
    "num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size", "swiglu",
    "normalization", "position_embedding_type",
)  # fmt: skip

# Megatron-LM's routing losses -> model.moe.aux_loss_scope (none: coefficient 0)
_AUX_SCOPES = {"aux_loss": "micro_batch", "seq_aux_loss": "sequence", "global_aux_loss": "global"}

# (argument, is it set in a way moetrain cannot express, what it is) — checked in order, the
# first hit is the error
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("swiglu", lambda v: not v, "non-SwiGLU MLPs (moetrain's MLPs and experts are SwiGLU)"),
    ("squared_relu", bool, "squared-ReLU activation (moetrain's MLPs are SwiGLU)"),
    ("mtp_num_layers", bool, "multi-token-prediction (MTP) layers"),
    ("fp8", bool, "fp8 training (fp8 scales in the checkpoint's extra state)"),
    ("fp4", bool, "fp4 training (fp4 scales in the checkpoint's extra state)"),
    ("multi_latent_attention", bool, "multi-latent attention (MLA)"),
    ("position_embedding_type", lambda v: v not in (None, "rope"), "non-RoPE positions"),
    ("normalization", lambda v: v not in (None, "RMSNorm"), "LayerNorm (moetrain uses RMSNorm)"),
    ("apply_layernorm_1p", bool, "zero-centered (1 + gamma) norms"),
    ("add_bias_linear", bool, "biases on the linear layers (moetrain has q/k/v biases only)"),
    ("rotary_interleaved", bool, "interleaved RoPE"),
    ("rotary_percent", lambda v: v not in (None, 1.0), "partial RoPE (rotary_percent < 1)"),
    ("use_rope_scaling", bool, "Llama-3 RoPE scaling"),
    ("num_experts", lambda v: v is not None and not isinstance(v, int), "a per-layer expert count"),
    ("moe_router_load_balancing_type", lambda v: isinstance(v, list), "per-layer balancing types"),
    ("moe_aux_loss_coeff", lambda v: isinstance(v, list), "several aux-loss coefficients"),
    ("moe_router_score_function", lambda v: v not in (None, "softmax", "sigmoid"), "score fn"),
    ("moe_router_fusion", bool, "Transformer Engine's fused router"),
    ("qk_l2_norm", bool, "L2-normalized queries and keys"),
    ("moe_router_load_balancing_type", lambda v: v == "sinkhorn", "Sinkhorn routing"),
    ("moe_apply_probs_on_input", bool, "router probabilities applied to the expert input"),
    ("apply_residual_connection_post_layernorm", bool, "residuals taken after the norm"),
    ("heterogeneous_layers_config_path", bool, "heterogeneous layers"),
)


def _get(args: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = args.get(name)
    return default if value is None else value


def check_supported(args: Mapping[str, Any]) -> None:
    """Raise one :class:`CheckpointError` line for the first Megatron feature moetrain lacks."""
    missing = [name for name in REQUIRED if args.get(name) is None]
    if missing:
        raise CheckpointError(
            f"the checkpoint's args lack {', '.join(missing)}; give them with "
            f"moetrain-convert --megatron-arg NAME=VALUE (e.g. --megatron-arg {missing[0]}=...)"
        )
    for name, unsupported, what in _UNSUPPORTED:
        if name in args and unsupported(args[name]):
            raise CheckpointError(
                f"Megatron checkpoint uses {what} ({name}={args[name]!r}): moetrain cannot "
                "express it; nothing was converted"
            )


def moe_layers(args: Mapping[str, Any]) -> list[bool]:
    """Which decoder layers are MoE: Megatron's ``moe_layer_freq`` (every n-th layer from the
    first, or a 0/1 pattern per layer); none without ``num_experts``."""
    L = int(args["num_layers"])
    if not args.get("num_experts"):
        return [False] * L
    freq = _get(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(L)]
    if len(freq) != L:
        raise CheckpointError(f"moe_layer_freq has {len(freq)} entries for num_layers={L}")
    return [bool(x) for x in freq]


def _placement(moe: list[bool]) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) reproducing ``moe``, or raise."""
    layers = [i for i, m in enumerate(moe) if m]
    if not layers:
        return len(moe), 1
    first = layers[0]
    freq = layers[1] - first if len(layers) > 1 else 1
    if [i >= first and (i - first) % freq == 0 for i in range(len(moe))] != moe:
        raise CheckpointError(
            f"Megatron checkpoint has MoE layers at {layers} (moe_layer_freq): moetrain needs "
            "MoE from a first layer on, every n-th layer (model.first_k_dense, moe_layer_freq)"
        )
    return first, freq


def _moe_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    D, K = int(args["hidden_size"]), int(_get(args, "moe_router_topk", 2))
    E = int(_get(args, "num_experts", max(K, 1)))
    score = _get(args, "moe_router_score_function", "softmax")
    groups = int(_get(args, "moe_router_num_groups", 1))
    group_topk = _get(args, "moe_router_group_topk")
    if groups > 1 and (score != "sigmoid" or K // int(group_topk) != min(2, E // groups)):
        raise CheckpointError(
            f"Megatron checkpoint uses group-limited routing (moe_router_num_groups={groups}, "
            f"moe_router_group_topk={group_topk}, {score}) that moetrain's DeepSeek-V3 grouping "
            "(sigmoid, groups scored by their best two experts) does not reproduce"
        )
    balancing = _get(args, "moe_router_load_balancing_type", "aux_loss")
    shared = _get(args, "moe_shared_expert_intermediate_size")
    ffn = _get(args, "ffn_hidden_size", 4 * D)
    return dict(
        num_experts=E,
        top_k=K,
        dim=D,
        hidden_dim=int(_get(args, "moe_ffn_hidden_size", ffn)),
        score_func=score,
        num_groups=groups,
        topk_groups=int(group_topk or 1),
        # Megatron renormalizes the top-k: sigmoid scores when K > 1, softmax unless pre-softmax
        norm_topk_prob=K > 1 if score == "sigmoid" else not args.get("moe_router_pre_softmax"),
        routed_scaling_factor=float(_get(args, "moe_router_topk_scaling_factor", 1.0)),
        bias_update_rate=float(_get(args, "moe_router_bias_update_rate", 1e-3))
        if args.get("moe_router_enable_expert_bias")
        else None,
        aux_loss_coeff=float(_get(args, "moe_aux_loss_coeff", 0.0))
        if balancing in _AUX_SCOPES
        else 0.0,
        aux_loss_scope=_AUX_SCOPES.get(balancing, "micro_batch"),
        z_loss_coeff=float(_get(args, "moe_z_loss_coeff", 0.0)),
        router_jitter=float(_get(args, "moe_input_jitter_eps", 0.0)),
        capacity_factor=args.get("moe_expert_capacity_factor"),
        min_capacity=0,
        drop_policy=_get(args, "moe_token_drop_policy", "probs"),
        pad_to_capacity=bool(args.get("moe_pad_expert_input_to_capacity")),
        num_shared_experts=1 if shared else 0,
        shared_hidden_dim=int(shared) if shared else None,
        shared_gate=bool(args.get("moe_shared_expert_gate")),
    )


def config_from_args(args: Mapping[str, Any]) -> ModelConfig:
    """moetrain's :class:`ModelConfig` for Megatron-LM arguments (a dict of them)."""
    check_supported(args)
    D, H = int(args["hidden_size"]), int(args["num_attention_heads"])
    gqa = args.get("group_query_attention", args.get("num_query_groups") is not None)
    G = int(args["num_query_groups"]) if gqa and args.get("num_query_groups") else H
    kv_channels = args.get("kv_channels")
    first_k_dense, freq = _placement(moe_layers(args))
    try:
        return ModelConfig(
            vocab_size=int(args["padded_vocab_size"]),
            dim=D,
            num_layers=int(args["num_layers"]),
            num_heads=H,
            num_kv_heads=G,
            head_dim=None if kv_channels in (None, D // H) else int(kv_channels),
            dense_hidden_dim=int(_get(args, "ffn_hidden_size", 4 * D)),
            max_seq_len=int(_get(args, "max_position_embeddings", _get(args, "seq_length", 4096))),
            rope_theta=float(_get(args, "rotary_base", 10000)),
            qkv_bias=bool(args.get("add_qkv_bias")),
            qk_norm="head" if args.get("qk_layernorm") else "none",
            norm_eps=float(_get(args, "norm_epsilon", 1e-5)),
            tie_embeddings=not args.get("untie_embeddings_and_output_weights", False),
            first_k_dense=first_k_dense,
            moe_layer_freq=freq,
            init_std=float(_get(args, "init_method_std", 0.02)),
            moe=MoEConfig(**_moe_from_args(args)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the Megatron args do not map to moetrain: {err}") from err


def export_problems(cfg: ModelConfig) -> list[str]:
    """What in ``cfg`` Megatron-Core's GPTModel cannot express (empty: it fits)."""
    m = cfg.moe
    best = min(2, m.num_experts // m.num_groups)  # experts moetrain scores a group by
    checks = {
        "model.attention=mla (exported models use grouped-query attention)": cfg.attention == "mla",
        f"model.sliding_window={cfg.sliding_window}": cfg.sliding_window is not None,
        f"model.rope_scaling={cfg.rope_scaling}": cfg.rope_scaling != "none",
        "model.qk_norm=full (Megatron's qk_layernorm is per head)": cfg.qk_norm == "full",
    }
    if cfg.num_moe_layers:
        checks.update(
            {
                f"model.moe.activation={m.activation} (SwiGLU only)": m.activation != "swiglu",
                f"model.moe.router_type={m.router_type}": m.router_type != "learned",
                "model.moe.logit_norm_scale": m.logit_norm_scale is not None,
                "model.moe.norm_topk_prob=false with sigmoid scores and top_k > 1": (
                    m.score_func == "sigmoid" and m.top_k > 1 and not m.norm_topk_prob
                ),
                "model.moe.norm_topk_prob=true with sigmoid scores and top_k = 1": (
                    m.score_func == "sigmoid" and m.top_k == 1 and m.norm_topk_prob
                ),
                f"model.moe.num_groups={m.num_groups} (Megatron scores a group by its best "
                "top_k/topk_groups experts, moetrain by its best two; sigmoid only)": (
                    m.num_groups > 1
                    and (m.score_func != "sigmoid" or m.top_k // m.topk_groups != best)
                ),
                f"model.moe.min_capacity={m.min_capacity} (Megatron has none)": (
                    m.capacity_factor is not None and m.min_capacity > 0
                ),
            }
        )
    problems = [what for what, bad in checks.items() if bad]
    return problems + (research_options(m) if cfg.num_moe_layers else [])


def _moe_layer_freq(cfg: ModelConfig) -> int | list[int]:
    if cfg.first_k_dense == 0:
        return cfg.moe_layer_freq
    return [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]


def _moe_args(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    scope = {v: k for k, v in _AUX_SCOPES.items()}[m.aux_loss_scope]
    return dict(
        num_experts=m.num_experts,
        moe_ffn_hidden_size=m.hidden_dim,
        moe_router_topk=m.top_k,
        moe_router_score_function=m.score_func,
        moe_router_pre_softmax=m.score_func == "softmax" and not m.norm_topk_prob,
        moe_router_topk_scaling_factor=None
        if m.routed_scaling_factor == 1.0
        else m.routed_scaling_factor,
        moe_router_num_groups=m.num_groups if m.num_groups > 1 else None,
        moe_router_group_topk=m.topk_groups if m.num_groups > 1 else None,
        moe_router_enable_expert_bias=m.bias_update_rate is not None,
        moe_router_bias_update_rate=1e-3 if m.bias_update_rate is None else m.bias_update_rate,
        moe_router_load_balancing_type=scope if m.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.aux_loss_coeff,
        moe_z_loss_coeff=m.z_loss_coeff or None,
        moe_input_jitter_eps=m.router_jitter or None,
        moe_expert_capacity_factor=m.capacity_factor,
        moe_token_drop_policy=m.drop_policy,
        moe_pad_expert_input_to_capacity=m.pad_to_capacity,
        moe_shared_expert_intermediate_size=m.shared_hidden if m.num_shared_experts else None,
        moe_shared_expert_gate=m.shared_gate,
        moe_layer_freq=_moe_layer_freq(cfg),
        moe_router_dtype="fp32",
    )


def args_from_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Megatron-LM's arguments (by its names) for ``cfg``, which fits (:func:`export_problems`),
    with weights of ``dtype``; parallel sizes 1 (the export is one rank's full tensors, which
    Megatron reshards on load)."""
    args: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.dim,
        ffn_hidden_size=cfg.dense_hidden_dim,
        num_attention_heads=cfg.num_heads,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len,
        seq_length=cfg.max_seq_len,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        rotary_percent=1.0,
        rotary_interleaved=False,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm == "head",
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        padded_vocab_size=cfg.vocab_size,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        ckpt_format="torch_dist",
    )
    if cfg.num_moe_layers:
        args.update(_moe_args(cfg))
    return args
