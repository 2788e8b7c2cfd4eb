"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention, sigmoid routing with a
score-correction bias, group-limited top-k and a routed scaling factor, ungated shared experts,
dense layers only before the first MoE one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moetrain.checkpoint.hf.adapter import HFAdapter
from moetrain.models.config import ModelConfig

# MLA's sizes: config.json and ModelConfig name them alike
_MLA_SIZES = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class DeepseekV3(HFAdapter):
    name = "deepseek_v3"
    hf_class = "DeepseekV3ForCausalLM"
    moe = True
    shared = "shared_experts"
    expert_bias = "e_score_correction_bias"
    attention = "mla"
    score_func = "sigmoid"

    def moe_layers_from_hf(self, hf: Mapping[str, Any], num_layers: int) -> list[bool]:
        k = int(hf.get("first_k_dense_replace", 0))
        freq = int(hf.get("moe_layer_freq", 1))
        return [i >= k and i % freq == 0 for i in range(num_layers)]

    def fields_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **super().fields_from_hf(hf),
            "head_dim": None,  # MLA has its own head sizes
            "attention": "mla",
            "q_lora_rank": hf.get("q_lora_rank"),  # null: queries without a low-rank step
            **{name: int(hf[name]) for name in _MLA_SIZES},
            "rope_interleave": bool(hf.get("rope_interleave", True)),
        }

    def moe_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **super().moe_from_hf(hf),
            "score_func": "sigmoid",
            "num_groups": int(hf.get("n_group", 1)),
            "topk_groups": int(hf.get("topk_group", 1)),
            "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
            "num_shared_experts": int(hf.get("n_shared_experts", 0)),
            # DeepSeek-V3's training recipe: aux-loss-free balancing with bias update speed
            # 0.001 and a tiny sequence-wise balance loss (0.0001); see docs/checkpoints.md
            "bias_update_rate": 0.001,
            "aux_loss_coeff": 0.0001,
            "aux_loss_scope": "sequence",
        }

    def fields_to_hf(self, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
        fields = super().fields_to_hf(cfg, dtype)
        del fields["head_dim"]  # MLA's head sizes are the *_head_dim fields
        fields.update(
            {name: getattr(cfg, name) for name in ("q_lora_rank", *_MLA_SIZES, "rope_interleave")},
            # MLA has a key and a value per head; transformers' eager attention would repeat
            # them num_heads / num_key_value_heads times
            num_key_value_heads=cfg.num_heads,
        )
        return fields

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        return {
            **super().moe_to_hf(cfg),
            "n_routed_experts": m.num_experts,
            "moe_intermediate_size": m.hidden_dim,
            "n_shared_experts": m.num_shared_experts,
            "n_group": m.num_groups,
            "topk_group": m.topk_groups,
            "routed_scaling_factor": m.routed_scaling_factor,
            "first_k_dense_replace": cfg.first_k_dense,
            "num_nextn_predict_layers": 0,
        }

    def placement_fits(self, cfg: ModelConfig) -> list[str]:
        if cfg.moe_layer_freq != 1:
            return [
                f"model.moe_layer_freq={cfg.moe_layer_freq} (deepseek_v3: every layer after the "
                "first dense ones)"
            ]
        return []

    def routing_fits(self, cfg: ModelConfig) -> list[str]:
        return []  # group-limited, scaled and score-biased routing are DeepSeek-V3's own

    def shared_fits(self, cfg: ModelConfig) -> list[str]:
        m = cfg.moe
        bad = super().shared_fits(cfg)
        if m.shared_gate:
            bad.append("model.moe.shared_gate=true (deepseek_v3's shared experts are ungated)")
        if m.num_shared_experts and m.shared_hidden != m.num_shared_experts * m.hidden_dim:
            bad.append(
                f"model.moe.shared_hidden_dim={m.shared_hidden} (deepseek_v3: "
                "n_shared_experts x moe_intermediate_size)"
            )
        return bad
