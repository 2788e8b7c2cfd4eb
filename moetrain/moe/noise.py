"""Counter-keyed randomness for routing: the same token draws the same noise at every layout.

Legend: T tokens, W draws per token.

Stochastic routing (router jitter, the random router) must not read per-rank RNG state:
data-parallel ranks would draw identical noise for different tokens, tensor-parallel ranks could
diverge after a resume at another layout, and no layout would equal the single process. Instead
every draw is a pure function of a key:

    (seed, phase, step, layer, stream, global token position, draw index)

``seed`` is ``train.seed``; ``phase`` is training or evaluation; ``step`` the optimizer step
(0-based, the step being computed; an evaluation after step n uses n); ``layer`` the MoE layer's
index among the model's MoE layers; ``stream`` names the use (one constant per stochastic part
below: a new stochastic part takes a new stream); the global token position is the token's
index in the step's global batch (``sample * seq_len + s``, the sample numbered as in
:mod:`moetrain.data.batches`), so it is the same whichever rank holds the token.

The hash is a chain of the 32-bit MurmurHash3 finalizer (a bijection with full avalanche) over
the key words, as counter-based generators (Philox, Threefry) are used in JAX and cuRAND; all
arithmetic is exact int64 on any device. A draw is the top 24 bits of the hash as an fp32 in
[0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9

TRAIN, EVAL = 0, 1  # phases

# streams: one per stochastic use
JITTER = 1  # TopKRouter input jitter: D draws per token
RANDOM_ROUTER = 2  # RandomRouter: E draws per token
DENSE_GATE = 3  # the dense-to-sparse gate's Gumbel noise: E draws per token


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32): split ``c`` in 16-bit halves so no
    intermediate exceeds 2**49 (int64 multiplication never overflows)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: Tensor | int) -> Tensor | int:
    """MurmurHash3's 32-bit finalizer, on Python ints or int64 tensors holding [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _absorb(h: Tensor | int, word: Tensor | int) -> Tensor | int:
    return fmix32(h ^ (word & MASK32))


@dataclass(frozen=True)
class NoiseKey:
    """The part of a draw's key shared by one call's tokens."""

    seed: int = 0
    phase: int = TRAIN
    step: int = 0
    layer: int = 0

    def prefix(self, stream: int) -> int:
        h = fmix32(GOLDEN32)
        for word in (self.seed, self.seed >> 32, self.phase, self.step, self.step >> 32):
            h = _absorb(h, word)
        for word in (self.layer, stream):
            h = _absorb(h, word)
        return int(h)


def counter_uniform(key: NoiseKey, stream: int, positions_T: Tensor, width: int) -> Tensor:
    """``[T, width]`` fp32 uniforms in [0, 1): draw ``j`` of the token at global position
    ``positions_T[t]`` (int64, >= 0) under ``key`` and ``stream``."""
    pos = positions_T.to(torch.int64).reshape(-1, 1)
    h = _absorb(_absorb(torch.full_like(pos, key.prefix(stream)), pos), pos >> 32)
    cols = torch.arange(width, dtype=torch.int64, device=pos.device)
    h_TW = fmix32(_absorb(h, _mul32(cols + 1, GOLDEN32)))
    assert isinstance(h_TW, Tensor)
    return (h_TW >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class TokenNoise:
    """Counter-keyed draws for one router call: ``uniform(stream, W)`` is ``[T, W]``."""

    key: NoiseKey
    positions_T: Tensor

    def uniform(self, stream: int, width: int) -> Tensor:
        return counter_uniform(self.key, stream, self.positions_T, width)

    @staticmethod
    def local(num_tokens: int, device: torch.device) -> TokenNoise:
        """The key of a router called on its own: seed 0, step 0, positions 0..T-1."""
        return TokenNoise(NoiseKey(), torch.arange(num_tokens, device=device))


def global_positions(sample_offset: int, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Positions of a ``[batch, seq_len]`` micro-batch whose first sample is sample
    ``sample_offset`` of the global batch, in the layer's token order (sequence-major)."""
    start = sample_offset * seq_len
    return torch.arange(start, start + batch * seq_len, dtype=torch.int64, device=device)
