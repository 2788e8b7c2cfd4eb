"""Activation memory per micro-batch: what each decoder block keeps for its backward pass.

A formula, not a measurement (the MoE layer's row counts are data-dependent): the bytes of the
tensors autograd saves, per token, for the ops this code base runs. docs/parallelism.md ("Memory
plan") states it; ``tests/unit/test_memory_plan.py`` checks it on a hand-computed case and
against the tensors autograd actually saves on CPU.

Legend: b micro-batch, s sequence length, T = b*s tokens, t tensor-parallel degree, Tsp = T/t
(sequence-parallel tokens), D model dim, a = 2 under bf16 autocast and 4 in fp32 (what matmuls
save), E experts, K top-k, F expert hidden dim, V vocabulary.

Conventions the terms rely on:

- the residual stream and every RMSNorm output are fp32 (the embedding is an fp32 parameter and
  the norms compute in fp32), so a norm over n features keeps ``4n`` (its fp32 input) ``+ 4``
  per group (``rsqrt``) ``+ n * (its input's bytes)`` (the normalized value);
- a linear layer's input of n features is kept once in fp32 (``4n``), but under bf16 autocast
  every consuming linear keeps its own bf16 cast (``2n`` each): :func:`linear_input`;
- attention is a fused kernel (flash / memory-efficient, as on GPUs): it keeps q, k, v, the
  output and an fp32 log-sum-exp per head, never the S x S scores;
- under bf16 autocast each matmul also keeps the bf16 cast of its weight: the bytes of the
  layer's weights as it computes with them (after FSDP's all-gather, TP/EP-local), given by the
  caller per layer (``weight_casts``);
- per-position tables (RoPE cos/sin) and tensors smaller than a few bytes per token are left
  out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moetrain.models.config import ModelConfig
from moetrain.moe.capacity import expert_capacity

FP32 = 4


@dataclass(frozen=True)
class ActivationLayout:
    """What the formula needs besides the model: the micro-batch shape, the autocast dtype and
    the degrees that split tokens (``cp``, ``tp``, ``etp``) and rows (``ep``, FSSDP's
    ``fssdp_slack``: None unless the experts are FSSDP-placed)."""

    micro_batch: int
    seq_len: int
    bf16: bool = False
    tp: int = 1
    etp: int = 1
    ep: int = 1
    fssdp_slack: float | None = None
    cp: int = 1

    @property
    def act(self) -> int:
        """Bytes per element matmuls save: 2 under bf16 autocast, 4 in fp32."""
        return 2 if self.bf16 else FP32

    @property
    def tokens(self) -> int:
        """Tokens of a micro-batch this rank's attention sees (its part under context
        parallelism)."""
        return self.micro_batch * self.seq_len // self.cp

    @property
    def micro_tokens(self) -> int:
        """Tokens of the whole micro-batch (what MoE layers route under TP or CP)."""
        return self.micro_batch * self.seq_len

    @property
    def sp_tokens(self) -> int:
        """Tokens of the residual stream on one TP rank (sequence parallel)."""
        return self.tokens // self.tp


def linear_input(features: int, consumers: int, bf16: bool) -> int:
    """Bytes per token that ``consumers`` linear layers reading one fp32 input of ``features``
    keep: the input once in fp32, or one bf16 cast per consumer under autocast."""
    return features * (2 * consumers if bf16 else FP32)


def norm_bytes(features: int, groups: int, input_bytes: int) -> int:
    """Bytes per token an RMSNorm over ``features`` (in ``groups`` normalized groups) keeps:
    its fp32 input, one fp32 ``rsqrt`` per group, the normalized value in the input's dtype."""
    return FP32 * features + FP32 * groups + input_bytes * features


def residual_norm(m: ModelConfig) -> int:
    """The pre-attention / pre-FFN / final norm, per token of the residual stream."""
    return norm_bytes(m.dim, 1, FP32)


def attention_bytes(m: ModelConfig, lay: ActivationLayout) -> int:
    """Attention (without its input norm) per micro-batch: T tokens, heads split over t."""
    a, T = lay.act, lay.tokens
    if m.attention == "mla":
        H, n, r, v, C, Q = (
            m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
            m.kv_lora_rank, m.q_lora_rank,
        )  # fmt: skip
        per = linear_input(m.dim, 2, lay.bf16)  # wq (or wq_a) and wkv_a
        if Q is not None:
            per += norm_bytes(Q, 1, a) + linear_input(Q, 1, lay.bf16)  # q_norm, wq_b
        per += norm_bytes(C, 1, a) + linear_input(C, 1, lay.bf16)  # kv_norm, wkv_b
        # q and k per head (k's RoPE part expanded), v a view of wkv_b's output, the output
        per += a * (2 * H * (n + r) + H * (n + v) + H * v) + FP32 * H
        return T * per
    h, g, d = m.num_heads // lay.tp, m.num_kv_heads // lay.tp, m.head_size
    per = linear_input(m.dim, 3, lay.bf16)  # wq, wk, wv
    if m.qk_norm == "head":
        per += norm_bytes((h + g) * d, h + g, a)
    elif m.qk_norm == "full":
        per += norm_bytes((h + g) * d, 2, a)
    per += a * (2 * h * d + 2 * g * d) + FP32 * h  # q, k, v, output; log-sum-exp
    return T * per


def dense_ffn_bytes(m: ModelConfig, lay: ActivationLayout) -> int:
    """The dense SwiGLU MLP per micro-batch: w1/w3 input, w1 and w3 outputs, SiLU output and
    the product (4 x F/t per token)."""
    F = m.dense_hidden_dim // lay.tp
    return lay.tokens * (linear_input(m.dim, 2, lay.bf16) + 4 * F * lay.act)


def routed_rows(m: ModelConfig, lay: ActivationLayout) -> tuple[int, int]:
    """(rows this rank sends, rows its experts compute) per MoE call: T_r * K with T_r the
    tokens it dispatches (its sequence chunk when tp > 1 and etp = 1), under balanced routing;
    with a capacity factor the capacity bound E * C (exact with padding; the rows a rank's
    experts may receive from its EP group); FSSDP's planner caps a rank at (1 + slack) x mean."""
    moe = m.moe
    T = lay.micro_tokens
    routed = lay.tokens // lay.tp if lay.tp > 1 and lay.etp == 1 else lay.tokens
    rows = routed * moe.top_k
    if moe.capacity_factor is None:
        computed = rows
        if lay.fssdp_slack is not None:
            computed = math.ceil(rows * (1 + lay.fssdp_slack))
        return rows, computed
    # capacity is computed from the whole micro-batch every TP (and CP) rank routes
    C = expert_capacity(T, moe.num_experts, moe.top_k, moe.capacity_factor, moe.min_capacity)
    bound = moe.num_experts * C
    sent = bound if moe.pad_to_capacity else min(rows, bound)
    computed = bound if moe.pad_to_capacity or lay.ep > 1 else sent
    return sent, computed


def moe_bytes(m: ModelConfig, lay: ActivationLayout) -> int:
    """The MoE layer per micro-batch: router, expert rows, combine, shared experts."""
    moe, a, D = m.moe, lay.act, m.dim
    E, K = moe.num_experts, moe.top_k
    # fp32 router input (the whole micro-batch, gathered under TP and CP), scores, sort indices,
    # weights
    router = lay.micro_tokens * (FP32 * D + 12 * E + FP32 * K + FP32)
    sent, computed = routed_rows(m, lay)
    swiglu = moe.activation == "swiglu"
    F = moe.hidden_dim // lay.etp
    per_row = linear_input(D, 2 if swiglu else 1, lay.bf16) + (4 if swiglu else 2) * F * a
    experts = computed * per_row
    combine = sent * (a * D + 20)  # expert outputs (weights' gradient), row index and weight
    shared = 0
    if moe.num_shared_experts > 0 or moe.shared_hidden_dim:
        # the shared experts read the fp32 router input (no copy in fp32) on this rank's chunk
        extra = 2 * 2 * D if lay.bf16 else 0
        shared = lay.sp_tokens * (extra + (4 if swiglu else 2) * moe.shared_hidden * a)
    return router + experts + combine + shared


def block_bytes(m: ModelConfig, layer_id: int, lay: ActivationLayout, weight_cast: int = 0) -> int:
    """Everything decoder block ``layer_id`` keeps for backward per micro-batch (bytes), plus
    ``weight_cast``: its weights' bf16 casts under autocast (0 in fp32)."""
    norms = 2 * lay.sp_tokens * residual_norm(m)
    ffn = moe_bytes(m, lay) if m.is_moe_layer(layer_id) else dense_ffn_bytes(m, lay)
    return norms + attention_bytes(m, lay) + ffn + weight_cast


def checkpointed_block_bytes(m: ModelConfig, lay: ActivationLayout) -> int:
    """A block under activation checkpointing keeps its fp32 input only."""
    return lay.sp_tokens * FP32 * m.dim


def head_bytes(m: ModelConfig, lay: ActivationLayout) -> int:
    """The last stage's final norm, head input and the fp32 logits with cross-entropy's fp32
    log-probabilities (8 V bytes per token; every TP rank holds the gathered logits)."""
    return (
        lay.sp_tokens * residual_norm(m)
        + lay.tokens * linear_input(m.dim, 1, lay.bf16)
        + lay.tokens * 2 * FP32 * m.vocab_size
    )


@dataclass
class ChunkActivations:
    """One pipeline chunk's layers (``layers``), whether it ends with the head, and the bf16
    weight casts of each of its layers (layer id -> bytes; empty in fp32)."""

    layers: range
    last: bool
    weight_casts: dict[int, int] = field(default_factory=dict)

    def full(self, m: ModelConfig, lay: ActivationLayout) -> int:
        total = sum(block_bytes(m, i, lay, self.weight_casts.get(i, 0)) for i in self.layers)
        return total + (head_bytes(m, lay) if self.last else 0)

    def checkpointed(self, m: ModelConfig, lay: ActivationLayout) -> int:
        total = len(self.layers) * checkpointed_block_bytes(m, lay)
        return total + (head_bytes(m, lay) if self.last else 0)

    def largest_block(self, m: ModelConfig, lay: ActivationLayout) -> int:
        return max(
            (block_bytes(m, i, lay, self.weight_casts.get(i, 0)) for i in self.layers),
            default=0,
        )


def in_flight(
    schedule: str, pp: int, pp_rank: int, n_micro: int, virtual_stages: int = 1
) -> list[int]:
    """Micro-batches whose activations a pp rank holds at once, per local chunk, under the
    schedule (torch's): none without PP: 1; GPipe: every micro-batch; 1F1B: ``min(n, pp - p)``
    (its warm-up forwards); interleaved 1F1B: its ``min((v - 1) * m + 2 (pp - 1 - p), n v)``
    warm-up forwards plus one, chunk by chunk in rounds of ``m = n / max(1, n / pp)``."""
    if pp == 1:
        return [1]
    if schedule == "gpipe":
        return [n_micro]
    if schedule == "1f1b":
        return [min(n_micro, pp - pp_rank)]
    per_round = n_micro // max(1, n_micro // pp)
    warmup = min(
        (virtual_stages - 1) * per_round + 2 * (pp - 1 - pp_rank), n_micro * virtual_stages
    )
    counts = [0] * virtual_stages
    for op in range(min(warmup + 1, n_micro * virtual_stages)):
        counts[(op // per_round) % virtual_stages] += 1
    return counts


@dataclass
class ActivationEstimate:
    """A rank's activation bytes: ``full`` without checkpointing, ``checkpointed`` with it (the
    block inputs of every micro-batch in flight plus one block recomputed at a time), and the
    micro-batches in flight per chunk."""

    full: int
    checkpointed: int
    per_micro_batch: int
    per_micro_batch_checkpointed: int
    in_flight: list[int]


def estimate(
    m: ModelConfig, lay: ActivationLayout, chunks: list[ChunkActivations], flight: list[int]
) -> ActivationEstimate:
    """Sum the chunks' activations over the micro-batches in flight (``flight``, one count per
    chunk, from :func:`in_flight`)."""
    full = sum(n * c.full(m, lay) for n, c in zip(flight, chunks))
    ckpt = sum(n * c.checkpointed(m, lay) for n, c in zip(flight, chunks))
    recompute = max((c.largest_block(m, lay) for c in chunks), default=0)
    return ActivationEstimate(
        full=full,
        checkpointed=ckpt + recompute,
        per_micro_batch=sum(c.full(m, lay) for c in chunks),
        per_micro_batch_checkpointed=sum(c.checkpointed(m, lay) for c in chunks) + recompute,
        in_flight=flight,
    )
