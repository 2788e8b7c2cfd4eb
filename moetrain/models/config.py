"""ModelConfig: the decoder's shape and options (it becomes ``model`` in the Hydra config).

Field types are the ones OmegaConf accepts (str validated against a set of choices, Optional,
no unions); ``validate()`` raises a ``ValueError`` naming ``model.<field>`` and the fix. The MoE
layer's options live in the nested ``moe`` (``model.moe.*``), whose ``dim`` must equal ``dim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn, Optional

from moetrain.moe.config import MoEConfig

ATTENTIONS = ("gqa", "mla")
ROPE_SCALINGS = ("none", "linear", "yarn")
QK_NORMS = ("none", "head", "full")
NORM_IMPLS = ("torch", "apex")


@dataclass
class ModelConfig:
    """A decoder-only transformer with optional MoE feed-forward layers.

    Layer ``i`` is an MoE layer iff ``i >= first_k_dense`` and
    ``(i - first_k_dense) % moe_layer_freq == 0``; the others use a dense SwiGLU MLP of hidden
    size ``dense_hidden_dim``. ``first_k_dense >= num_layers`` gives a dense model.

    Attention (``attention``):

    - ``gqa``: ``num_heads`` query heads, ``num_kv_heads`` key/value heads, each of ``head_dim``
      (None = ``dim // num_heads``), RoPE over the whole head. ``qk_norm``: ``none``; ``head`` =
      RMSNorm of each q/k head over head_dim (Qwen3); ``full`` = RMSNorm over the whole q
      projection ``[num_heads * head_dim]`` and the whole k projection
      ``[num_kv_heads * head_dim]`` (OLMoE).
    - ``mla``: DeepSeek-V2/V3 multi-head latent attention, ``num_heads`` heads. Queries come from
      ``dim`` directly (``q_lora_rank`` None, DeepSeek-V2-Lite) or through a normed latent of
      ``q_lora_rank``; keys and values from a shared normed latent of ``kv_lora_rank``. q/k heads
      are ``qk_nope_head_dim`` unrotated dims then ``qk_rope_head_dim`` RoPE dims (the RoPE key
      part is shared by all heads); value heads are ``v_head_dim``. ``rope_interleave``: the
      projections lay the RoPE dims out in pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's released
      weights), de-interleaved before the rotate-half rotation, as ``transformers``'
      ``rope_interleave``. ``num_kv_heads`` and ``head_dim`` are unused (not validated, except
      that ``head_dim`` must stay None); ``qkv_bias`` and ``qk_norm`` are rejected.

    ``sliding_window`` (Mistral; both attentions): a query attends to at most this many
    positions, itself included.

    ``norm_impl`` (every RMSNorm): ``torch`` (plain torch ops, fp32 statistics) or ``apex``
    (NVIDIA apex's fused RMSNorm kernel for CUDA inputs: the same function, parameters and
    checkpoints; CPU inputs take the torch ops; ``moetrain.models.norms``). Where apex must
    be importable is checked by the training config (``moetrain.config.validate``), not here: a
    checkpoint trained with ``apex`` loads and converts on a machine without it.

    RoPE: ``rope_scaling`` ``none``; ``linear`` (positions divided by ``rope_scaling_factor``);
    ``yarn`` (inverse-frequency blend with ``yarn_beta_fast``/``yarn_beta_slow`` over a context
    of ``rope_original_max_seq_len`` — None = ``max_seq_len``). YaRN's attention temperature,
    with ``m(x) = 0.1 * x * ln(factor) + 1`` (1 when factor <= 1), as ``transformers``'
    ``mscale``/``mscale_all_dim`` rope parameters (0 = absent): cos/sin are multiplied by
    ``m(yarn_mscale) / m(yarn_mscale_all_dim)`` when both are nonzero, else by ``m(1)``; MLA also
    multiplies its softmax scale by ``m(yarn_mscale_all_dim)**2`` when that is nonzero
    (DeepSeek), GQA does not (Llama). The defaults (1, 0) give ``m(1)`` on cos/sin only.
    """

    vocab_size: int = 384
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None
    attention: str = "gqa"
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    dense_hidden_dim: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_seq_len: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    qkv_bias: bool = False
    qk_norm: str = "none"
    sliding_window: Optional[int] = None
    norm_eps: float = 1e-5
    norm_impl: str = "torch"
    tie_embeddings: bool = False
    first_k_dense: int = 1
    moe_layer_freq: int = 1
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field (``model.<field>``)."""
        _positive(
            self, "vocab_size", "dim", "num_layers", "num_heads", "dense_hidden_dim",
            "max_seq_len", "moe_layer_freq",
        )  # fmt: skip
        if self.attention not in ATTENTIONS:
            _fail("attention", f"must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}")
        if self.attention == "mla":
            self._validate_mla()
        else:
            self._validate_heads()
        self._validate_rope()
        if self.qk_norm not in QK_NORMS:
            _fail("qk_norm", f"must be one of {', '.join(QK_NORMS)}; got {self.qk_norm!r}")
        if self.sliding_window is not None and not (
            isinstance(self.sliding_window, int) and self.sliding_window > 0
        ):
            _fail(
                "sliding_window", f"must be a positive integer or null, got {self.sliding_window}"
            )
        if not self.norm_eps > 0:
            _fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.norm_impl not in NORM_IMPLS:
            _fail("norm_impl", f"must be one of {', '.join(NORM_IMPLS)}; got {self.norm_impl!r}")
        if not self.init_std > 0:
            _fail("init_std", f"must be > 0, got {self.init_std}")
        if not isinstance(self.first_k_dense, int) or self.first_k_dense < 0:
            _fail("first_k_dense", f"must be an integer >= 0, got {self.first_k_dense!r}")
        self._validate_moe()

    def _validate_heads(self) -> None:
        _positive(self, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            _fail(
                "num_kv_heads",
                f"{self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                "pick a divisor of num_heads",
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                _fail(
                    "num_heads",
                    f"{self.num_heads} does not divide dim={self.dim}; "
                    "pick a divisor or set model.head_dim",
                )
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            _fail("head_dim", f"must be a positive integer or null, got {self.head_dim!r}")
        if self.head_size % 2:
            _fail("head_dim", f"must be even for RoPE, got {self.head_size}")

    def _validate_mla(self) -> None:
        _positive(self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.head_dim is not None:
            _fail(
                "head_dim",
                "is unused with model.attention=mla (head sizes are model.qk_nope_head_dim, "
                "model.qk_rope_head_dim and model.v_head_dim); set it to null",
            )
        if self.qkv_bias:
            _fail(
                "qkv_bias",
                "is not supported with model.attention=mla (DeepSeek's MLA projections have no "
                "bias); set it to false",
            )
        if self.qk_norm != "none":
            _fail(
                "qk_norm",
                f"{self.qk_norm!r} is not supported with model.attention=mla (MLA normalizes its "
                "q and kv latents instead); set it to none",
            )

    def _validate_rope(self) -> None:
        if not self.rope_theta > 0:
            _fail("rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.rope_scaling not in ROPE_SCALINGS:
            _fail(
                "rope_scaling",
                f"must be one of {', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}",
            )
        if not self.rope_scaling_factor > 0:
            _fail("rope_scaling_factor", f"must be > 0, got {self.rope_scaling_factor}")
        if self.rope_scaling == "none" and self.rope_scaling_factor != 1.0:
            _fail(
                "rope_scaling_factor",
                f"is {self.rope_scaling_factor} but model.rope_scaling is 'none'; "
                "set model.rope_scaling to linear or yarn, or the factor to 1.0",
            )
        original = self.rope_original_max_seq_len
        if original is not None and not (isinstance(original, int) and original > 0):
            _fail(
                "rope_original_max_seq_len", f"must be a positive integer or null, got {original}"
            )
        if not self.yarn_beta_fast > self.yarn_beta_slow > 0:
            _fail(
                "yarn_beta_fast",
                f"needs yarn_beta_fast > yarn_beta_slow > 0, got {self.yarn_beta_fast} and "
                f"{self.yarn_beta_slow}",
            )
        for name, default in (("yarn_mscale", 1.0), ("yarn_mscale_all_dim", 0.0)):
            value = getattr(self, name)
            if not value >= 0:
                _fail(name, f"must be >= 0 (0 = off), got {value}")
            if value != default and self.rope_scaling != "yarn":
                _fail(
                    name,
                    f"applies to model.rope_scaling=yarn only (got {self.rope_scaling!r}); "
                    f"leave it at {default}",
                )

    def _validate_moe(self) -> None:
        self.moe.validate()
        if self.moe.dim != self.dim:
            raise ValueError(
                f"model.moe.dim ({self.moe.dim}) must equal model.dim ({self.dim}); "
                "leave it to the interpolation ${model.dim}"
            )
        per_layer = self.moe.aux_loss_coeff_per_layer
        if per_layer is not None and len(per_layer) != self.num_moe_layers:
            raise ValueError(
                f"model.moe.aux_loss_coeff_per_layer: has {len(per_layer)} entries but the model "
                f"has {self.num_moe_layers} MoE layers; give one coefficient per MoE layer"
            )

    @property
    def head_size(self) -> int:
        """GQA's resolved head dimension (``head_dim``, or ``dim // num_heads`` when None)."""
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    @property
    def qk_head_size(self) -> int:
        """The q/k head dimension: ``qk_nope_head_dim + qk_rope_head_dim`` with MLA."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_size

    @property
    def v_head_size(self) -> int:
        """The value head dimension: ``v_head_dim`` with MLA."""
        return self.v_head_dim if self.attention == "mla" else self.head_size

    @property
    def rope_head_size(self) -> int:
        """The dims RoPE rotates per head: ``qk_rope_head_dim`` with MLA, the whole head else."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (0-based) has an MoE feed-forward."""
        offset = layer_idx - self.first_k_dense
        return offset >= 0 and offset % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"model.{name}: {why}")


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(name, f"must be a positive integer, got {value!r}")
