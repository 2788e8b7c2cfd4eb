"""OLMoE (``OlmoeForCausalLM``): MoE in every layer, q/k normalized over the whole projection
(``qk_norm=full``), no q/k/v clipping in moetrain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.adapter import HFAdapter
from moetrain.models.config import ModelConfig


class Olmoe(HFAdapter):
    name = "olmoe"
    hf_class = "OlmoeForCausalLM"
    moe = True
    qk_norm = "full"
    moe_in_every_layer = True

    def check_hf(self, hf: Mapping[str, Any]) -> None:
        super().check_hf(hf)
        if hf.get("clip_qkv") is not None:
            raise CheckpointError("clip_qkv is set: moetrain's attention does not clip q/k/v")

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        # no dense layers: intermediate_size is the experts'
        return {
            **super().moe_to_hf(cfg),
            "num_experts": m.num_experts,
            "intermediate_size": m.hidden_dim,
        }
