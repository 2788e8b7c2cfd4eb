"""Ablation baselines without learned parameters: ``router_type: random`` and ``hash``.

Legend: T tokens, D model dim, E experts, K top-k.

Both give every chosen expert the weight ``routed_scaling_factor / K`` and return no logits or
probabilities (so no aux losses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moetrain.moe import noise as noise_streams
from moetrain.moe.noise import TokenNoise
from moetrain.moe.router import Router, RouterOutput

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig


class RandomRouter(Router):
    """K distinct experts drawn uniformly per token, weights 1/K: the K largest of E
    counter-keyed uniforms (:mod:`moetrain.moe.noise`), so a token's experts depend on its key
    (seed, step, layer, global position) only, not on the layout or torch's RNG."""

    draws_noise = True

    def forward(
        self, x_TD: Tensor, token_ids_T: Tensor | None = None, noise: TokenNoise | None = None
    ) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.cfg.num_experts, self.cfg.top_k
        noise = TokenNoise.local(T, x_TD.device) if noise is None else noise
        draws_TE = noise.uniform(noise_streams.RANDOM_ROUTER, E)
        # ties (24-bit draws) go to the lower expert index: a stable sort
        topk_ids_TK = torch.sort(draws_TE, dim=-1, descending=True, stable=True).indices[:, :K]
        return RouterOutput(topk_ids_TK, _equal_weights(T, K, self.cfg, x_TD.device))


class HashRouter(Router):
    """Hash Layers: experts are a fixed hash of the token id, weights 1/K.

    Expert k of token id v is ``(h(v) + k * (E // K)) mod E``: K distinct experts per token.
    Raises ``ValueError`` without token ids.
    """

    needs_token_ids = True

    def forward(
        self, x_TD: Tensor, token_ids_T: Tensor | None = None, noise: TokenNoise | None = None
    ) -> RouterOutput:
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
