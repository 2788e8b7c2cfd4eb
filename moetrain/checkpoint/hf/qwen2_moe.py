"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and :class:`QwenMoE`, the layer layout the Qwen MoE
family shares: MoE every ``decoder_sparse_step``-th layer except ``mlp_only_layers``.

Qwen2-MoE adds q/k/v biases (its ``qkv_bias`` flag) and at most one shared expert with a sigmoid
gate; "no shared expert" is stored as one of size 0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from moetrain.checkpoint.hf.adapter import HFAdapter
from moetrain.models.config import ModelConfig


class QwenMoE(HFAdapter):
    """The Qwen MoE layer layout (not registered itself)."""

    moe = True

    def moe_layers_from_hf(self, hf: Mapping[str, Any], num_layers: int) -> list[bool]:
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or [])
        return [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **super().moe_to_hf(cfg),
            "num_experts": cfg.moe.num_experts,
            "moe_intermediate_size": cfg.moe.hidden_dim,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
        }


class Qwen2Moe(QwenMoE):
    name = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"
    shared = "shared_expert"
    shared_gate = "shared_expert_gate"
    qkv_bias = "config"

    def moe_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        moe = super().moe_from_hf(hf)
        shared_size = int(hf.get("shared_expert_intermediate_size") or 0)
        if shared_size:  # size 0: no shared expert (empty tensors)
            moe.update(num_shared_experts=1, shared_hidden_dim=shared_size, shared_gate=True)
        return moe

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        shared_size = m.shared_hidden if m.num_shared_experts else 0  # 0: no shared expert
        return {**super().moe_to_hf(cfg), "shared_expert_intermediate_size": shared_size}

    def shared_fits(self, cfg: ModelConfig) -> list[str]:
        m = cfg.moe
        bad = super().shared_fits(cfg)
        if m.num_shared_experts and (m.num_shared_experts != 1 or not m.shared_gate):
            bad.append(
                "qwen2_moe has one gated shared expert or none (model.moe.num_shared_experts=1 "
                f"with shared_gate=true, or 0); got {m.num_shared_experts}, "
                f"shared_gate={m.shared_gate}"
            )
        return bad

    def extra_tensors_to_hf(
        self, cfg: ModelConfig, state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Qwen2-MoE always has a shared expert: "none" is one of size 0 (its gate unused)."""
        if cfg.moe.num_shared_experts:
            return {}
        like = state["tok_embeddings.weight"]
        D = cfg.dim
        out = {}
        for i in range(cfg.num_layers):
            if cfg.is_moe_layer(i):
                block = f"model.layers.{i}.{self.moe_block}."
                out[f"{block}{self.shared}.gate_proj.weight"] = like.new_zeros(0, D)
                out[f"{block}{self.shared}.up_proj.weight"] = like.new_zeros(0, D)
                out[f"{block}{self.shared}.down_proj.weight"] = like.new_zeros(D, 0)
                out[f"{block}{self.shared_gate}.weight"] = like.new_zeros(1, D)
        return out

    def ignores(self, name: str, cfg: ModelConfig) -> bool:
        # the size-0 shared expert and its gate
        return not cfg.moe.num_shared_experts and f".{self.shared}" in name
