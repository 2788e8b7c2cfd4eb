"""The dense architectures (the upcycling sources): Llama, and its variants Mistral (a sliding
window), Qwen2 (q/k/v biases, a flagged sliding window) and Qwen3 (per-head q/k RMSNorm)."""

from __future__ import annotations

from moetrain.checkpoint.hf.adapter import HFAdapter


class Llama(HFAdapter):
    name = "llama"
    hf_class = "LlamaForCausalLM"


class Mistral(HFAdapter):
    name = "mistral"
    hf_class = "MistralForCausalLM"
    sliding_window = "plain"


class Qwen2(HFAdapter):
    name = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    qkv_bias = "always"
    sliding_window = "flag"


class Qwen3(HFAdapter):
    name = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    qk_norm = "head"
