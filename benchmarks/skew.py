"""Benchmark-only routing skew: force an MoE layer's expert choice to follow a chosen load
distribution while keeping its learned router (weights, aux losses and their gradients).

Legend: T tokens, E experts, K top-k.

Skews (expert 0 is the hottest; the experts keep their id order, so with static expert
parallelism the hot experts sit on the first EP ranks — the straggler case):

- ``uniform``: every expert equally likely;
- ``zipf1.0`` / ``zipf1.5``: expert i chosen with probability proportional to ``(i + 1) ** -s``;
- ``hot``: every token picks expert 0, its other K - 1 experts uniformly among the rest.

Each token picks K distinct experts (sampling without replacement). This is a hook for the
benchmark (``SkewedRouter`` replaces ``layer.router``); the training app has no such option.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moetrain.moe.noise import TokenNoise
from moetrain.moe.router import Router, RouterOutput

SKEWS = ("uniform", "zipf1.0", "zipf1.5", "hot")


def expert_probs(skew: str, num_experts: int) -> Tensor:
    """The per-expert choice weights of ``skew`` (fp64, sum 1; ``hot``: of the K - 1 others)."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    if skew == "uniform" or skew == "hot":
        p = torch.ones(num_experts, dtype=torch.float64)
        if skew == "hot":
            p[0] = 0.0
    elif skew.startswith("zipf"):
        p = ranks ** -float(skew[len("zipf") :])
    else:
        raise ValueError(f"unknown skew {skew!r}; choose from {SKEWS}")
    return p / p.sum()


def skewed_topk(
    num_tokens: int, num_experts: int, top_k: int, skew: str, generator: torch.Generator
) -> Tensor:
    """``[T, K]`` distinct expert ids per token drawn from ``skew`` (int64, CPU)."""
    p = expert_probs(skew, num_experts)
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.long)
    if skew == "hot":
        others = torch.multinomial(p.expand(num_tokens, -1), top_k - 1, False, generator=generator)
        return torch.cat([torch.zeros(num_tokens, 1, dtype=torch.long), others], 1)
    return torch.multinomial(p.expand(num_tokens, -1), top_k, False, generator=generator)


class SkewedRouter(Router):
    """Wraps a learned router: its scores, logits and probabilities as computed, but the top-k
    ids drawn from ``skew``; the combine weights are the router's probabilities of the forced
    experts, renormalized (so router gradients still flow).

    ``reset_parameters`` resets the wrapped router. ``record_load`` / ``update_expert_bias``
    stay no-ops: the forced ids are not the wrapped router's choice, so balancing its bias
    against them would be meaningless.
    """

    def __init__(self, router: Router, skew: str, top_k: int, seed: int = 0) -> None:
        super().__init__(router.cfg)
        expert_probs(skew, 2)  # validates the name
        self.inner, self.skew, self.top_k = router, skew, top_k
        self.generator = torch.Generator().manual_seed(seed)

    def reset_parameters(self, std: float = 0.02) -> None:
        self.inner.reset_parameters(std)

    draws_noise = True  # passed on to the wrapped router (e.g. its jitter)

    def forward(
        self, x_TD: Tensor, token_ids_T: Tensor | None = None, noise: TokenNoise | None = None
    ) -> RouterOutput:
        inner = self.inner
        out = (
            inner(x_TD, token_ids_T, noise=noise) if inner.draws_noise else inner(x_TD, token_ids_T)
        )
        if out.probs_TE is None:
            raise ValueError("SkewedRouter needs a learned router (probabilities)")
        T, E = out.probs_TE.shape
        ids = skewed_topk(T, E, self.top_k, self.skew, self.generator).to(x_TD.device)
        weights = out.probs_TE.gather(-1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(ids, weights, out.logits_TE, out.probs_TE)
