"""Context parallelism: each sequence of a micro-batch split over the ``cp`` ranks that share its
micro-batch stream, attention by exchanging key/value chunks, MoE layers routing the whole
micro-batch.

Legend: B sequences, S full sequence length, D model dim, c = S / (2 x cp) chunk length.

- **Sequence split.** cp rank r holds chunks r and 2cp-1-r of every sequence (load-balanced
  for causal attention, :mod:`moetrain.parallel.ring_attention`), tokens and targets alike
  (:meth:`ContextParallel.shard`); RoPE uses the held positions (:meth:`positions`).
- **Attention** (:class:`_ChunkedAttention`): every rank all-gathers the key and value chunks of
  its cp group, computes its queries' attention block by block with online softmax (in fp32,
  autocast off; keys and values travel in their own dtype), and keeps only its own q/k/v,
  output and log-sum-exp for backward, where it gathers the keys and values again and
  reduce-scatters their gradients over the group.
- **MoE layers** (:class:`MoEContextParallel`, the layer's ``sequence_parallel``): the tokens of
  the cp (x tp) ranks of one micro-batch are all-gathered and put back in sequence order, the
  whole micro-batch is routed on every such rank — aux losses of every scope, capacity and drop
  decisions equal the single process's — and each rank dispatches only its own tokens over the
  EP group, which folds over dp_shard x cp x tp.
- **Gradients.** Each rank's LM loss is its tokens' share (mean over its tokens / cp), and each
  rank backpropagates 1/(cp x tp) of the (identical) aux losses, so FSDP's sum over dp_shard x cp
  gives the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from moetrain.parallel.ring_attention import (
    blockwise_backward,
    blockwise_forward,
    chunk_ids,
    local_positions,
    owner,
)
from moetrain.torch_compat import reduce_scatter_single


def _all_gather(t: Tensor, group: Any, size: int) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _sum_own_part(parts: list[Tensor], group: Any) -> Tensor:
    """Sum each rank's ``parts[r]`` over the group and return this rank's (a reduce-scatter)."""
    out = torch.empty_like(parts[0])  # rank r's part: rows [r*n, (r+1)*n) of the input
    reduce_scatter_single(out, torch.cat(parts), group=group)
    return out


class ContextParallel:
    """This rank's place in its cp group: sequence sharding, RoPE positions and attention.

    Args: ``group`` the cp process group, ``size`` its ranks (``parallel.cp``), ``rank`` this
    rank's index in it."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def shard(self, t_BS: Tensor) -> Tensor:
        """This rank's chunks of ``[B, S, ...]`` sequences (``[B, S / cp, ...]``)."""
        return t_BS[:, local_positions(t_BS.shape[1], self.rank, self.size, t_BS.device)]

    def positions(self, local_len: int, device: torch.device) -> Tensor:
        """Sequence positions of this rank's ``local_len`` tokens (for RoPE)."""
        return local_positions(local_len * self.size, self.rank, self.size, device)

    def attention(self, q_BHSk: Tensor, k_BGSk: Tensor, v_BGSv: Tensor, scale: float | None):
        """Causal attention of this rank's queries over the whole sequence; q/k/v hold this
        rank's 2 chunks (``S = 2c``). Returns ``o_BHSv``."""
        if scale is None:
            scale = q_BHSk.shape[-1] ** -0.5
        out = _ChunkedAttention.apply(q_BHSk, k_BGSk, v_BGSv, self, scale)
        return out.to(q_BHSk.dtype)

    def gather_chunks(self, t_BGSx: Tensor) -> list[Tensor]:
        """All 2 x cp chunks of the sequence, in sequence order, from every rank's two."""
        parts = [p.chunk(2, dim=2) for p in _all_gather(t_BGSx, self.group, self.size)]
        return [parts[r][slot] for r, slot in (owner(j, self.size) for j in range(2 * self.size))]

    def sum_chunk_grads(self, grads: list[Tensor]) -> Tensor:
        """Gradients of every chunk (sequence order, this rank's contribution) summed over the
        group; returns this rank's two, concatenated as it holds them."""
        per_rank = [
            torch.cat([grads[j] for j in chunk_ids(r, self.size)], dim=2) for r in range(self.size)
        ]
        return _sum_own_part(per_rank, self.group)


class _ChunkedAttention(torch.autograd.Function):
    """Autograd of :meth:`ContextParallel.attention`: saves only local tensors, gathers the keys
    and values again in backward."""

    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, scale: float):
        ids = chunk_ids(cp.rank, cp.size)
        with torch.autocast(q.device.type, enabled=False):  # scores and sums in fp32
            o, lse = blockwise_forward(
                list(q.float().chunk(2, dim=2)),
                ids,
                cp.gather_chunks(k),
                cp.gather_chunks(v),
                scale,
            )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cp, ctx.scale = cp, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        cp: ContextParallel = ctx.cp
        ids = chunk_ids(cp.rank, cp.size)
        with torch.autocast(q.device.type, enabled=False):
            k_all, v_all = cp.gather_chunks(k), cp.gather_chunks(v)
            dq, dk, dv = blockwise_backward(
                do.float(), q.float(), o, lse, ids, k_all, v_all, ctx.scale
            )
            dk_local, dv_local = cp.sum_chunk_grads(dk), cp.sum_chunk_grads(dv)
        return dq.to(q.dtype), dk_local.to(k.dtype), dv_local.to(v.dtype), None, None


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence dim; backward sums the gradient over the group and keeps
    this rank's part (every rank's use of the gathered tokens adds to it)."""

    @staticmethod
    def forward(ctx, x_BSD, group, size: int):
        ctx.group, ctx.local = group, x_BSD.shape[1]
        return torch.cat(_all_gather(x_BSD, group, size), dim=1)

    @staticmethod
    def backward(ctx, g_BSD):
        B, _, D = g_BSD.shape
        parts = g_BSD.reshape(B, -1, ctx.local, D).unbind(1)  # each group rank's tokens
        return _sum_own_part(list(parts), ctx.group), None, None


class MoEContextParallel:
    """The MoE layer's ``SequenceParallel`` under context parallelism: over the cp x tp ranks of
    one micro-batch (group rank = cp rank x tp + tp rank), whose tokens are the sequence
    positions :meth:`held` gives."""

    split_tokens = True

    def __init__(self, group: Any, cp: int, cp_rank: int, tp: int, tp_rank: int) -> None:
        self.group, self.cp, self.tp = group, cp, tp
        self.size, self.rank = cp * tp, cp_rank * tp + tp_rank
        self.aux_grad_scale = 1.0 / self.size

    def held(self, seq_len: int, group_rank: int, device: torch.device) -> Tensor:
        """Sequence positions of a group rank's tokens: its cp chunks, then its tp slice."""
        c, t = divmod(group_rank, self.tp)
        return local_positions(seq_len, c, self.cp, device).view(self.tp, -1)[t]

    def gather(self, x: Tensor) -> Tensor:
        if isinstance(x, DTensor):  # the sequence-parallel norm's output under TP
            x = x.to_local()
        gathered = _GatherSeq.apply(x, self.group, self.size)
        S = gathered.shape[1]
        order = torch.cat([self.held(S, r, x.device) for r in range(self.size)])
        return gathered[:, torch.argsort(order)]  # gathered order -> sequence order

    def local_tokens(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        pos = self.held(seq_len, self.rank, device)
        return (torch.arange(batch, device=device)[:, None] * seq_len + pos).flatten()

    def local_chunk(self, x_BSD: Tensor) -> Tensor:
        return x_BSD[:, self.held(x_BSD.shape[1], self.rank, x_BSD.device)]

    def scatter(self, y_BSD: Tensor) -> Tensor:
        return y_BSD  # each rank computed only its own tokens


def build_cp(ctx: Any) -> tuple[ContextParallel, MoEContextParallel]:
    """This rank's context-parallel objects (``ctx``: a ``ParallelContext`` with cp > 1): the
    cp group's, and the MoE layers' over the cp x tp ranks of its micro-batch."""
    assert ctx.meshes is not None
    dims, coords = ctx.dims, ctx.coords
    cp = ContextParallel(ctx.group("cp"), dims.cp, coords.cp)
    assert ctx.meshes.cp_tp is not None
    cp_tp = ctx.meshes.cp_tp.get_group()
    return cp, MoEContextParallel(cp_tp, dims.cp, coords.cp, dims.tp, coords.tp)


def apply_cp(chunk: torch.nn.Module, cp: ContextParallel, moe: MoEContextParallel) -> None:
    """Context parallelism on one stage chunk (after TP): every module with a
    ``context_parallel`` slot (the model or pipeline chunk: RoPE positions; attention) gets
    ``cp``, every MoE layer ``moe`` as its ``sequence_parallel``."""
    from moetrain.moe.layer import MoELayer

    for module in chunk.modules():
        if isinstance(module, MoELayer):
            module.sequence_parallel = moe
        elif hasattr(module, "context_parallel"):
            setattr(module, "context_parallel", cp)  # noqa: B010 (a plain attribute, not a Module)
