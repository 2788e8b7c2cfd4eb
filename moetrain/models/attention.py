"""Causal self-attention: grouped-query heads (GQA) with RoPE, optional QK-norm and sliding
window; and DeepSeek's multi-head latent attention (MLA).

Legend: B sequences, S sequence length, D model dim, H query heads, G key/value heads (GQA
groups; H % G == 0), d head dim. MLA: Q query latent rank (``q_lora_rank``), C key/value latent
rank (``kv_lora_rank``), n unrotated q/k head dim, r RoPE q/k head dim, k = n + r q/k head dim,
v value head dim.

GQA: ``nn.Linear`` named ``wq`` [D -> H*d], ``wk``/``wv`` [D -> G*d] (bias when
``model.qkv_bias``) and ``wo`` [H*d -> D] (no bias). Softmax scale ``1/sqrt(d)``.

MLA (:class:`MLAttention`, ``transformers``' ``DeepseekV3Attention``): queries ``wq``
[D -> H*k], or ``wq_b(q_norm(wq_a(x)))`` with ``wq_a`` [D -> Q], ``q_norm`` RMSNorm(Q), ``wq_b``
[Q -> H*k]; ``wkv_a`` [D -> C + r] gives the key/value latent and one RoPE key part shared by all
heads; ``wkv_b(kv_norm(latent))`` [C -> H*(n + v)] gives each head's unrotated key part and its
value; ``wo`` [H*v -> D]. No biases. Softmax scale ``1/sqrt(k)``, times YaRN's
``m(yarn_mscale_all_dim)**2`` (``moetrain.models.rope.yarn_softmax_factor``).

Head counts are read from the projection outputs at run time (``view(B, S, -1, d)``), so a
tensor-parallel plan that shards the projections by heads needs no change here (GQA; tensor
parallelism does not support MLA). Attention runs through ``F.scaled_dot_product_attention``
(``is_causal``, or an explicit boolean mask for a sliding window).

Document masking (``data.document_mask``): both classes take a keyword ``mask`` built once per
forward by ``moetrain.models.documents.attention_mask`` — a boolean ``[B, 1, S, S]`` (SDPA) or,
on CUDA, a flex-attention ``BlockMask`` — which already holds the causal and sliding-window
rule; cos/sin then come per row (``[B, S, d]``). A keyword, so tensor parallelism's
``PrepareModuleInput`` (positional layouts for x, cos, sin) passes it through unchanged; the
mask is over the full (gathered) sequence, as attention is.

Context parallelism sets ``context_parallel`` on both classes from outside
(``moetrain.parallel.cp``): an object whose ``attention(q, k, v, scale)`` attends this rank's
query chunks over the whole sequence (a ring exchange of key/value chunks); None runs SDPA here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.models.config import ModelConfig
from moetrain.models.documents import AttentionMask, flex_attention
from moetrain.models.norms import RMSNorm
from moetrain.models.rope import apply_rope, deinterleave, yarn_softmax_factor

# DeepSeek's latent norms keep RMSNorm's default epsilon whatever model.norm_eps (as its
# reference code and transformers' DeepseekV3Attention)
LATENT_NORM_EPS = 1e-6


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """``[S, S]`` boolean mask, True where query i may attend key j: ``i - window < j <= i``
    (at most ``window`` positions, itself included — ``transformers``' Mistral window)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def causal_attention(
    q_BHSk: Tensor,
    k_BGSk: Tensor,
    v_BGSv: Tensor,
    sliding_window: int | None,
    scale: float | None = None,
    mask: AttentionMask | None = None,
) -> Tensor:
    """SDPA over a causal (and, when shorter than S, sliding-window) mask; ``scale`` None =
    ``1/sqrt(k)``. A document ``mask`` (boolean ``[B, 1, S, S]`` or flex ``BlockMask``) replaces
    the causal and window rule: it holds both. Returns ``o_BHSv``."""
    S = q_BHSk.shape[-2]
    gqa = q_BHSk.shape[1] != k_BGSk.shape[1]
    if mask is not None:
        if isinstance(mask, Tensor):
            return F.scaled_dot_product_attention(
                q_BHSk, k_BGSk, v_BGSv, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        return flex_attention(q_BHSk, k_BGSk, v_BGSv, mask, scale)
    if sliding_window is None or sliding_window >= S:
        return F.scaled_dot_product_attention(
            q_BHSk, k_BGSk, v_BGSv, is_causal=True, scale=scale, enable_gqa=gqa
        )
    mask_SS = sliding_window_mask(S, sliding_window, q_BHSk.device)
    return F.scaled_dot_product_attention(
        q_BHSk, k_BGSk, v_BGSv, attn_mask=mask_SS, scale=scale, enable_gqa=gqa
    )


def attend(
    context_parallel: Any,
    q_BHSk: Tensor,
    k_BGSk: Tensor,
    v_BGSv: Tensor,
    sliding_window: int | None,
    scale: float | None = None,
    mask: AttentionMask | None = None,
) -> Tensor:
    """:func:`causal_attention`, or the context-parallel attention when one is set. Raises
    ``ValueError`` for a window or a document mask with context parallelism (its attention is
    full causal; config validation refuses both first)."""
    if context_parallel is not None:
        if mask is not None or sliding_window is not None:
            raise ValueError(
                "parallel.cp: context parallelism runs full causal attention; it supports "
                "neither model.sliding_window nor data.document_mask"
            )
        return context_parallel.attention(q_BHSk, k_BGSk, v_BGSv, scale)
    return causal_attention(q_BHSk, k_BGSk, v_BGSv, sliding_window, scale, mask)


class Attention(nn.Module):
    """``attention(x_BSD, cos_Sd, sin_Sd, mask=None) -> y_BSD``; cos/sin come from
    ``RotaryEmbedding`` (``[B, S, d]`` with per-row positions); ``mask`` see the module doc."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, G, d = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.head_dim = d
        self.sliding_window = cfg.sliding_window
        self.context_parallel: Any = None  # set by moetrain.parallel.cp
        self.wq = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.wk = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.wv = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * d, D, bias=False)
        self.qk_norm = cfg.qk_norm
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * d, cfg.norm_eps), RMSNorm(G * d, cfg.norm_eps)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(std) q/k/v, normal(out_std) output projection, zero biases, unit norms."""
        for proj in (self.wq, self.wk, self.wv):
            nn.init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, RMSNorm):
                norm.reset_parameters()

    def forward(
        self, x_BSD: Tensor, cos_Sd: Tensor, sin_Sd: Tensor, *, mask: AttentionMask | None = None
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        d = self.head_dim
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHd, k_BSGd, v_BSGd = q.view(B, S, -1, d), k.view(B, S, -1, d), v.view(B, S, -1, d)
        if self.qk_norm == "head":  # Qwen3: each head over d
            q_BSHd, k_BSGd = self.q_norm(q_BSHd), self.k_norm(k_BSGd)
        q_BSHd = apply_rope(q_BSHd, cos_Sd, sin_Sd)
        k_BSGd = apply_rope(k_BSGd, cos_Sd, sin_Sd)
        o_BHSd = attend(
            self.context_parallel,
            q_BSHd.transpose(1, 2),
            k_BSGd.transpose(1, 2),
            v_BSGd.transpose(1, 2),
            self.sliding_window,
            mask=mask,
        )
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))


class MLAttention(nn.Module):
    """``attention(x_BSD, cos_Sr, sin_Sr, mask=None) -> y_BSD``: multi-head latent attention;
    cos/sin come from ``RotaryEmbedding`` (over ``qk_rope_head_dim``); ``mask`` as
    :class:`Attention`'s."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H = cfg.dim, cfg.num_heads
        n, r, v, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank = n, r, v, C
        self.rope_interleave = cfg.rope_interleave
        self.sliding_window = cfg.sliding_window
        self.context_parallel: Any = None  # set by moetrain.parallel.cp
        self.scale = (n + r) ** -0.5 * yarn_softmax_factor(cfg)
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(D, H * (n + r), bias=False)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (n + r), bias=False)
        self.wkv_a = nn.Linear(D, C + r, bias=False)
        self.kv_norm = RMSNorm(C, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(C, H * (n + v), bias=False)
        self.wo = nn.Linear(H * v, D, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(std) input and latent projections, normal(out_std) output projection, unit
        norms."""
        if self.q_lora_rank is None:
            nn.init.normal_(self.wq.weight, std=std)
        else:
            nn.init.normal_(self.wq_a.weight, std=std)
            self.q_norm.reset_parameters()
            nn.init.normal_(self.wq_b.weight, std=std)
        nn.init.normal_(self.wkv_a.weight, std=std)
        self.kv_norm.reset_parameters()
        nn.init.normal_(self.wkv_b.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(
        self, x_BSD: Tensor, cos_Sr: Tensor, sin_Sr: Tensor, *, mask: AttentionMask | None = None
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        n, r = self.nope_dim, self.rope_dim
        q = self.wq(x_BSD) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope_BSHn, q_rope_BSHr = q.view(B, S, -1, n + r).split([n, r], dim=-1)
        latent_BSC, k_rope_BSr = self.wkv_a(x_BSD).split([self.kv_rank, r], dim=-1)
        kv_BSHx = self.wkv_b(self.kv_norm(latent_BSC)).view(B, S, -1, n + self.v_dim)
        k_nope_BSHn, v_BSHv = kv_BSHx.split([n, self.v_dim], dim=-1)
        q_rope_BSHr = apply_rope(self._rope_layout(q_rope_BSHr), cos_Sr, sin_Sr)
        k_rope_BS1r = apply_rope(self._rope_layout(k_rope_BSr[:, :, None]), cos_Sr, sin_Sr)
        q_BSHk = torch.cat((q_nope_BSHn, q_rope_BSHr), dim=-1)
        k_BSHk = torch.cat((k_nope_BSHn, k_rope_BS1r.expand_as(q_rope_BSHr)), dim=-1)
        o_BHSv = attend(
            self.context_parallel,
            q_BSHk.transpose(1, 2),
            k_BSHk.transpose(1, 2),
            v_BSHv.transpose(1, 2),
            self.sliding_window,
            self.scale,
            mask,
        )
        return self.wo(o_BHSv.transpose(1, 2).reshape(B, S, -1))

    def _rope_layout(self, x_BSHr: Tensor) -> Tensor:
        # q and k get the same permutation of their RoPE dims, so q·k does not depend on it
        return deinterleave(x_BSHr) if self.rope_interleave else x_BSHr
