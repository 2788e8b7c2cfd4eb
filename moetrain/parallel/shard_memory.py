"""What one parallelized rank holds, read from its meta shards (the memory planner's part
that looks at tensors): state bytes by dtype, the weights as a rank computes with them (for
autocast's bf16 casts) and FSDP2's all-gathered working set.

Every function takes a :class:`moetrain.parallel.parallelize.ParallelModel` built on the meta
device (or real: only shapes, dtypes and placements are read).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moetrain.config.schema import Config
from moetrain.models.block import TransformerBlock
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.router import Router
from moetrain.parallel.parallelize import ParallelModel
from moetrain.train.optim import parameter_groups

# mesh axes over which FSDP (or HSDP) shards: a weight is all-gathered over them before use
FSDP_AXES = ("dp_replicate", "dp_shard", "dp_shard_cp", "edp_shard")  # dp_shard_cp: with cp


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself unless a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _by_dtype(tensors: Sequence[Tensor], copies: int = 1) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        local = local_tensor(t)
        key = str(local.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + copies * local.numel() * local.element_size()
    return out


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for key, n in part.items():
            out[key] = out.get(key, 0) + n
    return out


def state_bytes(pm: ParallelModel, cfg: Config) -> dict[str, dict[str, int]]:
    """Local parameter, gradient, optimizer-state and buffer bytes by dtype, from the shards'
    shapes — what ``Trainer`` allocates for this rank (``build_optimizer`` over ``pm.module``)."""
    params = pm.parameters()
    in_optim = [p for g in parameter_groups(pm.module, cfg.optim) for p in g["params"]]
    if cfg.optim.name == "adamw":
        # exp_avg and exp_avg_sq like the parameter, and a scalar step (torch's scalar dtype)
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        steps = {str(step_dtype).removeprefix("torch."): len(in_optim) * step_dtype.itemsize}
        optim = _merge(_by_dtype(in_optim, copies=2), steps)
    else:
        optim = _by_dtype(in_optim) if cfg.optim.momentum > 0 else {}
    buffers = pm.buffers()
    replicated = _replicated_grads(pm)
    grads = [p for p in in_optim if p.requires_grad and id(p) not in replicated]
    full = [p.full_tensor() for p in in_optim if id(p) in replicated]  # meta: shapes only
    return {
        "parameters": _by_dtype(params),
        "gradients": _merge(_by_dtype(grads), _by_dtype(full)),
        "optimizer": optim,
        "buffers": _by_dtype(buffers),
    }


def _replicated_grads(pm: ParallelModel) -> set[int]:
    """Parameters whose gradient is larger than their shard: a tensor-parallel embedding that
    FSDP does not manage (dp = 1) gets a ``Replicate`` gradient from torch's DTensor embedding
    backward, the whole table on every TP rank (FSDP's reduce-scatter shards it otherwise)."""
    out: set[int] = set()
    for chunk in pm.chunks:
        for module in chunk.modules():
            w = getattr(module, "weight", None)
            if not isinstance(module, nn.Embedding) or not isinstance(w, DTensor):
                continue
            names = w.device_mesh.mesh_dim_names or ()
            if not any(n in FSDP_AXES for n in names):
                out.add(id(w))
    return out


def _unsharded_numel(p: Tensor) -> int:
    """Elements of ``p`` as this rank computes with it: all-gathered over FSDP's axes, still
    split over TP/EP/ETP."""
    if not isinstance(p, DTensor):
        return p.numel()
    names = p.device_mesh.mesh_dim_names or ()
    split = 1
    for i, placement in enumerate(p.placements):
        if placement.is_shard() and names[i] not in FSDP_AXES:
            split *= p.device_mesh.size(i)
    return p.numel() // split


def weight_cast_bytes(block: nn.Module, fssdp_experts: int | None) -> int:
    """bf16 bytes of the casts autocast keeps of a block's matmul weights (the router computes
    in fp32, norms multiply by their fp32 weight); under FSSDP the experts it materializes
    (``fssdp_experts`` of them, balanced routing)."""
    routers = {id(p) for m in block.modules() if isinstance(m, Router) for p in m.parameters()}
    experts = {
        id(p) for m in block.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    total = 0
    for p in block.parameters():
        if p.dim() < 2 or id(p) in routers:
            continue
        if fssdp_experts is not None and id(p) in experts:
            total += p.numel() // p.shape[0] * fssdp_experts
        else:
            total += _unsharded_numel(p)
    return 2 * total


def _fsdp_unit_bytes(module: nn.Module) -> int:
    """Unsharded bytes of the parameters ``fully_shard(module)`` manages itself (not its nested
    FSDP modules'): what its all-gather materializes."""
    if not isinstance(module, FSDPModule):
        return 0
    state = module._get_fsdp_state()  # torch-private: FSDP2 exposes no unsharded sizes
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        single = getattr(state, "_fsdp_param_group", None)
        groups = [single] if single is not None else []
    return sum(
        fp._orig_size.numel() * fp.sharded_param.element_size()
        for g in groups
        for fp in g.fsdp_params
    )


def fsdp_buffers(pm: ParallelModel) -> int:
    """FSDP2's all-gathered working set: each chunk's own unit (embedding, final norm, head: the
    root stays unsharded from forward to backward) plus 3 x the largest block's units (block
    and its experts: the one computing, the one prefetched, and its unsharded gradients before
    the reduce-scatter)."""
    held, blocks = 0, [0]
    for chunk in pm.chunks:
        held += _fsdp_unit_bytes(chunk)
        for block in chunk.modules():
            if isinstance(block, TransformerBlock):
                blocks.append(sum(_fsdp_unit_bytes(m) for m in block.modules()))
    return held + 3 * max(blocks)
