"""Hugging Face adapters: import and export hub checkpoints (safetensors + ``config.json``).

One adapter per architecture (:class:`HFAdapter` subclasses, one module per family, listed in
``registry.ARCHS``) maps the config both ways, says what a moetrain model needs that the
architecture cannot express, and names every tensor; the weights move without arithmetic
(experts are stacked into / split out of moetrain's 3-D ``[E, F, D]`` tensors), so a round trip
keeps every tensor bit-identical. MoE architectures: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``,
``olmoe``, ``deepseek_v3``; dense (the upcycling sources): ``llama``, ``mistral``, ``qwen2``,
``qwen3``.

Exported directories use the hub's key layout (per-expert tensors, as the published checkpoints
and ``transformers``' ``save_pretrained`` write them), so ``transformers``, vLLM and friends load
them. A model an architecture cannot express (e.g. dense layers or shared experts for Mixtral)
fails with a message naming what does not fit; nothing is written.

This package's namespace is the public API; its modules are its implementation.
"""

from moetrain.checkpoint.hf.adapter import ExportError, HFAdapter
from moetrain.checkpoint.hf.hub import load_hf, load_hf_weights, save_hf
from moetrain.checkpoint.hf.registry import ARCHS, arch_of, config_from_hf, config_to_hf, get_arch
from moetrain.checkpoint.hf.weights import state_from_hf, state_to_hf

__all__ = [
    "ARCHS",
    "ExportError",
    "HFAdapter",
    "arch_of",
    "config_from_hf",
    "config_to_hf",
    "get_arch",
    "load_hf",
    "load_hf_weights",
    "save_hf",
    "state_from_hf",
    "state_to_hf",
]
