"""Rotary position embedding (RoPE), rotate-half convention as in ``transformers``' Llama.

Legend: S positions, d head dim (rotated in two halves of d/2 frequencies).

Scalings (``model.rope_scaling``):
- ``none``: ``inv_freq[i] = theta^(-2i/d)``.
- ``linear``: positions divided by ``rope_scaling_factor`` (= inverse frequencies divided).
- ``yarn``: per frequency a blend of the interpolated (``inv_freq / factor``) and the original
  frequencies; the blend weight ramps linearly between the dims at which the original context
  ``rope_original_max_seq_len`` holds ``yarn_beta_fast`` and ``yarn_beta_slow`` rotations, as
  ``transformers``' ``_compute_yarn_parameters``. cos and sin are multiplied by
  ``0.1 * ln(factor) + 1``, so q·k scales by its square: with every head dim rotated this equals
  DeepSeek-V3's softmax-scale ``mscale**2`` (``mscale_all_dim = 1``).

Nothing is cached on the module: cos/sin are recomputed from the positions at each forward
(d/2 frequencies, negligible), so meta-device construction and dtype casts need no buffers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moetrain.models.config import ModelConfig


def yarn_attention_factor(factor: float) -> float:
    """The cos/sin multiplier of YaRN for a context extension ``factor``."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


class RotaryEmbedding:
    """``rope(positions_S) -> (cos_Sd, sin_Sd)`` in fp32, for :func:`apply_rope`."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.head_dim = cfg.head_size
        self.theta = cfg.rope_theta
        self.scaling = cfg.rope_scaling
        self.factor = cfg.rope_scaling_factor
        self.original_max_seq_len = cfg.rope_original_max_seq_len or cfg.max_seq_len
        self.beta_fast = cfg.yarn_beta_fast
        self.beta_slow = cfg.yarn_beta_slow
        self.attention_factor = (
            yarn_attention_factor(self.factor) if self.scaling == "yarn" else 1.0
        )

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """The d/2 inverse frequencies (fp32), scaling applied."""
        d = self.head_dim
        base = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=device).float() / d))
        if self.scaling == "linear":
            return base / self.factor
        if self.scaling == "yarn":
            return self._yarn_blend(base)
        return base

    def _yarn_blend(self, base: Tensor) -> Tensor:
        d = self.head_dim

        def dim_with_rotations(num_rotations: float) -> float:
            # The (fractional) dim index whose wavelength fits num_rotations times in the context.
            ratio = self.original_max_seq_len / (num_rotations * 2 * math.pi)
            return d * math.log(ratio) / (2 * math.log(self.theta))

        low = max(math.floor(dim_with_rotations(self.beta_fast)), 0)
        high = min(math.ceil(dim_with_rotations(self.beta_slow)), d - 1)
        span = (high - low) or 0.001  # avoid 0/0 when the range collapses
        ramp = ((torch.arange(d // 2, device=base.device).float() - low) / span).clamp(0, 1)
        # ramp 0: high frequencies keep their value (extrapolate); 1: interpolate by factor.
        return base / self.factor * ramp + base * (1 - ramp)

    def __call__(self, positions_S: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions_S.float()[:, None] * self.inv_freq(positions_S.device)[None, :]
        angles_Sd = torch.cat((freqs, freqs), dim=-1)
        return angles_Sd.cos() * self.attention_factor, angles_Sd.sin() * self.attention_factor


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BSHd: Tensor, cos_Sd: Tensor, sin_Sd: Tensor) -> Tensor:
    """Rotate ``x_BSHd`` (any number of heads H) by the angles of each position; x's dtype."""
    cos = cos_Sd.to(x_BSHd.dtype)[:, None, :]
    sin = sin_Sd.to(x_BSHd.dtype)[:, None, :]
    return x_BSHd * cos + rotate_half(x_BSHd) * sin
