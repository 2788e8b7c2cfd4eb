"""Rotary position embedding (RoPE), rotate-half convention as in ``transformers``' Llama.

Legend: B sequences, S positions, d rotated head dim (``ModelConfig.rope_head_size``: the whole
head with GQA, ``qk_rope_head_dim`` with MLA), rotated in two halves of d/2 frequencies.

Scalings (``model.rope_scaling``):
- ``none``: ``inv_freq[i] = theta^(-2i/d)``.
- ``linear``: positions divided by ``rope_scaling_factor`` (= inverse frequencies divided).
- ``yarn``: per frequency a blend of the interpolated (``inv_freq / factor``) and the original
  frequencies; the blend weight ramps linearly between the dims at which the original context
  ``rope_original_max_seq_len`` holds ``yarn_beta_fast`` and ``yarn_beta_slow`` rotations, as
  ``transformers``' ``_compute_yarn_parameters``. With ``m(x) = 0.1 * x * ln(factor) + 1``, cos
  and sin are multiplied by ``m(yarn_mscale) / m(yarn_mscale_all_dim)`` when both are nonzero,
  else by ``m(1)`` (so the rotated part of q·k scales by its square), and MLA multiplies its
  softmax scale by ``m(yarn_mscale_all_dim)**2`` when that is nonzero
  (:func:`yarn_softmax_factor`), all as ``transformers`` does with the rope parameters
  ``mscale``/``mscale_all_dim`` (absent = 0). DeepSeek-V3 sets both to 1: cos/sin
  unscaled and every q·k dim, rotated or not, scaled by ``m(1)**2``. With GQA every head dim is
  rotated, so ``m(1)`` on cos/sin is that same temperature.

Nothing is cached on the module: cos/sin are recomputed from the positions at each forward
(d/2 frequencies, negligible), so meta-device construction and dtype casts need no buffers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moetrain.models.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature ``0.1 * mscale * ln(factor) + 1`` (1 when ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """The cos/sin multiplier of YaRN for a context extension ``factor``."""
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_softmax_factor(cfg: ModelConfig) -> float:
    """The multiplier of MLA's softmax scale: ``m(yarn_mscale_all_dim)**2`` under YaRN when
    ``yarn_mscale_all_dim`` is nonzero, else 1."""
    if cfg.rope_scaling != "yarn" or not cfg.yarn_mscale_all_dim:
        return 1.0
    return yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim) ** 2


class RotaryEmbedding:
    """``rope(positions_S) -> (cos_Sd, sin_Sd)`` (or ``[B, S]`` -> ``[B, S, d]``) in fp32, for
    :func:`apply_rope`."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.head_dim = cfg.rope_head_size
        self.theta = cfg.rope_theta
        self.scaling = cfg.rope_scaling
        self.factor = cfg.rope_scaling_factor
        self.original_max_seq_len = cfg.rope_original_max_seq_len or cfg.max_seq_len
        self.beta_fast = cfg.yarn_beta_fast
        self.beta_slow = cfg.yarn_beta_slow
        self.attention_factor = (
            yarn_attention_factor(self.factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
            if self.scaling == "yarn"
            else 1.0
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

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions`` ``[S]`` (every row alike) or ``[B, S]`` (per row, e.g. restarting in
        each packed document) -> cos and sin ``[S, d]`` or ``[B, S, d]``."""
        freqs = positions.float()[..., None] * self.inv_freq(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def deinterleave(x: Tensor) -> Tensor:
    """``[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]`` over the last dim: pairs rotated
    together become the two halves :func:`rotate_half` pairs up."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rope(x_BSHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x_BSHd`` (any number of heads H) by the angles of each position; x's dtype.
    ``cos``/``sin``: ``[S, d]`` (shared by the rows) or ``[B, S, d]`` (per row)."""
    cos = cos.to(x_BSHd.dtype).unsqueeze(-2)  # broadcast over the heads
    sin = sin.to(x_BSHd.dtype).unsqueeze(-2)
    return x_BSHd * cos + rotate_half(x_BSHd) * sin
