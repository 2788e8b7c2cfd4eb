"""Tensor parallelism: DTensor plans for attention, dense MLPs, embeddings and the output head,
with sequence parallelism for the norms; the MoE layer's tensor-parallel strategy.

Legend: B sequences, S sequence length, D model dim, t = tp degree.

Between blocks the residual stream is this rank's sequence chunk ``[B, S/t, D]`` (sequence
parallel). Attention and the dense MLP all-gather their normed input, run column-parallel
projections (heads / hidden units split) and a row-parallel output projection whose partial
sums are reduce-scattered back to sequence chunks. The embedding is row-parallel over the
vocabulary; the output head column-parallel with its logits all-gathered (every TP rank computes
the same loss).

MoE layers (:class:`MoESequenceParallel`) all-gather the micro-batch and route it whole on every
TP rank — routing, aux losses and capacity equal the single-process layer's — then:

- ``etp=1``: each TP rank dispatches only its own sequence chunk (over an EP group that may span
  TP ranks: Megatron's folding), so no token is computed twice;
- ``etp=tp``: every TP rank dispatches all tokens to experts split on F and the partial outputs
  are reduce-scattered to sequence chunks.

The router and shared experts then hold gradients that are partial over TP ranks (each rank saw
part of the tokens, or part of F): :func:`sync_tp_partial_grads` sums them, and each TP rank
backpropagates ``1/t`` of the (identical) aux losses so that the sum is exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moetrain.models.attention import Attention
from moetrain.models.block import TransformerBlock
from moetrain.moe.layer import MoELayer


class MoESequenceParallel:
    """The MoE layer's :class:`moetrain.moe.layer.SequenceParallel` over a TP mesh."""

    def __init__(self, tp_mesh: DeviceMesh, split_tokens: bool) -> None:
        self.mesh = tp_mesh
        self.size = tp_mesh.size()
        self.rank = tp_mesh.get_local_rank()
        self.split_tokens = split_tokens
        self.aux_grad_scale = 1.0 / self.size

    def gather(self, x: Tensor) -> Tensor:
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, self.mesh, [Shard(1)])
        # every rank's use of the gathered input adds a partial gradient: reduce-scatter it back
        return x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])

    def local_tokens(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        chunk = seq_len // self.size
        pos = torch.arange(self.rank * chunk, (self.rank + 1) * chunk, device=device)
        return (torch.arange(batch, device=device)[:, None] * seq_len + pos).flatten()

    def local_chunk(self, x_BSD: Tensor) -> Tensor:
        chunk = x_BSD.shape[1] // self.size
        return x_BSD[:, self.rank * chunk : (self.rank + 1) * chunk]

    def scatter(self, y_BSD: Tensor) -> Tensor:
        if self.split_tokens:
            return y_BSD
        partial = DTensor.from_local(y_BSD, self.mesh, [Partial()])
        return partial.redistribute(placements=[Shard(1)]).to_local()


ParamRef = tuple[nn.Module, str]  # (module, attribute): FSDP replaces Parameter objects


def tp_partial_params(block: TransformerBlock) -> list[ParamRef]:
    """The parameters of a TP block whose gradients are partial over TP ranks (summed after
    backward): the MoE router, shared and zero-computation experts, and per-head QK norms.
    (The sequence-parallel norms are DTensors: their gradients come out ``Partial`` and FSDP or
    :func:`moetrain.parallel.grads.finish_partial_grads` reduces them.)"""
    modules: list[nn.Module] = []
    ffn = block.feed_forward
    if isinstance(ffn, MoELayer):
        modules.append(ffn.router)
        if ffn.shared_experts is not None:
            modules.append(ffn.shared_experts)
        if ffn.zero_compute is not None:  # copy/constant experts run on this rank's chunk
            modules.append(ffn.zero_compute)
    attn = block.attention
    if isinstance(attn, Attention) and attn.qk_norm == "head":
        modules += [attn.q_norm, attn.k_norm]
    return [(m, name) for m in modules for name, _ in m.named_parameters(recurse=False)]


def apply_tp_block(block: TransformerBlock, tp_mesh: DeviceMesh, etp: int) -> None:
    """Shard one decoder block over ``tp_mesh`` (sequence parallel between sub-layers).

    Raises ``ValueError`` for an MLA block (config validation rejects ``parallel.tp > 1`` with
    ``model.attention=mla`` first; this guards direct callers)."""
    if not isinstance(block.attention, Attention):
        raise ValueError(
            "model.attention: 'mla' does not support tensor parallelism; use parallel.tp=1"
        )
    plan: dict = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None),
            desired_input_layouts=(Replicate(), None, None),
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if not block.is_moe:
        plan.update(
            {
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
    parallelize_module(block, tp_mesh, plan)
    if block.is_moe:
        moe = block.feed_forward
        assert isinstance(moe, MoELayer)
        moe.sequence_parallel = MoESequenceParallel(tp_mesh, split_tokens=etp == 1)


def apply_tp_ends(model: nn.Module, tp_mesh: DeviceMesh, first: bool, last: bool) -> None:
    """The embedding (first stage) and the final norm and output head (last stage)."""
    plan: dict = {}
    if first:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if last:
        plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if plan:
        parallelize_module(model, tp_mesh, plan)


def sync_tp_partial_grads(refs: list[ParamRef], tp_group) -> None:
    """Sum the gradients of ``refs`` over the TP group: plain tensors, or FSDP shards (every TP
    rank holds the same shard; FSDP's reduce-scatter over dp passed the local partial values
    on)."""
    for module, name in refs:
        g = getattr(module, name).grad
        if g is None:
            continue
        dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=tp_group)
