"""Apply a layout to a model: pipeline stages, then TP, context parallelism, the expert placement
(EP, FSSDP, ...), activation checkpointing, torch.compile, FSDP2.

The full model is built and initialized identically on every rank (same seed, same order of
draws), then cut and sharded; sharding only keeps local slices (``distribute_tensor`` with
``src_data_rank=None``), so the weights are the single-process weights whatever the layout.

Order per stage chunk (as torchtitan): TP plans on each block and the ends -> context
parallelism (``moetrain.parallel.cp``: attention over the cp group, RoPE positions of the held
chunks, the MoE layers' token gather) -> the expert placement's ``apply`` on each MoE layer
(``moetrain.parallel.placement``: under EP the expert weights become DTensors sharded on E over
the EP axis and on F over ETP, and the all-to-all dispatcher replaces the local one) ->
activation checkpointing flag -> ``torch.compile`` of each block (``train.compile``:
``moetrain.parallel.compile``) -> ``fully_shard`` of each MoE layer's experts over their
expert-data-parallel ranks (unless the placement shards them itself), of each block and of the
chunk over the dense data-parallel ranks (dp_shard x cp; HSDP with dp_replicate).

Gradient reductions: FSDP2 **sums** (divide factor 1) — the trainer scales each micro-batch's
loss by 1/(micro-batches in the global batch), so dense gradients summed over the dp ranks and
expert gradients summed over their edp ranks are both the single-process gradient. (FSDP's
default, the mean, would divide expert gradients by edp instead of dp: at ep=2 the experts'
gradients would come out doubled — the bug class DeepSpeed, torchtitan and Megatron had.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moetrain.models.block import TransformerBlock
from moetrain.models.config import ModelConfig
from moetrain.models.init import InitSpec, init_module
from moetrain.models.transformer import Transformer, rope_and_mask
from moetrain.moe.experts import EXPERT_F_DIM, GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.parallel.compile import apply_compile
from moetrain.parallel.context import ParallelContext, single_process_context
from moetrain.parallel.cp import ContextParallel, apply_cp, build_cp
from moetrain.parallel.grads import clip_grad_norm, finish_partial_grads, local_grad_sumsq
from moetrain.parallel.placement import ExpertPlacement, StepStatistics, placement_class
from moetrain.parallel.tp import (
    ParamRef,
    apply_tp_block,
    apply_tp_ends,
    sync_tp_partial_grads,
    tp_partial_params,
)

T = TypeVar("T", bound=Tensor)


class PipelineChunk(nn.Module):
    """The layers ``layer_ids`` of ``model`` (plus the embedding on the first chunk, the final
    norm and head on the last): one pipeline stage. Parameter names stay those of the full
    model (``layers.<i>...``), so checkpoints do not depend on the layout.

    ``forward(x, documents_BS=None, positions_BS=None)``: token ids ``[B, S]`` on the first
    chunk, hidden states after; returns hidden states, or fp32 logits on the last chunk.
    ``seq_shards`` is the TP degree (the hidden states between stages are sequence chunks).
    ``documents_BS``/``positions_BS`` (document masking, as ``Transformer.forward``) are the
    full window's ``[B, S]``: every stage gets them as keyword arguments (the pipeline schedule
    splits them into micro-batches like the tokens and passes them to every stage), and builds
    its own mask and cos/sin from them.
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
        self.context_parallel = model.context_parallel  # set again by moetrain.parallel.cp

    def forward(
        self, x: Tensor, documents_BS: Tensor | None = None, positions_BS: Tensor | None = None
    ) -> Tensor:
        if self.tok_embeddings is not None:
            seq_len = x.shape[1]
            h = self.tok_embeddings(x)
        else:
            seq_len = x.shape[1] * self.seq_shards
            h = x
        cos, sin, mask = rope_and_mask(
            self.rope,
            self.cfg,
            (x.shape[0], seq_len),
            x.device,
            documents_BS,
            positions_BS,
            self.context_parallel,
        )
        for layer in self.layers.values():
            h = layer(h, cos, sin, None, mask)
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
    stage order), its MoE layers with their global MoE indices, the parameters whose gradients
    are partial over tensor-parallel ranks, and the context and placement it was built for.

    Training goes through its methods, so the loop knows no layout: ``prepare_training`` wires
    the MoE layers (aux-loss scale, global-scope count reduction), ``finish_gradients`` and
    ``clip_grad_norm`` after the backward passes, ``update_expert_bias`` after the optimizer
    step, ``step_statistics`` for what the placement logs.
    """

    chunks: list[nn.Module]
    stage_ids: list[int]
    cfg: ModelConfig
    moe_layers: list[MoELayer]
    moe_ids: list[int]
    tp_partial: list[ParamRef] = field(default_factory=list)
    ctx: ParallelContext = field(default_factory=single_process_context)
    placement: ExpertPlacement | None = None
    local_grads_finite: bool = True  # this rank's gradient shards, as of the last clip
    context_parallel: ContextParallel | None = None

    def shard_sequences(self, t_BS: Tensor) -> Tensor:
        """This rank's part of each sequence of ``[B, S]`` tokens or targets (context
        parallelism: its 2 load-balanced chunks), else ``t_BS`` itself."""
        cp = self.context_parallel
        return t_BS if cp is None else cp.shard(t_BS)

    @property
    def loss_share(self) -> float:
        """What this rank's mean LM loss over its tokens is multiplied by so that the losses of
        the ranks sharing a micro-batch sum to its mean (1 / cp)."""
        return 1.0 if self.context_parallel is None else 1.0 / self.context_parallel.size

    def sum_loss_shares(self, loss: Tensor) -> Tensor:
        """Sum loss shares (:attr:`loss_share`) in place over the ranks of one micro-batch."""
        return self.ctx.all_reduce(loss, ("cp",)) if self.context_parallel is not None else loss

    def materialize(self, specs: dict[str, InitSpec], seed: int) -> None:
        """Allocate this rank's shards on the context's device (the model was built and
        parallelized on the meta device) and initialize them with the layout-invariant scheme
        (``specs`` and ``seed`` from the meta model: ``init_specs()``, ``init_seed``): every rank
        generates only what it holds, and the weights equal the single-process model's."""
        for chunk in self.chunks:
            chunk.to_empty(device=self.ctx.device)
        state = self.state_module()
        if self.cfg.tie_embeddings:  # to_empty replaces parameters one by one: tie again
            state.output.weight = state.tok_embeddings.weight  # type: ignore[union-attr]
        init_module(state, specs, seed)

    def prepare_training(self, aux_loss_scale: float, seed: int = 0) -> None:
        """Every MoE layer scales its aux-loss gradients by ``aux_loss_scale`` (1 / micro-batches
        in the global batch), keys its routing noise by ``seed`` and by where this rank's
        micro-batches sit in the global batch, and, with data parallelism, sums its global-scope
        expert counts over the data-parallel ranks."""
        ctx = self.ctx
        for layer in self.moe_layers:
            layer.aux_loss_scale = aux_loss_scale
            step = layer.routing_step
            step.seed, step.data_rank, step.data_ranks = seed, ctx.dp_rank, ctx.dims.dp
            if ctx.distributed and ctx.dims.dp > 1:
                layer.reduce_global_counts = ctx.reduce_over_dp

    def start_step(self, step: int) -> None:
        """Before optimizer step ``step``'s first forward (0-based), or before an evaluation
        after ``step`` steps: the MoE layers number their calls, key their noise and restart the
        global aux-loss scope's running counts from here."""
        for layer in self.moe_layers:
            layer.start_step(step)

    def finish_gradients(self) -> None:
        """After the last backward of a step: the placement's own expert-gradient reduction,
        then the sums tensor parallelism leaves partial (the routers' and other weights used on
        every TP rank)."""
        if self.placement is not None and self.ctx.distributed:
            self.placement.reduce_gradients(self.moe_layers, self.ctx)
        if self.ctx.dims.tp > 1:
            sync_tp_partial_grads(self.tp_partial, self.ctx.group("tp"))
            finish_partial_grads(self.parameters())

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the global gradient norm (each parameter counted once); returns the norm.
        ``local_grads_finite`` then says whether this rank's own gradient shards were finite."""
        params = self.parameters()
        local = local_grad_sumsq(params, self.ctx)
        self.local_grads_finite = bool(torch.isfinite(local))  # host sync, as the norm's
        return clip_grad_norm(params, max_norm, self.ctx, local)

    def first_rank_with_nonfinite_weights(self) -> int | None:
        """The lowest rank holding a non-finite parameter shard, or None (collective: one MAX
        all-reduce of a flag per rank)."""
        ctx = self.ctx
        flags = torch.zeros(ctx.dims.world_size, device=ctx.device)
        for p in self.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if not bool(torch.isfinite(local).all()):
                flags[ctx.rank] = 1.0
                break
        if ctx.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = flags.nonzero()
        return int(bad[0]) if bad.numel() else None

    def discard_step(self) -> None:
        """A skipped optimizer step: the MoE layers forget the loads they recorded for it."""
        for layer in self.moe_layers:
            layer.discard_step()

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing, once per optimizer step: loads summed over the data-parallel
        ranks."""
        reduce_load = self.ctx.reduce_over_dp if self.ctx.distributed else None
        for layer in self.moe_layers:
            layer.update_expert_bias(reduce_load)

    def step_statistics(self) -> list[StepStatistics]:
        """The placement's per-step statistics sources (none in one process)."""
        if self.placement is None:
            return []
        return self.placement.step_statistics(self.cfg, self.moe_layers, self.moe_ids, self.ctx)

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
        """This rank's parameters, each once (chunks may share modules)."""
        return _unique(p for chunk in self.chunks for p in chunk.parameters())

    def buffers(self) -> list[Tensor]:
        """This rank's buffers, each once."""
        return _unique(b for chunk in self.chunks for b in chunk.buffers())


def _unique(tensors: Iterable[T]) -> list[T]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _blocks(chunk: nn.Module) -> list[TransformerBlock]:
    """The decoder blocks of a whole model (``layers`` list) or a pipeline chunk (dict)."""
    layers = cast(nn.Module, chunk.layers)
    mods = layers.values() if isinstance(layers, nn.ModuleDict) else layers.children()
    return [cast(TransformerBlock, m) for m in mods]


def _moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def _fsdp(module: nn.Module, mesh, **kwargs) -> None:
    fully_shard(module, mesh=mesh, **kwargs)
    fsdp = cast(FSDPModule, module)
    fsdp.set_gradient_divide_factor(1.0)  # sum, see the module docstring
    fsdp.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def apply_fsdp(chunk: nn.Module, ctx: ParallelContext, shards_experts: bool = False) -> None:
    """FSDP2 over the data-parallel ranks: each MoE layer's experts over their edp ranks
    (unless the placement ``shards_experts`` itself), each block and the chunk over dp."""
    dims = ctx.dims
    assert ctx.meshes is not None
    experts_fsdp = dims.edp > 1 and not shards_experts
    expert_params: set[nn.Parameter] = set()
    for layer in _moe_layers(chunk):
        if experts_fsdp:
            axes = ("dp_replicate", "edp_shard") if dims.dp_replicate > 1 else ("edp_shard",)

            def placement(p: nn.Parameter, experts: GroupedExperts = layer.experts) -> Shard:
                # the D dim (dim 0 is E, split by EP; F may be split by expert TP)
                name = next(n for n, q in experts.named_parameters() if q is p)
                return Shard(3 - EXPERT_F_DIM[name])

            _fsdp(layer.experts, ctx.meshes.experts[axes], shard_placement_fn=placement)
        else:
            expert_params.update(layer.experts.parameters())
    if dims.dp_replicate * dims.dense_shard == 1:
        return
    shard_axis = "dp_shard_cp" if dims.cp > 1 else "dp_shard"  # cp ranks hold equal weights
    axes = ("dp_replicate", shard_axis) if dims.dp_replicate > 1 else (shard_axis,)
    with warnings.catch_warnings():  # torch asks to keep flattened meshes apart; FSDP needs
        warnings.simplefilter("ignore", UserWarning)  # dp_replicate x dp_shard_cp as one mesh
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
    placement: ExpertPlacement | None = None,
    compile_blocks: bool = False,
) -> ParallelModel:
    """Cut ``model`` into this rank's pipeline stages and apply TP, the expert ``placement``
    (default: the one ``ctx.dims.expert_sharding`` names, with default options), activation
    checkpointing, ``torch.compile`` of each of this rank's blocks (``compile_blocks``) and
    FSDP2 as ``ctx.dims`` says. In one process the model is returned as is (with activation
    checkpointing and compilation if asked)."""
    dims = ctx.dims
    if placement is None:
        placement = placement_class(dims.expert_sharding)()
    blocks = [cast(TransformerBlock, b) for b in model.layers]
    moe_index = {id(m): i for i, m in enumerate(model.moe_layers())}
    for b in blocks:
        b.activation_checkpointing = activation_checkpointing
    if not ctx.distributed:
        if compile_blocks:
            apply_compile(blocks)
        moe = model.moe_layers()
        return ParallelModel([model], [0], model.cfg, moe, list(range(len(moe))), ctx=ctx)
    assert ctx.meshes is not None
    chunks, stage_ids, num_stages = _stage_chunks(model, ctx, virtual_stages)
    tp_partial: list[ParamRef] = []
    cp = build_cp(ctx) if dims.cp > 1 else None
    placement.setup(ctx)  # collective: every rank
    for chunk, s in zip(chunks, stage_ids):
        if dims.tp > 1:
            tp_mesh = ctx.meshes.dense["tp"]
            for block in _blocks(chunk):
                apply_tp_block(block, tp_mesh, dims.etp)
                tp_partial += tp_partial_params(block)
            apply_tp_ends(chunk, tp_mesh, first=s == 0, last=s == num_stages - 1)
        if cp is not None:  # attention and RoPE of this rank's chunks; MoE layers' token gather
            apply_cp(chunk, *cp)
        for layer in _moe_layers(chunk):
            placement.apply(layer, ctx)
        if compile_blocks:  # after the placement installed its dispatcher, before FSDP2
            apply_compile(_blocks(chunk))
        apply_fsdp(chunk, ctx, placement.shards_experts)
    moe_layers = [m for c in chunks for m in _moe_layers(c)]
    moe_ids = [moe_index[id(m)] for m in moe_layers]
    return ParallelModel(
        chunks, stage_ids, model.cfg, moe_layers, moe_ids, tp_partial, ctx, placement,
        context_parallel=None if cp is None else cp[0],
    )  # fmt: skip


def _stage_chunks(
    model: Transformer, ctx: ParallelContext, virtual_stages: int
) -> tuple[list[nn.Module], list[int], int]:
    """This rank's stage chunks (the whole model without pipeline parallelism), their stage
    ids, and the number of stages."""
    dims = ctx.dims
    ranges = dims.layer_ranges(len(model.layers), virtual_stages)
    num_stages = len(ranges)
    if dims.pp == 1:
        return [model], [0], num_stages
    stage_ids = [v * dims.pp + ctx.coords.pp for v in range(virtual_stages)]
    chunks: list[nn.Module] = [
        PipelineChunk(model, ranges[s], s == 0, s == num_stages - 1, dims.tp) for s in stage_ids
    ]
    return chunks, stage_ids, num_stages


def full_state(pm: ParallelModel) -> dict[str, Tensor]:
    """This rank's parameters as full tensors (DTensors gathered), by their model names — for
    tests and small models; every rank must call it (the gathers are collective)."""
    out: dict[str, Tensor] = {}
    for chunk in pm.chunks:
        for name, p in chunk.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().clone()
    return out
