"""The decoder-only transformer: embeddings -> blocks (dense or MoE) -> norm -> output.

Legend: B sequences, S sequence length, D model dim, V vocabulary, d RoPE head dim.

Parallelism is applied from outside (``moetrain.parallel``); this module never reads the rank.
Parameter names (``tok_embeddings``, ``layers.<i>.attention.wq`` — MLA's are listed in
``attention.py`` —, ``layers.<i>.feed_forward``, ``norm``, ``output``) are the keys checkpoints
and the HF adapters map.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from moetrain.models.block import TransformerBlock
from moetrain.models.config import ModelConfig
from moetrain.models.documents import AttentionMask, attention_mask
from moetrain.models.init import InitSpec, init_module, record_init_specs
from moetrain.models.norms import RMSNorm, set_norm_impl
from moetrain.models.rope import RotaryEmbedding
from moetrain.moe.layer import MoELayer
from moetrain.moe.routes import LogitChain, nominal_ffn_experts


class Transformer(nn.Module):
    """``model(tokens_BS, documents_BS=None, positions_BS=None) -> logits_BSV`` (fp32).

    Construction ends with :meth:`init_weights`, which draws one 62-bit seed from torch's global
    CPU RNG (the only draw construction consumes: the same ``torch.manual_seed`` gives the same
    weights, kept in ``init_seed``) and fills every tensor with the layout-invariant scheme of
    :mod:`moetrain.models.init`. Built under ``torch.device("meta")`` nothing is allocated; after
    sharding, ``init_module(shards, model.init_specs(), model.init_seed)`` gives each rank its
    part of the very same weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # Submodules draw their default init from the CPU RNG; restore it so that the weights
        # depend only on the RNG state at init_weights() (= meta build, seed, init_weights()).
        with torch.random.fork_rng(devices=[]):
            self._build(cfg)
        self.rope = RotaryEmbedding(cfg)
        # context parallelism (set by moetrain.parallel.cp): tokens are this rank's chunks of
        # each sequence, at the positions it gives
        self.context_parallel: Any = None
        self.init_weights()

    def _build(self, cfg: ModelConfig) -> None:
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList()
        moe_idx = 0
        for layer_id in range(cfg.num_layers):
            is_moe = cfg.is_moe_layer(layer_id)
            self.layers.append(TransformerBlock(cfg, layer_id, moe_idx if is_moe else None))
            moe_idx += int(is_moe)
        if cfg.num_moe_layers and cfg.moe.gating_residual:
            chain = LogitChain()  # MoE++: each MoE layer's logits reach the next MoE layer
            for block in self.layers:
                ffn = cast(TransformerBlock, block).feed_forward
                if isinstance(ffn, MoELayer):
                    ffn.logit_chain = chain
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        set_norm_impl(self, cfg.norm_impl)  # model.norm_impl: every RMSNorm (q/k, latent too)

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter and buffer from ``seed`` (default: one draw from
        torch's global CPU RNG), block by block (:mod:`moetrain.models.init`)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.init_seed = seed
        if self.cfg.tie_embeddings:  # to_empty() replaces parameters one by one: tie again
            self.output.weight = self.tok_embeddings.weight
        init_module(self, self.init_specs(), seed)

    def init_specs(self) -> dict[str, InitSpec]:
        """What :meth:`init_weights` gives each parameter and buffer, by name (recorded from
        the modules' own initialization code, nothing touched)."""
        return record_init_specs(self, self._reset_parameters)

    def _reset_parameters(self) -> None:
        """The distributions (recorded by :meth:`init_specs`, never drawn directly).

        Embeddings and input projections ~ N(0, init_std); the output projections of attention
        and of the MLPs/experts (``wo``, ``w2``) ~ N(0, init_std / sqrt(2 * num_layers)) (GPT-2's
        residual scaling); norms 1; biases 0; the final ``output`` ~ N(0, init_std) unless tied.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:  # may be wrapped (activation checkpointing): no isinstance
            cast(TransformerBlock, layer).reset_parameters(std, out_std)
        self.norm.reset_parameters()
        if self.cfg.tie_embeddings:  # to_empty() replaces parameters one by one: tie again
            self.output.weight = self.tok_embeddings.weight
        else:
            nn.init.normal_(self.output.weight, std=std)

    def forward(
        self,
        tokens_BS: Tensor,
        documents_BS: Tensor | None = None,
        positions_BS: Tensor | None = None,
    ) -> Tensor:
        """Args: ``tokens_BS`` int64 token ids, S <= ``model.max_seq_len``; ``documents_BS``
        int64 document ids of a packed window (``moetrain.models.documents``): attention stays
        inside each document; ``positions_BS`` int64 RoPE positions (default ``0..S-1`` in
        every row). Returns: ``logits_BSV`` fp32. Raises ``ValueError`` on a too-long sequence
        or a ``documents_BS``/``positions_BS`` shaped unlike ``tokens_BS``."""
        cp = self.context_parallel
        seq_len = tokens_BS.shape[1] * (1 if cp is None else cp.size)
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten the sequences"
            )
        cos, sin, mask = rope_and_mask(
            self.rope, self.cfg, tokens_BS.shape, tokens_BS.device, documents_BS, positions_BS, cp
        )
        h_BSD = self.tok_embeddings(tokens_BS)
        for layer in self.layers:
            h_BSD = layer(h_BSD, cos, sin, tokens_BS, mask)
        return self.output(self.norm(h_BSD)).float()

    def moe_layers(self) -> list[MoELayer]:
        """The MoE feed-forward layers, in depth order."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def num_params(self) -> int:
        """Total parameters; a tied embedding/output matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: everything except the routed experts not selected.

        Each MoE layer's routed experts count ``k / num_experts`` of their parameters, k the
        nominal FFN experts per token (``top_k``; :func:`moetrain.moe.routes.nominal_ffn_experts`
        with the routing-research options); the router and shared experts count fully. The
        embedding table and the output projection are included (as in the published "active
        parameter" counts of Mixtral and DeepSeek-V3).
        """
        inactive = 0
        for layer in self.moe_layers():
            routed = sum(p.numel() for p in layer.experts.parameters())
            E, K = layer.cfg.num_experts, nominal_ffn_experts(layer.cfg)
            inactive += routed - (routed // E * K if isinstance(K, int) else round(routed / E * K))
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

        ``6 * N + 6 * num_layers * num_heads * (qk_head + v_head) * seq_len`` (PaLM appendix B,
        nanoGPT's MFU): N = :meth:`num_active_params` without the embedding table (a lookup, no
        matmul; a tied table still counts once, as the output projection); the second term is
        the attention scores (``q·k`` over the q/k head dim: ``head_dim`` with GQA,
        ``qk_nope_head_dim + qk_rope_head_dim`` with MLA) and the weighted sum of values (over
        ``head_dim``, or MLA's ``v_head_dim``), without halving for the causal mask; with a
        sliding window each query attends to at most ``sliding_window`` keys. GQA's term is
        ``12 * num_layers * num_heads * head_dim * seq_len``.
        """
        cfg = self.cfg
        matmul_params = self.num_active_params()
        if not cfg.tie_embeddings:
            matmul_params -= self.tok_embeddings.weight.numel()
        keys = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
        head_dims = cfg.qk_head_size + cfg.v_head_size
        attention = 6 * cfg.num_layers * cfg.num_heads * head_dims * keys
        return 6 * matmul_params + attention


def rope_and_mask(
    rope: RotaryEmbedding,
    cfg: ModelConfig,
    shape_BS: torch.Size | tuple[int, int],
    device: torch.device,
    documents_BS: Tensor | None = None,
    positions_BS: Tensor | None = None,
    context_parallel: Any = None,
) -> tuple[Tensor, Tensor, AttentionMask | None]:
    """What every layer of one forward shares, computed once: cos/sin (``[S, d]`` for the
    default positions ``0..S-1``, ``[B, S, d]`` for ``positions_BS``) and the document mask
    (None without ``documents_BS``: the plain causal path). ``shape_BS`` is the full window's
    ``(B, S)`` (under tensor parallelism attention runs on the gathered sequence); under context
    parallelism it is this rank's part, whose positions ``context_parallel`` gives."""
    for name, t in (("documents_BS", documents_BS), ("positions_BS", positions_BS)):
        if t is not None and tuple(t.shape) != tuple(shape_BS):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, the tokens {tuple(shape_BS)}: "
                "data.document_mask needs one document id and position per token"
            )
    if positions_BS is not None:
        positions = positions_BS
    elif context_parallel is not None:
        positions = context_parallel.positions(shape_BS[1], device)
    else:
        positions = torch.arange(shape_BS[1], device=device)
    cos, sin = rope(positions)
    mask = None if documents_BS is None else attention_mask(documents_BS, cfg.sliding_window)
    return cos, sin, mask
