"""Causal self-attention with grouped-query heads (GQA), RoPE, optional QK-norm and sliding window.

Legend: B sequences, S sequence length, D model dim, H query heads, G key/value heads (GQA
groups; H % G == 0), d head dim.

Projections are ``nn.Linear`` named ``wq`` [D -> H*d], ``wk``/``wv`` [D -> G*d] (bias when
``model.qkv_bias``) and ``wo`` [H*d -> D] (no bias). The head counts are read from the projection
outputs at run time (``view(B, S, -1, d)``), so a tensor-parallel plan that shards the
projections by heads needs no change here. Attention runs through
``F.scaled_dot_product_attention`` (``is_causal``, or an explicit boolean mask for a sliding
window) with the default scale ``1/sqrt(d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.models.config import ModelConfig
from moetrain.models.norms import RMSNorm
from moetrain.models.rope import apply_rope


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """``[S, S]`` boolean mask, True where query i may attend key j: ``i - window < j <= i``
    (at most ``window`` positions, itself included — ``transformers``' Mistral window)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


class Attention(nn.Module):
    """``attention(x_BSD, cos_Sd, sin_Sd) -> y_BSD``; cos/sin come from ``RotaryEmbedding``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, G, d = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.head_dim = d
        self.sliding_window = cfg.sliding_window
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

    def forward(self, x_BSD: Tensor, cos_Sd: Tensor, sin_Sd: Tensor) -> Tensor:
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
        o_BHSd = self._attend(
            q_BSHd.transpose(1, 2), k_BSGd.transpose(1, 2), v_BSGd.transpose(1, 2)
        )
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))

    def _attend(self, q_BHSd: Tensor, k_BGSd: Tensor, v_BGSd: Tensor) -> Tensor:
        S = q_BHSd.shape[-2]
        gqa = q_BHSd.shape[1] != k_BGSd.shape[1]
        if self.sliding_window is None or self.sliding_window >= S:
            return F.scaled_dot_product_attention(
                q_BHSd, k_BGSd, v_BGSd, is_causal=True, enable_gqa=gqa
            )
        mask_SS = sliding_window_mask(S, self.sliding_window, q_BHSd.device)
        return F.scaled_dot_product_attention(
            q_BHSd, k_BGSd, v_BGSd, attn_mask=mask_SS, enable_gqa=gqa
        )
