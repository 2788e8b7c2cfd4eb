"""Hub weights into a built model, tensor by tensor and shard by shard: each process reads only
the parts of the hub tensors that it holds, straight into its parameters; no state dict of the
whole model is ever built.

A parameter may be a whole tensor or a DTensor (FSDP, EP, TP, FSSDP shards, ``_StridedShard``
included): :func:`local_region` gives, per dimension, the global indices this process holds,
and the hub tensors are read at those indices (routed experts: only the experts in the region,
one hub tensor each, and only their rows/columns in the region).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from moetrain.checkpoint.build import FRESH_STATE
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.weights import Rule
from moetrain.checkpoint.safetensors_file import Selector
from moetrain.checkpoint.safetensors_io import HubReader


def _shards_dim(placement: object, dim: int) -> bool:
    # _StridedShard (FSDP over a TP-sharded dim) is not a Shard and says is_shard() is false
    return isinstance(placement, (Shard, _StridedShard)) and placement.dim == dim


def local_region(t: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """(the tensor this process writes: ``t`` itself or its DTensor's local shard, per dimension
    the sorted global indices it holds there, None for all). For a DTensor each sharded
    dimension's indices come from distributing an index vector with the same placements on
    that dimension, so they are exactly what DTensor itself puts on this rank (uneven and
    strided shards alike)."""
    if not isinstance(t, DTensor):
        return t, [None] * t.dim()
    local = t.to_local()
    index: list[Tensor | None] = []
    for dim in range(t.dim()):
        if not any(_shards_dim(p, dim) for p in t.placements):
            index.append(None)
            continue
        probe = torch.arange(t.shape[dim]).view([-1 if d == dim else 1 for d in range(t.dim())])
        placements = [p if _shards_dim(p, dim) else Replicate() for p in t.placements]
        held = distribute_tensor(probe, t.device_mesh, placements, src_data_rank=None)
        index.append(held.to_local().reshape(-1).cpu())
    shape = [t.shape[d] if i is None else len(i) for d, i in enumerate(index)]
    if list(local.shape) != shape:
        raise RuntimeError(f"local shard {tuple(local.shape)} is not the region {tuple(shape)}")
    return local, index


def _selector(held: Tensor | None) -> Selector:
    """A slice when the held indices are one run (the usual case), else the index list."""
    if held is None:
        return slice(None)
    if len(held) == 0:
        return slice(0, 0)
    start, stop = int(held[0]), int(held[-1]) + 1
    if stop - start == len(held):
        return slice(start, stop)
    return held.numpy().astype(np.int64)


def _fill(reader: HubReader, rule: Rule, local: Tensor, index: list[Tensor | None]) -> None:
    """Read ``rule``'s hub tensors at ``index`` into ``local``."""
    if not rule.stacked:
        local.copy_(reader.read(rule.theirs[0], [_selector(i) for i in index]))
        return
    experts = range(len(rule.theirs)) if index[0] is None else index[0].tolist()
    rest = [_selector(i) for i in index[1:]]
    for row, expert in enumerate(experts):  # one hub tensor per expert: only those held
        local[row].copy_(reader.read(rule.theirs[expert], rest))


def fill_from_hub(module: nn.Module, reader: HubReader, plan: Mapping[str, Rule | None]) -> None:
    """Copy into every tensor of ``module``'s state dict (keyed by the full model's names; whole
    tensors or DTensors: this process's shard) the part of the hub tensors that ``plan``
    (:func:`~moetrain.checkpoint.hf.weights.import_plan`) maps to it, reading nothing else;
    tensors the plan maps to None are zeroed (training state such as the adaptive aux
    coefficients keeps its initial value). A tensor shared under two names (tied
    embeddings) is read once."""
    done: set[int] = set()
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            if name not in plan:
                raise CheckpointError(
                    f"moetrain tensor {name!r} is not part of a model of this config"
                )
            if id(target) in done:
                continue
            done.add(id(target))
            local, index = local_region(target)
            rule = plan[name]
            if local.numel() == 0:
                continue
            if rule is None:
                if not name.endswith(FRESH_STATE):  # training state keeps its start value
                    local.zero_()
            else:
                _fill(reader, rule, local, index)
