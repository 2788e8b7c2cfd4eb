"""Benchmark peers for the MoE layer: each builds a layer of one shape and returns a fwd+bwd step.

A peer is a function ``(shape) -> Peer``; it raises ``PeerUnavailable`` (with the reason and the
install hint) when its package is missing or cannot run this shape, and the runner prints the
note instead of a figure. Every peer reports the routed rows it actually computes (no dropped
assignments, no padding), which its expert FLOPs are counted from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moetrain.models.mlp import FeedForward
from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.experts import GroupedExperts, expert_mlp
from moetrain.moe.reference import reference_moe_per_expert
from moetrain.ops import reference_kernels
from moetrain.parallel.ep import AllToAllDispatcher


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    dim: int
    hidden_dim: int
    num_tokens: int
    capacity_factor: float | None  # None = dropless

    @property
    def mode(self) -> str:
        return "dropless" if self.capacity_factor is None else f"cf={self.capacity_factor:g}"


@dataclass
class Peer:
    step: Callable[[], None]  # one forward + backward
    routed_rows: Callable[[], int]  # rows the last step computed (call after step)


class PeerUnavailable(RuntimeError):
    pass


def _inputs(shape: Shape, three_d: bool = False, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = (1, shape.num_tokens, shape.dim) if three_d else (shape.num_tokens, shape.dim)
    x = torch.randn(size, generator=gen).requires_grad_(True)
    return x, torch.randn(size, generator=gen)


def _moe_config(shape: Shape, experts_impl: str = "auto") -> MoEConfig:
    return MoEConfig(
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        dim=shape.dim,
        hidden_dim=shape.hidden_dim,
        capacity_factor=shape.capacity_factor,
        experts_impl=experts_impl,
    )


def _zero_grads(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def _layer(shape: Shape, experts_impl: str = "auto") -> MoELayer:
    """The layer every moetrain peer starts from (seed 0: the same weights everywhere)."""
    torch.manual_seed(0)
    return MoELayer(_moe_config(shape, experts_impl))


def moetrain_peer(shape: Shape, experts_impl: str = "auto") -> Peer:
    """``MoELayer`` as the trainer builds it (csrc ops when loaded), its experts run by
    ``experts_impl`` (``auto``: the device's default)."""
    layer = _layer(shape, experts_impl)
    x, g = _inputs(shape)

    def step() -> None:
        _zero_grads(layer, x)
        layer(x).backward(g)

    return Peer(step, lambda: _kept_rows(layer))


def moetrain_reference_ops_peer(shape: Shape) -> Peer:
    """``MoELayer`` with the pure-torch reference dispatch/combine ops instead of the csrc
    kernels (``moetrain.ops.reference_kernels``): the layer before the fused kernels."""
    peer = moetrain_peer(shape)

    def step() -> None:
        with reference_kernels():
            peer.step()

    return Peer(step, peer.routed_rows)


def reference_peer(shape: Shape) -> Peer:
    """The naive per-expert loop with boolean indexing (``reference_moe_per_expert``)."""
    layer = _layer(shape)
    x, g = _inputs(shape)

    def step() -> None:
        _zero_grads(layer, x)
        y, aux = reference_moe_per_expert(layer, x)
        ((y * g).sum() + aux).backward()

    def rows() -> int:  # the reference keeps exactly what the layer keeps (tested)
        with torch.no_grad():
            layer(x.detach())
        return _kept_rows(layer)

    return Peer(step, rows)


def _kept_rows(layer: MoELayer) -> int:
    stats = layer.last_stats
    assert stats is not None
    return int(stats.num_assignments) - int(stats.num_dropped)


def balanced_bmm_peer(shape: Shape, rows: int | None = None) -> Peer:
    """A perfectly balanced batched SwiGLU doing the same expert FLOPs (``rows`` routed rows,
    default T*K, split evenly over E): the bound a grouped GEMM can reach without routing."""
    E, D, Fh = shape.num_experts, shape.dim, shape.hidden_dim
    n = rows if rows is not None else shape.num_tokens * shape.top_k
    per_expert = max(n // E, 1)
    gen = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, Fh, D, generator=gen) * 0.02).requires_grad_(True)
    w3 = (torch.randn(E, Fh, D, generator=gen) * 0.02).requires_grad_(True)
    w2 = (torch.randn(E, D, Fh, generator=gen) * 0.02).requires_grad_(True)
    x = torch.randn(E, per_expert, D, generator=gen).requires_grad_(True)
    g = torch.randn(E, per_expert, D, generator=gen)

    def step() -> None:
        for t in (w1, w3, w2, x):
            t.grad = None
        expert_mlp(x, w1, w3, w2).backward(g)

    return Peer(step, lambda: E * per_expert)


def transformers_peer(shape: Shape, experts_impl: str = "grouped_mm") -> Peer:
    """``transformers``' MixtralSparseMoeBlock (dropless). ``grouped_mm`` is what a full
    Mixtral model runs by default in transformers 5; a standalone block runs ``eager``."""
    if shape.capacity_factor is not None:
        raise PeerUnavailable("MixtralSparseMoeBlock is dropless only (no capacity factor)")
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:
        raise PeerUnavailable(
            f"transformers not installed ({err}); pip install transformers"
        ) from err
    cfg = MixtralConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.hidden_dim,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        router_jitter_noise=0.0,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=128,
    )
    cfg._experts_implementation = experts_impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    x, g = _inputs(shape, three_d=True)

    def step() -> None:
        _zero_grads(block, x)
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).backward(g)

    return Peer(step, lambda: shape.num_tokens * shape.top_k)


def deepspeed_moe(shape: Shape, ep_size: int = 1) -> nn.Module:
    """DeepSpeed-MoE's layer (``deepspeed.moe.layer.MoE``) for ``shape``, SwiGLU experts, seeded
    so that its weights do not depend on ``ep_size`` (the gate is drawn after the expert, whose
    copies draw nothing). ``ep_size > 1`` joins DeepSpeed's expert-parallel group of that size
    (collective: every rank calls it; ``torch.distributed`` must be up). Raises
    ``PeerUnavailable`` without deepspeed."""
    try:
        from deepspeed.moe.layer import MoE
    except Exception as err:  # deepspeed raises various errors when its setup is incomplete
        raise PeerUnavailable(
            f"deepspeed unavailable ({type(err).__name__}: {err}); "
            'pip install --no-build-isolation -e ".[bench]"'
        ) from err
    dropless = shape.capacity_factor is None
    cf = 1.0 if dropless else shape.capacity_factor
    torch.manual_seed(0)
    moe = MoE(
        hidden_size=shape.dim,
        expert=FeedForward(shape.dim, shape.hidden_dim),
        num_experts=shape.num_experts,
        ep_size=ep_size,
        k=shape.top_k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=4,
        drop_tokens=not dropless,
        use_residual=False,
        top2_2nd_expert_sampling=False,
    ).train()
    if ep_size > 1:
        import deepspeed

        # wraps the torch.distributed default group already up (gloo here); then the layer
        # creates (or reuses) DeepSpeed's "ep_size_N" expert-parallel groups
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        moe.set_deepspeed_parallelism()
    return moe


def deepspeed_peer(shape: Shape) -> Peer:
    """DeepSpeed-MoE (``deepspeed.moe.layer.MoE``), one process, SwiGLU experts. Dropless
    (``drop_tokens=False``) pads every expert to the largest count; its padding rows are not
    counted as expert FLOPs."""
    moe = deepspeed_moe(shape)  # ep_size=1 needs no process group
    x, g = _inputs(shape)
    return _deepspeed_step(moe, x, g, shape)


def _deepspeed_step(moe: Any, x: Tensor, g: Tensor, shape: Shape) -> Peer:
    def step() -> None:
        _zero_grads(moe, x)
        out, _, _ = moe(x)
        out.backward(g)

    def rows() -> int:  # with ep_size > 1 the dropless gate all-reduces: every rank calls it
        with torch.no_grad():
            gate_out = moe.deepspeed_moe.gate(x.detach(), None, sparse_routes=True)
        return _deepspeed_kept_rows(gate_out, shape)

    return Peer(step, rows)


def _deepspeed_kept_rows(gate_out: tuple, shape: Shape) -> int:
    # With sparse_routes the gate returns (l_aux, capacity, E, indices[K, T], locations, gates,
    # exp_counts); routes evicted by the capacity limit have a negative expert index.
    return int((gate_out[3] >= 0).sum())


PEERS: dict[str, Callable[[Shape], Peer]] = {
    "moetrain": moetrain_peer,  # experts_impl=auto: the loop on CPU, grouped_mm on CUDA
    "moetrain_loop": lambda shape: moetrain_peer(shape, "loop"),
    "moetrain_grouped_mm": lambda shape: moetrain_peer(shape, "grouped_mm"),
    "moetrain_reference_ops": moetrain_reference_ops_peer,
    "reference": reference_peer,
    "balanced_bmm": balanced_bmm_peer,
    "deepspeed": deepspeed_peer,
    "transformers": transformers_peer,
    "transformers_eager": lambda shape: transformers_peer(shape, "eager"),
}


# Expert parallelism: peers run on every rank of the default process group (EP = its size), each
# rank with its own tokens (``ep_inputs``) and E/EP experts; steps and ``routed_rows`` are
# collective. ``routed_rows`` counts the rows this rank's tokens send to experts (kept, no
# padding), so their sum over ranks is the rows all ranks' experts compute.


def ep_inputs(shape: Shape, rank: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s ``shape.num_tokens`` tokens and output gradient (rank 0 gets the
    single-process peers' inputs)."""
    return _inputs(shape, seed=1 + rank)


def ep_moetrain_layer(
    shape: Shape, group: Any = None, overlap_chunks: int = 1, experts_impl: str = "auto"
) -> MoELayer:
    """The single-process peer's layer (same seed, same weights) keeping only this rank's E/EP
    experts and dispatching through an ``AllToAllDispatcher`` over ``group`` (None: the
    default group)."""
    layer = _layer(shape, experts_impl)
    dispatcher = AllToAllDispatcher(shape.num_experts, group, overlap_chunks)
    keep_local_experts(layer, dist.get_rank(group), dispatcher.num_local)
    layer.dispatcher = dispatcher
    return layer


def keep_local_experts(layer: MoELayer, ep_rank: int, num_local: int) -> None:
    """Replace ``layer.experts`` by EP rank ``ep_rank``'s ``num_local`` experts, copied from the
    full set (so an EP layer has the single-process layer's weights)."""
    full = layer.experts
    experts = GroupedExperts(layer.cfg, num_experts=num_local)
    mine = slice(ep_rank * num_local, (ep_rank + 1) * num_local)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            p.copy_(getattr(full, name)[mine])
    layer.experts = experts


def ep_moetrain_peer(shape: Shape, overlap_chunks: int = 1, experts_impl: str = "auto") -> Peer:
    """``ep_moetrain_layer`` on this rank's ``ep_inputs`` (collective steps)."""
    layer = ep_moetrain_layer(shape, None, overlap_chunks, experts_impl)
    x, g = ep_inputs(shape, dist.get_rank())

    def step() -> None:
        _zero_grads(layer, x)
        layer(x).backward(g)

    return Peer(step, lambda: _kept_rows(layer))


def ep_deepspeed_peer(shape: Shape) -> Peer:
    """DeepSpeed-MoE with ``ep_size`` = the world size: capacity per rank's tokens, every
    (expert, capacity slot) of every rank sent through one all-to-all (dropless: the capacity is
    the largest expert count over the EP group)."""
    moe = deepspeed_moe(shape, ep_size=dist.get_world_size())
    x, g = ep_inputs(shape, dist.get_rank())
    return _deepspeed_step(moe, x, g, shape)


def ep_balanced_bmm_peer(shape: Shape) -> Peer:
    """Per rank, the balanced batched SwiGLU over its E/EP experts with the T*K rows a rank
    computes on average, without routing or communication: the per-rank bound."""
    local = replace(shape, num_experts=shape.num_experts // dist.get_world_size())
    return balanced_bmm_peer(local, rows=shape.num_tokens * shape.top_k)


EP_PEERS: dict[str, Callable[[Shape], Peer]] = {
    "moetrain": ep_moetrain_peer,
    "moetrain_loop": lambda shape: ep_moetrain_peer(shape, experts_impl="loop"),
    "moetrain_grouped_mm": lambda shape: ep_moetrain_peer(shape, experts_impl="grouped_mm"),
    "moetrain_overlap2": lambda shape: ep_moetrain_peer(shape, overlap_chunks=2),
    "deepspeed": ep_deepspeed_peer,
    "balanced_bmm": ep_balanced_bmm_peer,
}
