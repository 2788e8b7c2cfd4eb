"""Megatron-Core 0.16's GPTModel with MoE on CPU, as Megatron-LM builds, runs and saves it
(tests only; megatron-core is a test dependency, imported when these functions run).

:func:`tiny_args` gives Megatron-LM training arguments (an ``argparse.Namespace`` by its
argument names) for a tiny model; :func:`build_gpt` builds Megatron-Core's GPTModel from them
with the local layer spec (no Transformer Engine) the way Megatron-LM's ``pretrain_gpt.py``
does; :func:`save_checkpoint` writes what Megatron-LM's training loop writes with the
``torch_dist`` format: ``<dir>/iter_0000010/`` by ``dist_checkpointing.save`` of
``{"args", "checkpoint_version", "iteration", "model"}`` (``args``, the version and the
iteration end up in ``common.pt``) and ``<dir>/latest_checkpointed_iteration.txt``.

CPU needs (:func:`patch_for_cpu`): a current device of "cpu", no Transformer-Engine GEMM, no
CUDA RNG tracker fork, no ``torch.cuda.synchronize`` (called at save); the explicit causal mask
of :func:`logits` (the default one is made on "cuda"); the all-gather token dispatcher (the
all-to-all one creates CUDA streams). A save spawns a process: scripts need a ``__main__``
guard. Sequence parallelism does not run with the local spec. Grouped-GEMM experts
(``moe_grouped_gemm``: Megatron-Core's GroupedMLP) run with :func:`patch_grouped_gemm`, a CPU
stand-in for the ``grouped_gemm`` package.

Legend: B sequences, S sequence length, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

Setattr = Callable[[Any, str, Any], None]


def tiny_args(**overrides: Any) -> argparse.Namespace:
    """Megatron-LM arguments of a 2-layer MoE GPT (hidden 32, 4 heads in 2 query groups, 4
    SwiGLU experts of 16, top-2 sigmoid routing with an expert bias, a shared expert, RMSNorm,
    RoPE, untied embeddings, vocabulary 64), fp32, every parallel size 1."""
    args = dict(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        kv_channels=8,
        max_position_embeddings=64,
        seq_length=16,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        rotary_interleaved=False,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        untie_embeddings_and_output_weights=True,
        padded_vocab_size=64,
        init_method_std=0.02,
        params_dtype=torch.float32,
        num_experts=4,
        moe_ffn_hidden_size=16,
        moe_router_topk=2,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=16,
        moe_layer_freq=1,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        mtp_num_layers=None,
        fp8=None,
        multi_latent_attention=False,
        ckpt_format="torch_dist",
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def patch_for_cpu(setattr_: Setattr = setattr) -> None:
    """What Megatron-Core's GPTModel needs from a CPU-only torch (see the module doc), applied
    with ``setattr_`` (pytest's ``monkeypatch.setattr`` to undo it, or plain ``setattr`` in a
    spawned process)."""
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(torch.cuda, "synchronize", lambda *a, **k: None)
    setattr_(moe_utils, "te_general_gemm", None)
    setattr_(
        mcore_random.CudaRNGStatesTracker,
        "fork",
        lambda self, name=None: contextlib.nullcontext(),
    )


class CpuGroupedGemm:
    """``grouped_gemm.ops`` on the CPU, for Megatron-Core's GroupedMLP (the grouped-GEMM expert
    layout without Transformer Engine): ``gmm(a, b, batch_sizes, trans_b)`` multiplies each
    expert's run of rows of ``a`` by its ``b[e]`` (transposed with ``trans_b``)."""

    @staticmethod
    def gmm(
        a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False
    ) -> torch.Tensor:
        weights = b.transpose(-1, -2) if trans_b else b
        rows = a.split([int(n) for n in batch_sizes])
        return torch.cat([x @ w for x, w in zip(rows, weights)])


def patch_grouped_gemm(setattr_: Setattr = setattr) -> None:
    """Let Megatron-Core's GroupedMLP (``moe_grouped_gemm=True``) build and run on the CPU
    with :class:`CpuGroupedGemm` in place of the ``grouped_gemm`` package."""
    from megatron.core.transformer.moe import grouped_gemm_util

    setattr_(grouped_gemm_util, "grouped_gemm", object())
    setattr_(grouped_gemm_util, "ops", CpuGroupedGemm)


def init_parallel(args: argparse.Namespace) -> None:
    """Megatron-Core's model-parallel groups for ``args``' TP/PP/EP sizes over the default
    process group (gloo; one process is fine)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs a default process group (gloo)")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )


def transformer_config(args: argparse.Namespace):
    """Megatron-Core's TransformerConfig from the arguments, as Megatron-LM's
    ``core_transformer_config_from_args`` maps them (the subset the tiny models use)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = dict(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_layer_freq=args.moe_layer_freq,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_dtype="fp32",
    )
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        use_cpu_initialization=True,
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        **(moe if args.num_experts else {}),
    )


def build_gpt(args: argparse.Namespace, seed: int = 0, bias_seed: int | None = 1):
    """Megatron-Core's GPTModel of ``args`` (local spec), eval mode, weights drawn from
    ``seed`` (the same on every rank: each keeps its shard of the same full model; a pipeline
    stage draws only its own layers, so its weights differ from the one-stage model's). With
    ``bias_seed`` the routers' expert biases get random values (they start at 0), so the
    checkpoints carry a bias that changes routing."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    with contextlib.suppress(Exception):  # seeds the (stubbed) CUDA tracker where it can
        model_parallel_cuda_manual_seed(seed)
    config = transformer_config(args)
    # what pretrain_gpt.py builds for MoE models: per-layer specs (dense where moe_layer_freq
    # says so), here with Megatron-Core's own modules
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        parallel_output=False,  # logits gathered over tensor-parallel ranks
        # a pipeline stage builds its own layers (and the embedding / output where they live)
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    for module in model.modules():
        if type(module).__name__ == "GroupedMLP":  # it asserts the bf16 flag; fp32 works
            module.config = copy.copy(module.config)
            module.config.bf16 = True
    if bias_seed is not None:
        gen = torch.Generator().manual_seed(bias_seed)
        for name, buf in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    return model.eval()


def causal_mask(seq_len: int) -> torch.Tensor:
    """Megatron's attention mask: ``[1, 1, S, S]`` bool, True where a query may *not* look."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's forward on ``tokens_BS``: logits ``[B, S, V]`` (fp32, no grad)."""
    B, S = tokens_BS.shape
    positions = torch.arange(S).expand(B, S)
    with torch.no_grad():
        return model(tokens_BS, positions, causal_mask(S)).float()


def loss(model, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> float:
    """The mean next-token cross entropy of Megatron-Core's forward (labels given: GPTModel
    returns per-token losses ``[B, S]``), as Megatron-LM's ``loss_func`` averages them."""
    B, S = tokens_BS.shape
    positions = torch.arange(S).expand(B, S)
    with torch.no_grad():
        per_token = model(tokens_BS, positions, causal_mask(S), labels=labels_BS)
    return float(per_token.float().mean())


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def save_checkpoint(
    model,
    args: argparse.Namespace,
    save_dir: str | os.PathLike,
    iteration: int = 10,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """What Megatron-LM's ``save_checkpoint`` writes with ``--ckpt-format torch_dist`` (model
    only, no optimizer or rng state): every rank calls it. ``metadata``: the sharded-state-dict
    options Megatron-LM passes (e.g. ``{"singleton_local_shards": True}``: one key per expert
    and per SwiGLU half). Returns the iteration directory."""
    from megatron.core import dist_checkpointing

    # its save raises in a helper process without psutil and the caller then waits forever
    if importlib.util.find_spec("psutil") is None:
        raise RuntimeError("megatron-core's checkpoint save needs psutil: pip install psutil")
    it = iteration_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        it.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model.sharded_state_dict(metadata=metadata),
    }
    dist_checkpointing.save(state, str(it), content_metadata=metadata)
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
    return it


def load_checkpoint(model, it: str | os.PathLike) -> dict[str, Any]:
    """Megatron-Core's ``dist_checkpointing.load`` of the model's sharded state dict from the
    iteration directory ``it`` into ``model`` (every rank calls it); returns the common part
    (``args``, ``iteration``, ...)."""
    from megatron.core import dist_checkpointing

    state = {"model": model.sharded_state_dict()}
    # Megatron-LM allow-lists its args class the same way before loading
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = dist_checkpointing.load(state, str(it))
        common = dist_checkpointing.load_common_state_dict(str(it))
    model.load_state_dict(loaded.pop("model"))
    return common
