"""Tensor names and layouts between moetrain and Megatron-Core's GPTModel, both ways.

Names here are Megatron's *per-layer* names with the global layer index
(``decoder.layers.<i>.self_attention.linear_qkv.weight``) and whole tensors: the
distributed-checkpoint reader (:mod:`moetrain.checkpoint.megatron`) resolves them to what a
checkpoint stores (layers stacked on a leading dim or one key per layer, experts stacked or one
key per expert, SwiGLU halves together or as ``_w``/``_v``), whatever TP/EP/PP sharding wrote it.

The layouts that need care:

- ``linear_qkv`` is interleaved per query group: for each of the G groups, its H/G query heads,
  then its key head, then its value head (``[G, H/G + 2, d, D]``); its bias likewise.
- ``linear_fc1`` of a SwiGLU MLP (dense, shared expert, each routed expert) is ``[gate; up]``:
  moetrain's ``w1`` (gate) then ``w3`` (up).
- Routed experts are ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2F, D]`` and ``linear_fc2``
  ``[E, D, F]`` (SequentialMLP's and the grouped-GEMM MLPs' common checkpoint layout).
- The pre-attention and pre-MLP norms are fused into the next linear layer's name
  (``linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``) by both the local and
  the Transformer-Engine spec, except the TE spec's MoE layers (``pre_mlp_layernorm.weight``);
  every accepted name is listed, the first is the one written (MoE layers get both).

Weights move without arithmetic: a round trip is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from moetrain.models.config import ModelConfig

# accepted names of the norms (the first is written)
ATTN_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
MLP_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"

# one whole tensor by its accepted names (the first name that exists)
Getter = Callable[..., Tensor]


def layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def split_qkv(w: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's interleaved ``linear_qkv`` weight ``[G*(H/G+2)*d, D]`` (or bias) -> q, k, v."""
    H, G, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    groups = w.reshape(G, H // G + 2, d, *w.shape[1:])
    q = groups[:, : H // G].reshape(H * d, *w.shape[1:])
    k = groups[:, H // G].reshape(G * d, *w.shape[1:])
    v = groups[:, H // G + 1].reshape(G * d, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """The inverse of :func:`split_qkv`."""
    H, G, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    rest = q.shape[1:]
    groups = torch.cat(
        [q.reshape(G, H // G, d, *rest), k.reshape(G, 1, d, *rest), v.reshape(G, 1, d, *rest)],
        dim=1,
    )
    return groups.reshape(G * (H // G + 2) * d, *rest)


def _attention_from(cfg: ModelConfig, get: Getter) -> dict[str, Tensor]:
    out = {"attention_norm.weight": get(*ATTN_NORM)}
    names = ("attention.wq", "attention.wk", "attention.wv")
    qkv = split_qkv(get("self_attention.linear_qkv.weight"), cfg)
    out.update({f"{n}.weight": t for n, t in zip(names, qkv)})
    if cfg.qkv_bias:
        biases = split_qkv(get("self_attention.linear_qkv.bias"), cfg)
        out.update({f"{n}.bias": t for n, t in zip(names, biases)})
    if cfg.qk_norm == "head":
        out["attention.q_norm.weight"] = get("self_attention.q_layernorm.weight")
        out["attention.k_norm.weight"] = get("self_attention.k_layernorm.weight")
    out["attention.wo.weight"] = get("self_attention.linear_proj.weight")
    return out


def _moe_from(cfg: ModelConfig, get: Getter, moe_idx: int) -> dict[str, Tensor]:
    m = cfg.moe
    router = get("mlp.router.weight")
    bias = get("mlp.router.expert_bias") if m.bias_update_rate is not None else None
    w1, w3 = get(EXPERT_FC1).chunk(2, dim=1)
    out = {
        "router.weight_ED": router,
        "router.expert_bias_E": torch.zeros(m.num_experts) if bias is None else bias.float(),
        "experts.w1_EFD": w1.contiguous(),
        "experts.w3_EFD": w3.contiguous(),
        "experts.w2_EDF": get(EXPERT_FC2),
    }
    if m.adaptive_aux_smoothing is not None:  # training state Megatron lacks: the start value
        out["adaptive_aux.coeff"] = torch.tensor(m.aux_coeff_for_layer(moe_idx))
    if m.num_shared_experts:
        s1, s3 = get("mlp.shared_experts.linear_fc1.weight").chunk(2, dim=0)
        out["shared_experts.w1_HD"], out["shared_experts.w3_HD"] = s1, s3
        out["shared_experts.w2_DH"] = get("mlp.shared_experts.linear_fc2.weight")
        if m.shared_gate:
            out["shared_experts.gate_1D"] = get("mlp.shared_experts.gate_weight")
    return out


def _dense_from(get: Getter) -> dict[str, Tensor]:
    w1, w3 = get("mlp.linear_fc1.weight").chunk(2, dim=0)
    return {"w1.weight": w1, "w3.weight": w3, "w2.weight": get("mlp.linear_fc2.weight")}


def state_from_megatron(cfg: ModelConfig, get: Getter) -> dict[str, Tensor]:
    """moetrain's state dict (full tensors, by moetrain's names) from Megatron's tensors."""
    out = {"tok_embeddings.weight": get(EMBEDDING), "norm.weight": get(FINAL_NORM)}
    if not cfg.tie_embeddings:
        out["output.weight"] = get(OUTPUT)
    moe_idx = 0
    for i in range(cfg.num_layers):

        def in_layer(*names: str, _i: int = i) -> Tensor:
            return get(*(layer_prefix(_i) + n for n in names))

        ours = f"layers.{i}."
        out.update({ours + k: t for k, t in _attention_from(cfg, in_layer).items()})
        out[ours + "ffn_norm.weight"] = in_layer(*MLP_NORM)
        if cfg.is_moe_layer(i):
            ffn = _moe_from(cfg, in_layer, moe_idx)
            moe_idx += 1
        else:
            ffn = _dense_from(in_layer)
        out.update({f"{ours}feed_forward.{k}": t for k, t in ffn.items()})
    return out


def _layer_to(cfg: ModelConfig, i: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    ours, ff = f"layers.{i}.", f"layers.{i}.feed_forward."
    a = f"{ours}attention."
    out = {
        ATTN_NORM[0]: state[ours + "attention_norm.weight"],
        MLP_NORM[0]: state[ours + "ffn_norm.weight"],
        "self_attention.linear_qkv.weight": fuse_qkv(
            state[a + "wq.weight"], state[a + "wk.weight"], state[a + "wv.weight"], cfg
        ),
        "self_attention.linear_proj.weight": state[a + "wo.weight"],
    }
    if cfg.qkv_bias:
        out["self_attention.linear_qkv.bias"] = fuse_qkv(
            state[a + "wq.bias"], state[a + "wk.bias"], state[a + "wv.bias"], cfg
        )
    if cfg.qk_norm == "head":
        out["self_attention.q_layernorm.weight"] = state[a + "q_norm.weight"]
        out["self_attention.k_layernorm.weight"] = state[a + "k_norm.weight"]
    if not cfg.is_moe_layer(i):
        out["mlp.linear_fc1.weight"] = torch.cat([state[ff + "w1.weight"], state[ff + "w3.weight"]])
        out["mlp.linear_fc2.weight"] = state[ff + "w2.weight"]
        return out
    m = cfg.moe
    out[MLP_NORM[1]] = out[MLP_NORM[0]]  # the TE spec's MoE layers' name for it
    out["mlp.router.weight"] = state[ff + "router.weight_ED"]
    if m.bias_update_rate is not None:
        out["mlp.router.expert_bias"] = state[ff + "router.expert_bias_E"]
    w1, w3 = state[ff + "experts.w1_EFD"], state[ff + "experts.w3_EFD"]
    out[EXPERT_FC1] = torch.cat([w1, w3], dim=1)
    out[EXPERT_FC2] = state[ff + "experts.w2_EDF"]
    if m.num_shared_experts:
        s = ff + "shared_experts."
        fc1 = torch.cat([state[s + "w1_HD"], state[s + "w3_HD"]])
        out["mlp.shared_experts.linear_fc1.weight"] = fc1
        out["mlp.shared_experts.linear_fc2.weight"] = state[s + "w2_DH"]
        if m.shared_gate:
            out["mlp.shared_experts.gate_weight"] = state[s + "gate_1D"]
    return out


def state_to_megatron(cfg: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Megatron's per-layer tensors (see the module doc) of a moetrain state dict."""
    out = {EMBEDDING: state["tok_embeddings.weight"], FINAL_NORM: state["norm.weight"]}
    if not cfg.tie_embeddings:
        out[OUTPUT] = state["output.weight"]
    for i in range(cfg.num_layers):
        out.update({layer_prefix(i) + k: t for k, t in _layer_to(cfg, i, state).items()})
    return out
