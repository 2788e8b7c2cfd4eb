"""Real-size set-up: the model is built on meta, sharded, and each rank materializes only its
shards, initialized with the layout-invariant scheme (``moetrain.models.init``).

- The initial weights, gathered from the shards, are bitwise the single-process weights at every
  layout (EP, TP, PP, FSDP/HSDP, FSSDP, expert TP).
- Tracing every allocation during set-up: no rank allocates a tensor the shape of a full
  parameter it does not hold whole (beyond one initialization block, the documented bound).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moetrain.models.init import BLOCK_ELEMENTS
from moetrain.testing import run_distributed
from moetrain.testing.layouts import train_steps, write_token_dir

LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "fsdp2": (2, []),
    "hsdp_2x2": (4, ["parallel.dp_replicate=2"]),
    "fssdp2": (2, ["parallel.expert_sharding=fssdp"]),
    "tp2_ep2_etp2": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


def initial_weights(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict:
    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return train_steps(data_dir, overrides, steps=0)["weights"]


@pytest.mark.timeout(400)
def test_initial_weights_are_bitwise_equal_at_every_layout(data_dir):
    ref = train_steps(data_dir, [], steps=0)["weights"]
    for name, (world, overrides) in LAYOUTS.items():
        results = run_distributed(initial_weights, world, data_dir, overrides, timeout=150)
        merged: dict[str, torch.Tensor] = {}
        for weights in results:
            merged.update(weights)
        assert set(merged) == set(ref), name
        for key, w in ref.items():
            assert torch.equal(merged[key], w), f"{name}: {key}"


# --- no full parameter a rank does not own -----------------------------------------------------

# tiny with wider matrices, so most parameters span several initialization blocks
WIDE = [
    "model.dim=512",
    "model.dense_hidden_dim=1024",
    "model.moe.hidden_dim=512",
    "optim=adamw",
]


def _real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and not t.is_meta


class AllocationTrace(TorchDispatchMode):
    """Records the shape of every real (non-meta) plain tensor an op allocates (outputs that
    are views of an input are not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if _real(t)}
        for t in tree_leaves(out):
            if _real(t) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.add(tuple(t.shape))
        return out


def setup_allocations(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict:
    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.trainer import Trainer

    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = layout_config(data_dir, overrides)
    ctx = init_parallel(parallel_dims(cfg))
    with tempfile.TemporaryDirectory() as tmp, AllocationTrace() as trace:
        trainer = Trainer(cfg, Path(tmp), ctx)
    params: dict[str, Any] = {}
    for name, p in trainer.state_module.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        params[name] = (tuple(p.shape), p.numel(), tuple(local.shape))
    return {"shapes": trace.shapes, "params": params}


def full_parameters_allocated(result: dict) -> list[str]:
    """Parameters this rank holds only a part of whose full shape it allocated, beyond the
    documented bound (one initialization block). An allocation the shape of one of the rank's
    own shards is that shard (a shard of one weight can have another weight's full shape)."""
    params = result["params"]
    own_shards = {local for _, _, local in params.values()}
    bad = []
    for name, (shape, numel, local) in params.items():
        held_whole = local == shape
        if held_whole or numel <= BLOCK_ELEMENTS or shape in own_shards:
            continue
        if shape in result["shapes"]:
            bad.append(name)
    return bad


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world, layout", [(4, ["parallel.ep=2"]), (4, ["parallel.pp=2", "parallel.tp=2"])]
)
def test_setup_never_allocates_a_full_parameter_it_does_not_own(data_dir, world, layout):
    results = run_distributed(setup_allocations, world, data_dir, [*WIDE, *layout], timeout=250)
    for rank, result in enumerate(results):
        sharded = [n for n, (shape, _, local) in result["params"].items() if local != shape]
        assert len(sharded) > 10, f"rank {rank}: the layout shards too little to test anything"
        assert full_parameters_allocated(result) == [], f"rank {rank}"


def test_the_trace_sees_a_full_model_build():
    """The check fails on the old set-up (every rank building the whole model): one process
    allocating a full model registers every parameter's shape."""
    from moetrain.models import ModelConfig, Transformer
    from moetrain.moe import MoEConfig

    cfg = ModelConfig(dim=512, dense_hidden_dim=1024, moe=MoEConfig(dim=512, hidden_dim=512))
    with AllocationTrace() as trace:
        model = Transformer(cfg)
    params = {n: (tuple(p.shape), p.numel(), (1,)) for n, p in model.named_parameters()}
    bad = full_parameters_allocated({"shapes": trace.shapes, "params": params})
    assert "tok_embeddings.weight" in bad and len(bad) > 10
