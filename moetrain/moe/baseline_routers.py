"""Ablation baselines without learned parameters: ``router_type: random`` and ``hash``.

Legend: T tokens, D model dim, E experts, K top-k.

Both give every chosen expert the weight ``routed_scaling_factor / K`` and return no logits or
probabilities (so no aux losses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moetrain.moe.router import Router, RouterOutput

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


class RandomRouter(Router):
    """K distinct experts drawn uniformly per token (from the global torch RNG), weights 1/K."""

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.cfg.num_experts, self.cfg.top_k
        draws_TE = torch.rand(T, E, device=x_TD.device)
        topk_ids_TK = draws_TE.topk(K, dim=-1).indices
        return RouterOutput(topk_ids_TK, _equal_weights(T, K, self.cfg, x_TD.device))


class HashRouter(Router):
    """Hash Layers: experts are a fixed hash of the token id, weights 1/K.

    Expert k of token id v is ``(h(v) + k * (E // K)) mod E``: K distinct experts per token.
    Raises ``ValueError`` without token ids.
    """

    needs_token_ids = True

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError(
                "model.moe.router_type='hash' needs the token ids: call layer(x, token_ids=ids)"
            )
        E, K = self.cfg.num_experts, self.cfg.top_k
        ids_T = token_ids_T.reshape(-1).long()
        if ids_T.shape[0] != x_TD.shape[0]:
            raise ValueError(f"token_ids has {ids_T.shape[0]} entries for {x_TD.shape[0]} tokens")
        base_T = hash_token_ids(ids_T) % E
        offsets_K = torch.arange(K, device=ids_T.device) * (E // K)
        topk_ids_TK = (base_T.unsqueeze(-1) + offsets_K) % E
        return RouterOutput(topk_ids_TK, _equal_weights(ids_T.shape[0], K, self.cfg, x_TD.device))


def hash_token_ids(ids: Tensor) -> Tensor:
    """Knuth's multiplicative hash of non-negative int64 ids into [0, 2**32)."""
    return ((ids % (1 << 31)) * 2654435761) % (1 << 32)


def _equal_weights(T: int, K: int, cfg: MoEConfig, device: torch.device) -> Tensor:
    return torch.full((T, K), cfg.routed_scaling_factor / K, device=device)
