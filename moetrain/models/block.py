"""One decoder layer: pre-norm residual attention (GQA or MLA), then a dense MLP or an MoE layer.

Legend: B sequences, S sequence length, D model dim, d RoPE head dim.

``h = x + attention(attention_norm(x)); out = h + ffn(ffn_norm(h))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moetrain.models.attention import Attention, MLAttention
from moetrain.models.config import ModelConfig
from moetrain.models.documents import AttentionMask
from moetrain.models.mlp import FeedForward
from moetrain.models.norms import RMSNorm
from moetrain.moe.layer import MoELayer
from moetrain.phases import phase


class TransformerBlock(nn.Module):
    """Decoder layer ``layer_id``; its feed-forward is an ``MoELayer`` when
    ``cfg.is_moe_layer(layer_id)`` (``moe_idx`` = its index among the MoE layers), else a dense
    ``FeedForward`` of hidden size ``cfg.dense_hidden_dim``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, moe_idx: int | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention: Attention | MLAttention
        self.attention = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: MoELayer | FeedForward
        if cfg.is_moe_layer(layer_id):
            self.feed_forward = MoELayer(cfg.moe, layer_idx=moe_idx)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.dense_hidden_dim)
        self.activation_checkpointing = False

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute this block's activations in backward (non-reentrant torch checkpoint); set
        by moetrain.parallel.parallelize from parallel.activation_checkpointing. An MoE layer
        is told, so that it keeps what its recomputation needs."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self._activation_checkpointing = value
        if isinstance(self.feed_forward, MoELayer):
            self.feed_forward.recomputed_in_backward = value

    @property
    def is_moe(self) -> bool:
        return isinstance(self.feed_forward, MoELayer)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.attention.reset_parameters(std, out_std)
        self.ffn_norm.reset_parameters()
        self.feed_forward.reset_parameters(std, out_std)

    def forward(
        self,
        x_BSD: Tensor,
        cos_Sd: Tensor,
        sin_Sd: Tensor,
        tokens_BS: Tensor | None = None,
        mask: AttentionMask | None = None,
    ) -> Tensor:
        """``tokens_BS`` (the input token ids) reach the MoE router (``router_type='hash'``);
        ``mask`` (document masking, ``moetrain.models.documents.attention_mask``) the attention,
        with cos/sin then ``[B, S, d]``."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # the mask goes through checkpoint too: the recomputed attention must see it
            return checkpoint(
                self._forward, x_BSD, cos_Sd, sin_Sd, tokens_BS, mask, use_reentrant=False
            )
        return self._forward(x_BSD, cos_Sd, sin_Sd, tokens_BS, mask)

    def _forward(
        self,
        x_BSD: Tensor,
        cos_Sd: Tensor,
        sin_Sd: Tensor,
        tokens_BS: Tensor | None,
        mask: AttentionMask | None = None,
    ) -> Tensor:
        attn_in_BSD = self.attention_norm(x_BSD)
        with phase("attention"):  # a named range: profiler traces, moetrain.phases timing
            # a keyword: TP's PrepareModuleInput lays out the positional (x, cos, sin) only
            attn_BSD = self.attention(attn_in_BSD, cos_Sd, sin_Sd, mask=mask)
        h_BSD = x_BSD + attn_BSD
        normed_BSD = self.ffn_norm(h_BSD)
        if isinstance(self.feed_forward, MoELayer):
            return h_BSD + self.feed_forward(normed_BSD, token_ids=tokens_BS)
        return h_BSD + self.feed_forward(normed_BSD)
