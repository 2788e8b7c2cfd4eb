"""Mixtral (``MixtralForCausalLM``): MoE in every layer, experts named w1/w3/w2 under
``block_sparse_moe``, a softmax router whose top-k weights are always renormalized, an optional
sliding window."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetrain.checkpoint.hf.adapter import HFAdapter
from moetrain.models.config import ModelConfig


class Mixtral(HFAdapter):
    name = "mixtral"
    hf_class = "MixtralForCausalLM"
    moe = True
    moe_block = "block_sparse_moe"
    experts = ("w1", "w3", "w2")
    moe_in_every_layer = True
    sliding_window = "plain"

    def moe_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        # softmax over all experts, renormalized over the top k: config.json has no flag for it
        return {**super().moe_from_hf(hf), "norm_topk_prob": True}

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        fields = super().moe_to_hf(cfg)
        del fields["norm_topk_prob"]  # not a Mixtral setting
        m = cfg.moe
        # no dense layers: intermediate_size is the experts'
        fields.update(
            num_local_experts=m.num_experts,
            intermediate_size=m.hidden_dim,
            router_jitter_noise=m.router_jitter,
        )
        return fields

    def routing_fits(self, cfg: ModelConfig) -> list[str]:
        bad = super().routing_fits(cfg)
        if not cfg.moe.norm_topk_prob:
            bad.append("model.moe.norm_topk_prob=false (Mixtral renormalizes the top-k weights)")
        return bad
