"""Qwen3-MoE (``Qwen3MoeForCausalLM``): the Qwen MoE layer layout, per-head q/k RMSNorm, no
shared expert, no q/k/v biases."""

from __future__ import annotations

from moetrain.checkpoint.hf.qwen2_moe import QwenMoE


class Qwen3Moe(QwenMoE):
    name = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"
    qk_norm = "head"
