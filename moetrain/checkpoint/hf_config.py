"""Hugging Face architectures and their ``config.json``: one :class:`Arch` per architecture
(``ARCHS``), ``config_from_hf`` / ``config_to_hf`` between a hub config and moetrain's
``ModelConfig``, and the check of what an architecture cannot express (``ExportError``). The
weights' mapping and loading/saving are in ``moetrain.checkpoint.hf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moetrain.checkpoint.native import CheckpointError
from moetrain.checkpoint.safetensors_io import tensor_dtype_name
from moetrain.models.config import ModelConfig
from moetrain.moe.config import MoEConfig


class ExportError(ValueError):
    """The model cannot be expressed in the requested architecture."""


# ----------------------------------------------------------------------------- the architectures


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture names things.

    ``moe_block``: the MoE module's name in a decoder layer; ``experts``: the (gate, up, down)
    projection names of one expert; ``shared``: the shared-expert module (None: none);
    ``shared_gate``: the shared expert's sigmoid gate; ``dense_block``: the dense MLP's name.
    """

    name: str
    hf_class: str
    moe: bool
    moe_block: str = "mlp"
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None
    shared_gate: str | None = None
    expert_bias: str | None = None
    qkv_bias: str = "none"  # none | config (qwen2's qkv_bias flag) | always (Qwen2 dense)
    qk_norm: str = "none"


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("mixtral", "MixtralForCausalLM", True, "block_sparse_moe", ("w1", "w3", "w2")),
        Arch(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            True,
            shared="shared_expert",
            shared_gate="shared_expert_gate",
            qkv_bias="config",
        ),
        Arch("qwen3_moe", "Qwen3MoeForCausalLM", True, qk_norm="head"),
        Arch("olmoe", "OlmoeForCausalLM", True, qk_norm="full"),
        Arch(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            True,
            shared="shared_experts",
            expert_bias="e_score_correction_bias",
        ),
        Arch("llama", "LlamaForCausalLM", False),
        Arch("mistral", "MistralForCausalLM", False),
        Arch("qwen2", "Qwen2ForCausalLM", False, qkv_bias="always"),
        Arch("qwen3", "Qwen3ForCausalLM", False, qk_norm="head"),
    )
}
MOE_ARCHS = tuple(name for name, a in ARCHS.items() if a.moe)


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise CheckpointError(
            f"unknown Hugging Face architecture {name!r}; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[name]


# ------------------------------------------------------------------------------ configs: import


def _rope_from_hf(hf: Mapping[str, Any], arch: Arch) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:  # transformers v4 layout: rope_theta + rope_scaling
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = hf.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", "default")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(rope["factor"])}
    if kind == "yarn":
        if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
            raise CheckpointError(
                "rope_parameters: YaRN with an explicit attention_factor or truncate=false is "
                "not supported by moetrain's YaRN (model.rope_scaling=yarn)"
            )
        return {
            **out,
            "rope_scaling": "yarn",
            "rope_scaling_factor": float(rope["factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
            "yarn_beta_fast": float(rope.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(rope.get("beta_slow") or 1.0),
            # absent = 0, as transformers tests them for truthiness
            "yarn_mscale": float(rope.get("mscale") or 0.0),
            "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
    raise CheckpointError(
        f"rope_parameters.rope_type={kind!r} is not supported; moetrain has default, linear, yarn"
    )


def _moe_layers(hf: Mapping[str, Any], arch: Arch, num_layers: int) -> list[bool]:
    if arch.name in ("mixtral", "olmoe"):
        return [True] * num_layers
    if arch.name == "deepseek_v3":
        k = int(hf.get("first_k_dense_replace", 0))
        freq = int(hf.get("moe_layer_freq", 1))
        return [i >= k and i % freq == 0 for i in range(num_layers)]
    step = int(hf.get("decoder_sparse_step", 1))
    dense = set(hf.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]


def _placement(moe: list[bool]) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) reproducing ``moe``, or raise."""
    layers = [i for i, m in enumerate(moe) if m]
    if not layers:
        return len(moe), 1
    first = layers[0]
    freq = layers[1] - layers[0] if len(layers) > 1 else 1
    want = [i >= first and (i - first) % freq == 0 for i in range(len(moe))]
    if want != moe:
        raise CheckpointError(
            f"MoE layers at {layers} cannot be expressed as model.first_k_dense + "
            "model.moe_layer_freq (MoE from a first layer on, every n-th layer)"
        )
    return first, freq


def _hf_get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def config_from_hf(hf: Mapping[str, Any]) -> tuple[Arch, ModelConfig]:
    """moetrain's :class:`ModelConfig` for a hub ``config.json`` (as a dict)."""
    arch = get_arch(str(hf.get("model_type")))
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r}: moetrain's MLPs are SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true: moetrain's MLPs have no biases")
    if arch.name == "olmoe" and hf.get("clip_qkv") is not None:
        raise CheckpointError("clip_qkv is set: moetrain's attention does not clip q/k/v")
    if hf.get("attention_bias") and arch.qkv_bias == "none":
        raise CheckpointError(
            "attention_bias=true (biases on q/k/v and the output projection): moetrain's "
            "attention output projection has no bias"
        )
    D, L = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    H = int(hf["num_attention_heads"])
    moe_layers = _moe_layers(hf, arch, L) if arch.moe else [False] * L
    first_k_dense, freq = _placement(moe_layers)
    window = None
    if arch.name == "mistral" or (arch.name == "mixtral" and hf.get("sliding_window")):
        window = hf.get("sliding_window")
    elif hf.get("use_sliding_window"):
        types = hf.get("layer_types") or []
        if any(t != "sliding_attention" for t in types):
            raise CheckpointError(
                "use_sliding_window with full-attention layers (max_window_layers / layer_types):"
                " moetrain applies one model.sliding_window to every layer"
            )
        window = hf.get("sliding_window")
    qkv_bias = {
        "none": False,
        "always": True,
        "config": bool(hf.get("qkv_bias", True)),
    }[arch.qkv_bias]
    num_experts = int(
        _hf_get(hf, "num_local_experts", "num_experts", "n_routed_experts", default=8)
    )
    expert_hidden = int(_hf_get(hf, "moe_intermediate_size", "intermediate_size"))
    moe: dict[str, Any] = dict(
        num_experts=num_experts,
        top_k=min(int(hf.get("num_experts_per_tok", 2)), num_experts),
        dim=D,
        hidden_dim=expert_hidden,
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.01)),
        router_jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", arch.name == "mixtral")),
    )
    if arch.name == "mixtral":
        moe["norm_topk_prob"] = True  # softmax over all experts, renormalized over the top k
    shared_size = int(hf.get("shared_expert_intermediate_size") or 0)
    if arch.name == "qwen2_moe" and shared_size:  # size 0: no shared expert (empty tensors)
        moe.update(num_shared_experts=1, shared_hidden_dim=shared_size, shared_gate=True)
    if arch.name == "deepseek_v3":
        moe.update(
            score_func="sigmoid",
            num_groups=int(hf.get("n_group", 1)),
            topk_groups=int(hf.get("topk_group", 1)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            num_shared_experts=int(hf.get("n_shared_experts", 0)),
            # DeepSeek-V3's training recipe: aux-loss-free balancing with bias update speed
            # 0.001 and a tiny sequence-wise balance loss (0.0001); see docs/checkpoints.md
            bias_update_rate=0.001,
            aux_loss_coeff=0.0001,
            aux_loss_scope="sequence",
        )
    head_dim = hf.get("head_dim")
    if arch.name == "deepseek_v3" or (head_dim is not None and D % H == 0 and head_dim == D // H):
        head_dim = None  # the default (dim // num_heads); MLA has its own head dims
    fields: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        dim=D,
        num_layers=L,
        num_heads=H,
        num_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=None if head_dim is None else int(head_dim),
        dense_hidden_dim=int(hf.get("intermediate_size", expert_hidden)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=arch.qk_norm,
        sliding_window=int(window) if window else None,
        first_k_dense=first_k_dense,
        moe_layer_freq=freq,
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope_from_hf(hf, arch),
    )
    if arch.name == "deepseek_v3":
        fields.update(
            attention="mla",
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            rope_interleave=bool(hf.get("rope_interleave", True)),
        )
    try:
        return arch, ModelConfig(**fields, moe=MoEConfig(**moe))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the {arch.name} config does not map to moetrain: {err}") from err


# ------------------------------------------------------------------------------ configs: export


def _fits(arch: Arch, cfg: ModelConfig) -> list[str]:
    """What in ``cfg`` the architecture cannot express (empty: it fits)."""
    m = cfg.moe
    bad: list[str] = []
    mla = cfg.attention == "mla"
    if mla != (arch.name == "deepseek_v3"):
        bad.append(
            f"model.attention={'mla' if mla else 'gqa'} ({arch.name} uses "
            f"{'MLA' if arch.name == 'deepseek_v3' else 'grouped-query attention'})"
        )
    if cfg.qk_norm != arch.qk_norm:
        bad.append(f"model.qk_norm={cfg.qk_norm} ({arch.name} has qk_norm={arch.qk_norm})")
    if cfg.qkv_bias and arch.qkv_bias == "none":
        bad.append(f"model.qkv_bias=true ({arch.name} has no q/k/v bias)")
    if cfg.sliding_window is not None and arch.name not in ("mistral", "mixtral", "qwen2"):
        bad.append(f"model.sliding_window={cfg.sliding_window} ({arch.name} has none)")
    if not arch.moe:
        if cfg.num_moe_layers:
            bad.append(f"{cfg.num_moe_layers} MoE layers ({arch.name} is a dense architecture)")
        return bad
    if cfg.num_moe_layers == 0:
        bad.append(f"no MoE layer ({arch.name} is an MoE architecture)")
    if arch.name in ("mixtral", "olmoe") and cfg.num_moe_layers != cfg.num_layers:
        bad.append(
            f"{cfg.num_layers - cfg.num_moe_layers} dense layers (model.first_k_dense="
            f"{cfg.first_k_dense}, model.moe_layer_freq={cfg.moe_layer_freq}; {arch.name} has "
            "MoE in every layer)"
        )
    if arch.name == "deepseek_v3" and cfg.moe_layer_freq != 1:
        bad.append(f"model.moe_layer_freq={cfg.moe_layer_freq} (deepseek_v3: every layer after "
                   "the first dense ones)")  # fmt: skip
    if m.activation != "swiglu":
        bad.append(f"model.moe.activation={m.activation} ({arch.name} experts are SwiGLU)")
    if m.router_type != "learned":
        bad.append(f"model.moe.router_type={m.router_type} ({arch.name} has a learned router)")
    want_score = "sigmoid" if arch.name == "deepseek_v3" else "softmax"
    if m.score_func != want_score:
        bad.append(f"model.moe.score_func={m.score_func} ({arch.name} uses {want_score})")
    if m.logit_norm_scale is not None:
        bad.append("model.moe.logit_norm_scale (no gating-logit normalization in HF models)")
    if arch.name != "deepseek_v3":
        if m.num_groups > 1:
            bad.append(f"model.moe.num_groups={m.num_groups} (group-limited routing: deepseek_v3)")
        if m.routed_scaling_factor != 1.0:
            bad.append(f"model.moe.routed_scaling_factor={m.routed_scaling_factor} (deepseek_v3)")
        if m.bias_update_rate is not None:
            bad.append(
                "model.moe.bias_update_rate is set: the expert score bias changes routing and "
                f"{arch.name} has no place for it (deepseek_v3 has)"
            )
    if arch.name == "mixtral" and not m.norm_topk_prob:
        bad.append("model.moe.norm_topk_prob=false (Mixtral renormalizes the top-k weights)")
    if arch.shared is None and m.num_shared_experts:
        bad.append(f"model.moe.num_shared_experts={m.num_shared_experts} ({arch.name} has none)")
    if (
        arch.name == "qwen2_moe"
        and m.num_shared_experts
        and (m.num_shared_experts != 1 or not m.shared_gate)
    ):
        bad.append(
            "qwen2_moe has one gated shared expert or none (model.moe.num_shared_experts=1 with "
            f"shared_gate=true, or 0); got {m.num_shared_experts}, shared_gate={m.shared_gate}"
        )
    if arch.name == "deepseek_v3":
        if m.shared_gate:
            bad.append("model.moe.shared_gate=true (deepseek_v3's shared experts are ungated)")
        if m.num_shared_experts and m.shared_hidden != m.num_shared_experts * m.hidden_dim:
            bad.append(
                f"model.moe.shared_hidden_dim={m.shared_hidden} (deepseek_v3: "
                "n_shared_experts x moe_intermediate_size)"
            )
    return bad


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=cfg.rope_scaling_factor,
            original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
            beta_fast=cfg.yarn_beta_fast,
            beta_slow=cfg.yarn_beta_slow,
        )
        if cfg.yarn_mscale:
            rope["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rope["mscale_all_dim"] = cfg.yarn_mscale_all_dim
    return rope


def config_to_hf(cfg: ModelConfig, arch_name: str, dtype: torch.dtype) -> dict[str, Any]:
    """The hub ``config.json`` (as a dict) of ``cfg`` in architecture ``arch_name``; raises
    :class:`ExportError` naming everything that does not fit."""
    import transformers

    arch = get_arch(arch_name)
    bad = _fits(arch, cfg)
    if bad:
        raise ExportError(f"cannot export to {arch.name}: " + "; ".join(bad))
    m = cfg.moe
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.dense_hidden_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_to_hf(cfg),
        architectures=[arch.hf_class],
        dtype=tensor_dtype_name(dtype),
    )
    if arch.name != "deepseek_v3":
        fields["head_dim"] = cfg.head_size
    if arch.qkv_bias == "none" and arch.name != "deepseek_v3":
        fields["attention_bias"] = False
    if arch.qkv_bias == "config":
        fields["qkv_bias"] = cfg.qkv_bias
    if cfg.sliding_window is not None:
        fields["sliding_window"] = cfg.sliding_window
        if arch.name == "qwen2":
            fields.update(
                use_sliding_window=True,
                max_window_layers=0,
                layer_types=["sliding_attention"] * cfg.num_layers,
            )
    elif arch.name in ("mistral", "mixtral"):
        fields["sliding_window"] = None
    if arch.moe:
        fields.update(
            num_experts_per_tok=m.top_k,
            router_aux_loss_coef=m.aux_loss_coeff,
            norm_topk_prob=m.norm_topk_prob,
        )
        moe_layers = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
        if arch.name == "mixtral":
            fields.update(num_local_experts=m.num_experts, intermediate_size=m.hidden_dim)
            fields["router_jitter_noise"] = m.router_jitter
            del fields["norm_topk_prob"]
        elif arch.name == "deepseek_v3":
            fields.update(
                n_routed_experts=m.num_experts,
                moe_intermediate_size=m.hidden_dim,
                n_shared_experts=m.num_shared_experts,
                n_group=m.num_groups,
                topk_group=m.topk_groups,
                routed_scaling_factor=m.routed_scaling_factor,
                first_k_dense_replace=cfg.first_k_dense,
                num_nextn_predict_layers=0,
                q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim,
                rope_interleave=cfg.rope_interleave,
                attention_bias=False,
                # MLA has a key and a value per head; transformers' eager attention would
                # repeat them num_heads / num_key_value_heads times
                num_key_value_heads=cfg.num_heads,
            )
        elif arch.name == "olmoe":  # no dense layers: intermediate_size is the experts'
            fields.update(num_experts=m.num_experts, intermediate_size=m.hidden_dim)
        else:
            fields.update(num_experts=m.num_experts, moe_intermediate_size=m.hidden_dim)
            if arch.name in ("qwen2_moe", "qwen3_moe"):
                fields.update(
                    decoder_sparse_step=1,
                    mlp_only_layers=[i for i, moe in enumerate(moe_layers) if not moe],
                )
            if arch.name == "qwen2_moe":  # 0: no shared expert
                fields["shared_expert_intermediate_size"] = (
                    m.shared_hidden if m.num_shared_experts else 0
                )
    config = transformers.AutoConfig.for_model(arch.name, **fields)
    return config.to_dict()


# --------------------------------------------------------------------------------- tensor names
