"""The base of the Hugging Face adapters: :class:`HFAdapter` maps one architecture's
``config.json`` to moetrain's :class:`ModelConfig` and back, says what a moetrain model needs
that the architecture cannot express (:meth:`HFAdapter.fits`), and names its tensors.

The base class is the plain Llama-style decoder; a family sets class attributes for what it
names or has differently and overrides the hooks (``*_from_hf``, ``*_to_hf``, ``*_fits``,
``extra_tensors_to_hf``, ``ignores``) where it computes something differently. Nothing here
asks which architecture it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.safetensors_io import tensor_dtype_name
from moetrain.models.config import ModelConfig
from moetrain.moe.config import MoEConfig
from moetrain.moe.routes import research_options


class ExportError(ValueError):
    """The model cannot be expressed in the requested architecture."""


def hf_get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``hf`` sets (not null), else ``default``: architectures call
    the same quantity differently (``num_local_experts``, ``num_experts``, ...)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


class HFAdapter:
    """One Hugging Face architecture: ``config.json`` both ways, the fit check, tensor names.

    Instances are stateless; the registry (``moetrain.checkpoint.hf.registry``) holds one per
    architecture, keyed by :attr:`name`.
    """

    name: ClassVar[str]  # config.json's model_type
    hf_class: ClassVar[str]  # config.json's architectures[0]
    moe: ClassVar[bool] = False

    # tensor names inside a decoder layer: the MoE module, one expert's (gate, up, down)
    # projections, the shared expert(s) and their sigmoid gate (None: none), the router's score
    # bias buffer (None: not stored)
    moe_block: ClassVar[str] = "mlp"
    experts: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    shared: ClassVar[str | None] = None
    shared_gate: ClassVar[str | None] = None
    expert_bias: ClassVar[str | None] = None

    # what the network has: q/k/v biases (none | config: a qkv_bias flag | always), model.qk_norm,
    # model.attention, the router's score function, MoE in every layer (no dense ones)
    qkv_bias: ClassVar[str] = "none"
    qk_norm: ClassVar[str] = "none"
    attention: ClassVar[str] = "gqa"
    score_func: ClassVar[str] = "softmax"
    moe_in_every_layer: ClassVar[bool] = False
    # how config.json states a sliding window: none (cannot export one) | plain (a
    # sliding_window key, null for none) | flag (Qwen2: use_sliding_window plus per-layer types)
    sliding_window: ClassVar[str] = "none"

    # ------------------------------------------------------------------------------ import

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        """moetrain's :class:`ModelConfig` for this architecture's ``config.json`` (a dict); a
        :class:`CheckpointError` names what moetrain cannot express."""
        self.check_hf(hf)
        fields = self.fields_from_hf(hf)
        try:
            return ModelConfig(**fields, moe=MoEConfig(**self.moe_from_hf(hf)))
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"the {self.name} config does not map to moetrain: {err}"
            ) from err

    def check_hf(self, hf: Mapping[str, Any]) -> None:
        """Raise a :class:`CheckpointError` for what the hub config sets that moetrain lacks."""
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"hidden_act={hf['hidden_act']!r}: moetrain's MLPs are SwiGLU (silu)"
            )
        if hf.get("mlp_bias"):
            raise CheckpointError("mlp_bias=true: moetrain's MLPs have no biases")
        if hf.get("attention_bias") and self.qkv_bias == "none":
            raise CheckpointError(
                "attention_bias=true (biases on q/k/v and the output projection): moetrain's "
                "attention output projection has no bias"
            )

    def fields_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """:class:`ModelConfig`'s fields but ``moe``."""
        D, L = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
        H = int(hf["num_attention_heads"])
        moe_layers = self.moe_layers_from_hf(hf, L) if self.moe else [False] * L
        first_k_dense, freq = _placement(moe_layers)
        window = self.window_from_hf(hf)
        head_dim = hf.get("head_dim")
        if head_dim is not None and D % H == 0 and head_dim == D // H:
            head_dim = None  # the default (dim // num_heads)
        return dict(
            vocab_size=int(hf["vocab_size"]),
            dim=D,
            num_layers=L,
            num_heads=H,
            num_kv_heads=int(hf.get("num_key_value_heads") or H),
            head_dim=None if head_dim is None else int(head_dim),
            dense_hidden_dim=int(hf.get("intermediate_size", _expert_hidden(hf))),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias == "always"
            or (self.qkv_bias == "config" and bool(hf.get("qkv_bias", True))),
            qk_norm=self.qk_norm,
            sliding_window=int(window) if window else None,
            first_k_dense=first_k_dense,
            moe_layer_freq=freq,
            init_std=float(hf.get("initializer_range", 0.02)),
            **_rope_from_hf(hf),
        )

    def moe_from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """:class:`MoEConfig`'s fields (computed for dense architectures too: unused there)."""
        num_experts = int(
            hf_get(hf, "num_local_experts", "num_experts", "n_routed_experts", default=8)
        )
        return dict(
            num_experts=num_experts,
            top_k=min(int(hf.get("num_experts_per_tok", 2)), num_experts),
            dim=int(hf["hidden_size"]),
            hidden_dim=_expert_hidden(hf),
            aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.01)),
            router_jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )

    def moe_layers_from_hf(self, hf: Mapping[str, Any], num_layers: int) -> list[bool]:
        """Which decoder layers are MoE (the base: every one)."""
        return [True] * num_layers

    def window_from_hf(self, hf: Mapping[str, Any]) -> Any:
        """The sliding window ``hf`` sets (falsy: full attention)."""
        if self.sliding_window == "plain" and hf.get("sliding_window"):
            return hf["sliding_window"]
        if not hf.get("use_sliding_window"):
            return None
        types = hf.get("layer_types") or []
        if any(t != "sliding_attention" for t in types):
            raise CheckpointError(
                "use_sliding_window with full-attention layers (max_window_layers / layer_types):"
                " moetrain applies one model.sliding_window to every layer"
            )
        return hf.get("sliding_window")

    # ------------------------------------------------------------------------------ export

    def config_to_hf(self, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
        """The hub ``config.json`` (a dict) of ``cfg`` with weights of ``dtype``; raises
        :class:`ExportError` naming everything that does not fit."""
        import transformers

        self.require_fit(cfg)
        config = transformers.AutoConfig.for_model(self.name, **self.fields_to_hf(cfg, dtype))
        return config.to_dict()

    def fields_to_hf(self, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
        """The arguments of ``transformers``' config class for ``cfg`` (which fits)."""
        fields: dict[str, Any] = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.dense_hidden_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_size,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            initializer_range=cfg.init_std,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters=_rope_to_hf(cfg),
            architectures=[self.hf_class],
            dtype=tensor_dtype_name(dtype),
        )
        if self.qkv_bias == "none":
            fields["attention_bias"] = False
        if self.qkv_bias == "config":
            fields["qkv_bias"] = cfg.qkv_bias
        if self.sliding_window == "plain" or cfg.sliding_window is not None:
            fields["sliding_window"] = cfg.sliding_window
        if self.sliding_window == "flag" and cfg.sliding_window is not None:
            fields.update(
                use_sliding_window=True,
                max_window_layers=0,
                layer_types=["sliding_attention"] * cfg.num_layers,
            )
        if self.moe:
            fields.update(self.moe_to_hf(cfg))
        return fields

    def moe_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The MoE part of :meth:`fields_to_hf` (the routing every MoE architecture states)."""
        m = cfg.moe
        return dict(
            num_experts_per_tok=m.top_k,
            router_aux_loss_coef=m.aux_loss_coeff,
            norm_topk_prob=m.norm_topk_prob,
        )

    # ------------------------------------------------------------------------- what fits

    def require_fit(self, cfg: ModelConfig) -> None:
        """Raise an :class:`ExportError` listing :meth:`fits`' reasons, if any."""
        bad = self.fits(cfg)
        if bad:
            raise ExportError(f"cannot export to {self.name}: " + "; ".join(bad))

    def fits(self, cfg: ModelConfig) -> list[str]:
        """What in ``cfg`` this architecture cannot express, each naming the setting (empty: it
        fits)."""
        bad = self._attention_fits(cfg)
        if not self.moe:
            if cfg.num_moe_layers:
                bad.append(f"{cfg.num_moe_layers} MoE layers ({self.name} is a dense architecture)")
            return bad
        if cfg.num_moe_layers == 0:
            bad.append(f"no MoE layer ({self.name} is an MoE architecture)")
        bad += self.placement_fits(cfg)
        bad += self._expert_fits(cfg)
        bad += self.routing_fits(cfg)
        bad += research_options(cfg.moe)  # null/zero-computation experts, top-p, ...
        bad += self.shared_fits(cfg)
        return bad

    def _attention_fits(self, cfg: ModelConfig) -> list[str]:
        bad: list[str] = []
        mla = cfg.attention == "mla"
        if mla != (self.attention == "mla"):
            uses = "MLA" if self.attention == "mla" else "grouped-query attention"
            bad.append(f"model.attention={'mla' if mla else 'gqa'} ({self.name} uses {uses})")
        if cfg.qk_norm != self.qk_norm:
            bad.append(f"model.qk_norm={cfg.qk_norm} ({self.name} has qk_norm={self.qk_norm})")
        if cfg.qkv_bias and self.qkv_bias == "none":
            bad.append(f"model.qkv_bias=true ({self.name} has no q/k/v bias)")
        if cfg.sliding_window is not None and self.sliding_window == "none":
            bad.append(f"model.sliding_window={cfg.sliding_window} ({self.name} has none)")
        return bad

    def placement_fits(self, cfg: ModelConfig) -> list[str]:
        """Which layers may be MoE (an MoE architecture)."""
        if self.moe_in_every_layer and cfg.num_moe_layers != cfg.num_layers:
            return [
                f"{cfg.num_layers - cfg.num_moe_layers} dense layers (model.first_k_dense="
                f"{cfg.first_k_dense}, model.moe_layer_freq={cfg.moe_layer_freq}; {self.name} "
                "has MoE in every layer)"
            ]
        return []

    def _expert_fits(self, cfg: ModelConfig) -> list[str]:
        m = cfg.moe
        bad: list[str] = []
        if m.activation != "swiglu":
            bad.append(f"model.moe.activation={m.activation} ({self.name} experts are SwiGLU)")
        if m.router_type != "learned":
            bad.append(f"model.moe.router_type={m.router_type} ({self.name} has a learned router)")
        if m.score_func != self.score_func:
            bad.append(f"model.moe.score_func={m.score_func} ({self.name} uses {self.score_func})")
        if m.logit_norm_scale is not None:
            bad.append("model.moe.logit_norm_scale (no gating-logit normalization in HF models)")
        return bad

    def routing_fits(self, cfg: ModelConfig) -> list[str]:
        """The routing options (the base: none of DeepSeek-V3's group-limited, scaled,
        score-biased routing)."""
        m = cfg.moe
        bad: list[str] = []
        if m.num_groups > 1:
            bad.append(f"model.moe.num_groups={m.num_groups} (group-limited routing: deepseek_v3)")
        if m.routed_scaling_factor != 1.0:
            bad.append(f"model.moe.routed_scaling_factor={m.routed_scaling_factor} (deepseek_v3)")
        if m.bias_update_rate is not None:
            bad.append(
                "model.moe.bias_update_rate is set: the expert score bias changes routing and "
                f"{self.name} has no place for it (deepseek_v3 has)"
            )
        return bad

    def shared_fits(self, cfg: ModelConfig) -> list[str]:
        """The shared experts (the base: none unless :attr:`shared` names a module)."""
        m = cfg.moe
        if self.shared is None and m.num_shared_experts:
            return [f"model.moe.num_shared_experts={m.num_shared_experts} ({self.name} has none)"]
        return []

    # ----------------------------------------------------------------------------- weights

    def extra_tensors_to_hf(
        self, cfg: ModelConfig, state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Hub tensors the architecture needs beyond the mapped ones (the base: none)."""
        return {}

    def ignores(self, name: str, cfg: ModelConfig) -> bool:
        """Whether hub tensor ``name`` may go unused on import (the base: no)."""
        return False


def _expert_hidden(hf: Mapping[str, Any]) -> int:
    return int(hf_get(hf, "moe_intermediate_size", "intermediate_size"))


def _placement(moe: list[bool]) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) reproducing ``moe``, or raise."""
    layers = [i for i, m in enumerate(moe) if m]
    if not layers:
        return len(moe), 1
    first = layers[0]
    freq = layers[1] - layers[0] if len(layers) > 1 else 1
    want = [i >= first and (i - first) % freq == 0 for i in range(len(moe))]
    if want != moe:
        raise CheckpointError(
            f"MoE layers at {layers} cannot be expressed as model.first_k_dense + "
            "model.moe_layer_freq (MoE from a first layer on, every n-th layer)"
        )
    return first, freq


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:  # transformers v4 layout: rope_theta + rope_scaling
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = hf.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", "default")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(rope["factor"])}
    if kind == "yarn":
        if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
            raise CheckpointError(
                "rope_parameters: YaRN with an explicit attention_factor or truncate=false is "
                "not supported by moetrain's YaRN (model.rope_scaling=yarn)"
            )
        return {
            **out,
            "rope_scaling": "yarn",
            "rope_scaling_factor": float(rope["factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
            "yarn_beta_fast": float(rope.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(rope.get("beta_slow") or 1.0),
            # absent = 0, as transformers tests them for truthiness
            "yarn_mscale": float(rope.get("mscale") or 0.0),
            "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
    raise CheckpointError(
        f"rope_parameters.rope_type={kind!r} is not supported; moetrain has default, linear, yarn"
    )


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=cfg.rope_scaling_factor,
            original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
            beta_fast=cfg.yarn_beta_fast,
            beta_slow=cfg.yarn_beta_slow,
        )
        if cfg.yarn_mscale:
            rope["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rope["mscale_all_dim"] = cfg.yarn_mscale_all_dim
    return rope
