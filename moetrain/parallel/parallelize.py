"""Apply a layout to a model: pipeline stages, then TP, EP (or FSSDP), activation checkpointing,
FSDP2.

The full model is built and initialized identically on every rank (same seed, same order of
draws), then cut and sharded; sharding only keeps local slices (``distribute_tensor`` with
``src_data_rank=None``), so the weights are the single-process weights whatever the layout.

Order per stage chunk (as torchtitan): TP plans on each block and the ends -> expert weights as
DTensors sharded on E over the EP axis (and on F over ETP), dispatcher replaced by the
all-to-all one (overlap chunks and flat or hierarchical exchange from ``EPOptions``) — or, with
``expert_sharding=fssdp``, expert weights as DTensors sharded on F over the stage's ranks and the
FSSDP dispatcher (``moetrain.parallel.fssdp``) -> activation checkpointing flag ->
``fully_shard`` of each MoE layer's experts over their expert-data-parallel ranks (not under
FSSDP, which shards them itself), of each block and of the chunk over the dense data-parallel
ranks (HSDP with dp_replicate).

Gradient reductions: FSDP2 **sums** (divide factor 1) — the trainer scales each micro-batch's
loss by 1/(micro-batches in the global batch), so dense gradients summed over the dp ranks and
expert gradients summed over their edp ranks are both the single-process gradient. (FSDP's
default, the mean, would divide expert gradients by edp instead of dp: at ep=2 the experts'
gradients would come out doubled — the bug class DeepSpeed, torchtitan and Megatron had.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moetrain.models.block import TransformerBlock
from moetrain.models.config import ModelConfig
from moetrain.models.transformer import Transformer
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.ep import AllToAllDispatcher, EPOptions
from moetrain.parallel.ep_comm import HierarchicalAllToAll, NodeGroups
from moetrain.parallel.fssdp import FSSDPOptions, apply_fssdp
from moetrain.parallel.tp import (
    ParamRef,
    apply_tp_block,
    apply_tp_ends,
    tp_partial_params,
)


class PipelineChunk(nn.Module):
    """The layers ``layer_ids`` of ``model`` (plus the embedding on the first chunk, the final
    norm and head on the last): one pipeline stage. Parameter names stay those of the full
    model (``layers.<i>...``), so checkpoints do not depend on the layout.

    ``forward(x)``: token ids ``[B, S]`` on the first chunk, hidden states after; returns
    hidden states, or fp32 logits on the last chunk. ``seq_shards`` is the TP degree (the hidden
    states between stages are sequence chunks).
    """

    def __init__(
        self, model: Transformer, layer_ids: range, first: bool, last: bool, seq_shards: int = 1
    ) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last, self.seq_shards = first, last, seq_shards
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.rope = model.rope

    def forward(self, x: Tensor) -> Tensor:
        if self.tok_embeddings is not None:
            seq_len = x.shape[1]
            h = self.tok_embeddings(x)
        else:
            seq_len = x.shape[1] * self.seq_shards
            h = x
        cos, sin = self.rope(torch.arange(seq_len, device=x.device))
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.norm is not None and self.output is not None:
            return self.output(self.norm(h)).float()
        return h


class _StateView(nn.Module):
    """The pipeline chunks of one rank reassembled under the full model's names."""

    def __init__(self, chunks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for chunk in chunks:
            assert isinstance(chunk, PipelineChunk)
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(chunk, name) is not None:
                    setattr(self, name, getattr(chunk, name))
            self.layers.update(dict(chunk.layers.items()))


@dataclass
class ParallelModel:
    """This rank's part of the model: ``chunks`` (the whole model, or its pipeline stages in
    stage order), its MoE layers with their global MoE indices, and the parameters whose
    gradients are partial over tensor-parallel ranks."""

    chunks: list[nn.Module]
    stage_ids: list[int]
    cfg: ModelConfig
    moe_layers: list[MoELayer]
    moe_ids: list[int]
    tp_partial: list[ParamRef] = field(default_factory=list)

    def state_module(self) -> nn.Module:
        """A module over this rank's parameters under the full model's names (``tok_embeddings``,
        ``layers.<i>...``, ``norm``, ``output``): what checkpoints key state by, whatever the
        layout."""
        if len(self.chunks) == 1 and not isinstance(self.chunks[0], PipelineChunk):
            return self.chunks[0]
        return _StateView(self.chunks)

    @property
    def module(self) -> nn.Module:
        """One module holding every local parameter (for the optimizer and state dicts)."""
        return self.chunks[0] if len(self.chunks) == 1 else nn.ModuleList(self.chunks)

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for chunk in self.chunks:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


def _blocks(chunk: nn.Module) -> list[TransformerBlock]:
    """The decoder blocks of a whole model (``layers`` list) or a pipeline chunk (dict)."""
    layers = cast(nn.Module, chunk.layers)
    mods = layers.values() if isinstance(layers, nn.ModuleDict) else layers.children()
    return [cast(TransformerBlock, m) for m in mods]


def _moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def apply_ep(
    layer: MoELayer,
    ctx: ParallelContext,
    options: EPOptions | None = None,
    node_groups: NodeGroups | None = None,
) -> None:
    """Shard the routed experts: E over the EP axis, F over the ETP axis; EP > 1 dispatches
    through the all-to-all, overlapped in ``options.overlap_chunks`` chunks, over the flat
    exchange or (with ``node_groups``) the hierarchical one."""
    dims = ctx.dims
    assert ctx.meshes is not None
    if dims.ep == 1 and dims.etp == 1:
        return
    options = options or EPOptions()
    experts = layer.experts
    E = layer.cfg.num_experts
    if dims.ep > 1:
        group = ctx.expert_group("ep")
        comm = None
        if node_groups is not None:
            comm = HierarchicalAllToAll(node_groups, dist.get_rank(group))
        layer.dispatcher = AllToAllDispatcher(E, group, options.overlap_chunks, comm)
    axes = tuple(a for a, n in (("ep", dims.ep), ("etp", dims.etp)) if n > 1)
    mesh = ctx.meshes.experts[axes]
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        weight = getattr(experts, name)
        if weight is None:
            continue
        f_dim = 1 if name != "w2_EDF" else 2
        placements = [Shard(0) if a == "ep" else Shard(f_dim) for a in axes]
        sharded = distribute_tensor(weight.data, mesh, placements, src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded))
    experts.num_experts = E // dims.ep


def _fsdp(module: nn.Module, mesh, **kwargs) -> None:
    fully_shard(module, mesh=mesh, **kwargs)
    fsdp = cast(FSDPModule, module)
    fsdp.set_gradient_divide_factor(1.0)  # sum, see the module docstring
    fsdp.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def apply_fsdp(chunk: nn.Module, ctx: ParallelContext) -> None:
    dims = ctx.dims
    assert ctx.meshes is not None
    experts_fsdp = dims.edp > 1 and not dims.fssdp  # FSSDP shards the experts itself
    expert_params: set[nn.Parameter] = set()
    for layer in _moe_layers(chunk):
        if experts_fsdp:
            axes = ("dp_replicate", "edp_shard") if dims.dp_replicate > 1 else ("edp_shard",)

            def placement(p: nn.Parameter, experts: GroupedExperts = layer.experts) -> Shard:
                return Shard(1) if p is experts.w2_EDF else Shard(2)

            _fsdp(layer.experts, ctx.meshes.experts[axes], shard_placement_fn=placement)
        else:
            expert_params.update(layer.experts.parameters())
    if dims.dp == 1:
        return
    axes = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
    mesh = ctx.meshes.dense[axes]
    ignored = expert_params or None
    for block in _blocks(chunk):
        _fsdp(block, mesh, ignored_params=ignored)
    _fsdp(chunk, mesh, ignored_params=ignored)


def parallelize(
    model: Transformer,
    ctx: ParallelContext,
    activation_checkpointing: bool = False,
    virtual_stages: int = 1,
    ep_options: EPOptions | None = None,
    fssdp_options: FSSDPOptions | None = None,
) -> ParallelModel:
    """Cut ``model`` into this rank's pipeline stages and apply TP, EP or FSSDP, activation
    checkpointing and FSDP2 as ``ctx.dims`` says (``ep_options``: how the all-to-all
    dispatcher overlaps and exchanges; ``fssdp_options``: rematerialization and the planner's
    slack). In one process the model is returned as is (with activation checkpointing if
    asked)."""
    dims = ctx.dims
    ep_options = ep_options or EPOptions()
    blocks = [cast(TransformerBlock, b) for b in model.layers]
    moe_index = {id(m): i for i, m in enumerate(model.moe_layers())}
    for b in blocks:
        b.activation_checkpointing = activation_checkpointing
    if not ctx.distributed:
        moe = model.moe_layers()
        return ParallelModel([model], [0], model.cfg, moe, list(range(len(moe))))
    assert ctx.meshes is not None
    coords = ctx.coords
    ranges = dims.layer_ranges(len(blocks), virtual_stages)
    num_stages = len(ranges)
    chunks: list[nn.Module]
    if dims.pp == 1:
        chunks, stage_ids = [model], [0]
    else:
        stage_ids = [v * dims.pp + coords.pp for v in range(virtual_stages)]
        chunks = [
            PipelineChunk(model, ranges[s], s == 0, s == num_stages - 1, dims.tp) for s in stage_ids
        ]
    tp_partial: list[ParamRef] = []
    node_groups = None
    if dims.ep > 1 and ep_options.a2a == "hierarchical":
        assert ep_options.ranks_per_node is not None
        node_groups = ctx.ep_node_groups(ep_options.ranks_per_node)  # collective: every rank
    for chunk, s in zip(chunks, stage_ids):
        chunk_blocks = _blocks(chunk)
        if dims.tp > 1:
            tp_mesh = ctx.meshes.dense["tp"]
            for block in chunk_blocks:
                apply_tp_block(block, tp_mesh, dims.etp)
                tp_partial += tp_partial_params(block)
            apply_tp_ends(chunk, tp_mesh, first=s == 0, last=s == num_stages - 1)
        for layer in _moe_layers(chunk):
            if dims.fssdp:
                if dims.stage_ranks > 1:  # one rank per stage: the experts stay whole
                    assert ctx.meshes.fssdp is not None
                    apply_fssdp(layer, ctx.meshes.fssdp["fssdp"], fssdp_options)
            else:
                apply_ep(layer, ctx, ep_options, node_groups)
        apply_fsdp(chunk, ctx)
    moe_layers = [m for c in chunks for m in _moe_layers(c)]
    return ParallelModel(
        chunks, stage_ids, model.cfg, moe_layers, [moe_index[id(m)] for m in moe_layers], tp_partial
    )


def full_state(pm: ParallelModel) -> dict[str, Tensor]:
    """This rank's parameters as full tensors (DTensors gathered), by their model names — for
    tests and small models; every rank must call it (the gathers are collective)."""
    out: dict[str, Tensor] = {}
    for chunk in pm.chunks:
        for name, p in chunk.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().clone()
    return out
