"""FSSDP MoE layers: equal to the single-process layer, and moving only the planned experts.

- Results (2 and 4 gloo processes): every rank's output and its input, router and shared-expert
  gradients equal the single-process layer's on that rank's micro-batch, and every shard's
  gradient equals the single-process expert gradient summed over all ranks' micro-batches —
  dropless, capacity with both drop policies and padding, GELU experts with gated shared
  experts, forced Zipf-skewed routing (hot experts replicated) with and without
  rematerialization, a rank with no tokens, and a forward without gradients. Tolerance rtol
  1e-5 / atol 1e-5 (an expert's gradient is summed over its replicas, in another order).
- Communication (collectives wrapped to record their rows): in one step the expert bytes a rank
  receives in the SparseAllGather equal the experts it materializes x expert size x (N - 1) / N
  (summed over ranks: over materialized (expert, rank) pairs), the re-gather in backward the
  same, the gradient bytes it sends in the SparseReduceScatter likewise; an expert no token
  chose is never materialized, moves zero bytes and gets a zero gradient. All-gathering every
  expert would move E x size x (N - 1) / N per rank, which the skewed case rules out.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from benchmarks.skew import skewed_topk
from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.router import Router, RouterOutput
from moetrain.parallel.fssdp import FSSDPDispatcher, FSSDPOptions, apply_fssdp
from moetrain.testing import run_distributed

E, D, F, K, T = 8, 16, 32, 2, 24
CASES: dict[str, dict[str, Any]] = {
    "dropless": {},
    "capacity_probs": dict(capacity_factor=0.5),
    "capacity_position_padded": dict(
        capacity_factor=0.75, drop_policy="position", pad_to_capacity=True
    ),
    "gelu_shared_gated": dict(
        activation="gelu", score_func="sigmoid", num_shared_experts=1, shared_gate=True
    ),
    "zipf_skew": dict(forced="zipf1.5"),
    "zipf_skew_no_remat": dict(forced="zipf1.5", rematerialize=False),
    "hot_expert_capacity": dict(forced="hot", capacity_factor=1.0),
    # aux/z losses are means over tokens: undefined with none
    "empty_rank": dict(num_shared_experts=1, aux_loss_coeff=0.0, empty_rank=1),
    # every token picks experts 0 and 1, a large slack keeps each on one rank: the other ranks
    # compute nothing (but still take part in every exchange)
    "idle_ranks": dict(forced="uniform", forced_experts=2, slack=10.0),
}
LAYER_KEYS = ("forced", "forced_experts", "rematerialize", "slack", "empty_rank")


class ForcedRouter(Router):
    """The learned router's scores, with the top-k ids taken from ``ids`` (set per call); the
    load hooks stay no-ops (the ids are not the learned router's choice)."""

    def __init__(self, inner: Router) -> None:
        super().__init__(inner.cfg)
        self.inner = inner
        self.ids: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor, token_ids=None) -> RouterOutput:
        out = self.inner(x_TD, token_ids)
        assert self.ids is not None and out.probs_TE is not None
        weights = out.probs_TE.gather(-1, self.ids)
        weights = weights / weights.sum(-1, keepdim=True)
        return RouterOutput(self.ids, weights, out.logits_TE, out.probs_TE)


def build(case: str, world: int) -> tuple[MoEConfig, MoELayer, dict[str, Any]]:
    opts = CASES[case]
    layer_opts = {k: opts[k] for k in LAYER_KEYS if k in opts}
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        dim=D,
        hidden_dim=F,
        **{k: v for k, v in opts.items() if k not in LAYER_KEYS},
    )
    torch.manual_seed(0)
    full = MoELayer(cfg)
    full.reset_parameters(std=0.3)  # peaked routing, outputs well above rounding
    if "forced" in opts:
        full.router = ForcedRouter(full.router)
    return cfg, full, layer_opts


def micro_batch(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, output gradient, forced ids or None) of ``rank``'s micro-batch."""
    opts = CASES[case]
    n = 0 if opts.get("empty_rank") == rank else T
    gen = torch.Generator().manual_seed(100 + rank)
    x, g = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    ids = None
    if "forced" in opts:
        # expert E - 1 is never chosen
        ids = skewed_topk(n, opts.get("forced_experts", E - 1), K, opts["forced"], gen)
    return x, g, ids


def forward_backward(layer: MoELayer, x, g, ids) -> dict[str, Any]:
    if ids is not None:
        layer.router.ids = ids  # type: ignore[union-attr]
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    held = getattr(layer.dispatcher, "materialized_bytes", None)
    (y * g).sum().backward()
    out: dict[str, Any] = {"y": y.detach(), "x.grad": x.grad, "held": held}
    if held is not None:
        out["held_after_backward"] = layer.dispatcher.materialized_bytes  # type: ignore[attr-defined]
    for name, p in layer.named_parameters():
        out[f"{name}.grad"] = p.grad
    return out


def reference(case: str, full: MoELayer, world: int) -> list[dict[str, Any]]:
    """The single-process layer on each rank's micro-batch in turn."""
    return [forward_backward(full, *micro_batch(case, r)) for r in range(world)]


def used_experts(case: str, world: int) -> list[int]:
    ids = torch.cat([micro_batch(case, r)[2] for r in range(world)])  # type: ignore[misc]
    return sorted(set(ids.flatten().tolist()))


def fssdp_layer(cfg: MoEConfig, full: MoELayer, mesh: DeviceMesh, opts: dict) -> MoELayer:
    layer = MoELayer(cfg)
    if "forced" in opts:
        layer.router = ForcedRouter(layer.router)
    layer.load_state_dict(full.state_dict())
    options = FSSDPOptions(opts.get("rematerialize", True), opts.get("slack", 0.05))
    apply_fssdp(layer, mesh, options)
    return layer


def close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def check_case(case: str, rank: int, world: int, mesh: DeviceMesh) -> dict[str, Any]:
    cfg, full, opts = build(case, world)
    refs = reference(case, full, world)
    layer = fssdp_layer(cfg, full, mesh, opts)
    dispatcher = layer.dispatcher
    assert isinstance(dispatcher, FSSDPDispatcher)
    dispatcher.bytes_log = []
    log = CollectiveLog()
    with log:
        got = forward_backward(layer, *micro_batch(case, rank))
    want = refs[rank]
    # materialized weights: freed after the forward with rematerialization, after the backward
    # without; always after the backward
    plan = dispatcher.last_plan
    assert plan is not None
    held = 0 if opts.get("rematerialize", True) else int(plan.experts_Q[rank]) * expert_bytes(case)
    assert (got["held"], got["held_after_backward"]) == (held, 0), case
    close(got["y"], want["y"], f"{case} y")
    close(got["x.grad"], want["x.grad"], f"{case} x.grad")
    for name, p in layer.named_parameters():
        key = f"{name}.grad"
        if name.startswith("experts."):
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor)
            summed = sum(r[key] for r in refs)
            close(p.grad.full_tensor(), summed, f"{case} {key} (summed over ranks)")
        elif want[key] is None:
            assert got[key] is None, key
        else:
            close(got[key], want[key], f"{case} {key}")
    # no gradients: the same output, nothing kept
    x, _, ids = micro_batch(case, rank)
    if ids is not None:
        layer.router.ids = ids  # type: ignore[union-attr]
    with torch.no_grad():
        close(layer(x), want["y"], f"{case} y without gradients")
    expert_grads = {n: p.grad.full_tensor() for n, p in layer.experts.named_parameters()}
    return {
        "events": log.events,
        "bytes": dispatcher.bytes_log[0],
        "replicas": plan.replicas_E.tolist(),
        "experts_here": int(plan.experts_Q[rank]),
        "used": used_experts(case, world) if "forced" in opts else None,
        "grad_of_unused": [g[E - 1].abs().max().item() for g in expert_grads.values()],
        "rematerialize": opts.get("rematerialize", True),
    }


class CollectiveLog:
    """Wraps ``all_to_all_single``: records, per call, the row width and the bytes this rank
    sent to and received from other ranks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []
        self.original = dist.all_to_all_single

    def __enter__(self) -> CollectiveLog:
        def a2a(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
            me = dist.get_rank(kwargs.get("group"))
            width = math.prod(input.shape[1:])
            row_bytes = width * input.element_size()
            sent = sum(input_split_sizes or []) - (input_split_sizes or [0] * (me + 1))[me]
            recv = sum(output_split_sizes or []) - (output_split_sizes or [0] * (me + 1))[me]
            self.events.append(("a2a", width, sent * row_bytes, recv * row_bytes))
            return self.original(output, input, output_split_sizes, input_split_sizes, **kwargs)

        dist.all_to_all_single = a2a
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self.original


def run_cases(rank: int, world: int) -> dict[str, Any]:
    mesh = DeviceMesh("cpu", list(range(world)))
    return {case: check_case(case, rank, world, mesh) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4])
def results(request) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, run_distributed(run_cases, world, timeout=150)


@pytest.mark.timeout(180)
def test_fssdp_layer_equals_single_process(results):
    world, per_rank = results
    assert len(per_rank) == world and all(set(r) == set(CASES) for r in per_rank)


def expert_bytes(case: str) -> int:
    """One expert's weights in bytes (fp32): w1, w2 and (SwiGLU) w3."""
    weights = 2 if CASES[case].get("activation") == "gelu" else 3
    return weights * F * D * 4


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "case", ["dropless", "zipf_skew", "zipf_skew_no_remat", "hot_expert_capacity", "idle_ranks"]
)
def test_only_planned_experts_move(results, case):
    world, per_rank = results
    size = expert_bytes(case)
    share = size * (world - 1) // world  # an expert's bytes from the other N - 1 shards
    width = 3 * (F // world) * D  # one expert's packed shard
    total_gathered = total_reduced = 0
    for rank, res in enumerate(per_rank):
        r = res[case]
        wide = [ev for ev in r["events"] if ev[1] == width]
        remat = r["rematerialize"]
        # forward: one SparseAllGather; backward: (re-gather,) SparseReduceScatter
        assert len(wide) == (3 if remat else 2), r["events"]
        gather, *regather, reduce = wide
        here = r["experts_here"] * share
        assert gather[3] == here, f"rank {rank}: gathered {gather[3]} bytes, expected {here}"
        assert reduce[2] == here, f"rank {rank}: reduced {reduce[2]} bytes, expected {here}"
        if remat:
            assert regather[0][3] == here
        # the dispatcher's own accounting agrees with the wire
        b = r["bytes"]
        assert (b.gather, b.reduce, b.regather) == (here, here, here if remat else 0)
        total_gathered += gather[3]
        total_reduced += reduce[2]
    replicas = per_rank[0][case]["replicas"]
    assert all(r[case]["replicas"] == replicas for r in per_rank)  # one plan on every rank
    pairs = sum(replicas)
    assert total_gathered == total_reduced == pairs * share
    used = per_rank[0][case]["used"]
    if used is not None:  # forced routing: the unused expert is nowhere and moves nothing
        assert E - 1 not in used
        assert [e for e in range(E) if replicas[e] > 0] == used
        if case.startswith("zipf") and world == 4:  # expert 0 takes ~40% of the rows
            assert replicas[0] >= 2
        if case == "idle_ranks":
            assert replicas == [1, 1] + [0] * (E - 2)
            assert [r[case]["experts_here"] for r in per_rank] == [1, 1] + [0] * (world - 2)
        assert total_gathered < world * E * share  # all-gathering every expert fails here
        for res in per_rank:
            assert res[case]["grad_of_unused"] == [0.0] * len(res[case]["grad_of_unused"])


# --- the trainer under parallel.expert_sharding=fssdp ----------------------------------------


def trainer_layout(rank: int, world: int, data_dir: str) -> dict[str, Any]:
    """One AdamW step of ``tiny`` under FSSDP: what the experts, their optimizer state and the
    logged row look like."""
    import tempfile
    from pathlib import Path

    from torch.distributed.tensor import Shard

    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.trainer import Trainer

    cfg = layout_config(data_dir, ["parallel.expert_sharding=fssdp", "optim=adamw"])
    F_, D_ = cfg.model.moe.hidden_dim, cfg.model.dim
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), init_parallel(parallel_dims(cfg)))
        stats, _, _ = trainer.train_step()
        for layer in trainer.moe_layers:
            assert isinstance(layer.dispatcher, FSSDPDispatcher)
            for name, p in layer.experts.named_parameters():
                f_dim = 2 if name == "w2_EDF" else 1
                assert isinstance(p, DTensor) and p.placements == (Shard(f_dim),), name
                assert p.device_mesh.mesh_dim_names == ("fssdp",)
                assert p.device_mesh.mesh.tolist() == list(range(world))
                local = (E, D_, F_ // world) if f_dim == 2 else (E, F_ // world, D_)
                assert tuple(p.to_local().shape) == local, name
                for key in ("exp_avg", "exp_avg_sq"):  # optimizer state sharded like the weight
                    state = trainer.optimizer.state[p][key]
                    assert isinstance(state, DTensor) and state.placements == p.placements
                    assert tuple(state.to_local().shape) == local
        layout = trainer._layout()
        return {"row": stats, "layout": layout, "moe_layers": len(trainer.moe_layers)}


@pytest.mark.timeout(180)
def test_trainer_shards_experts_and_logs_plans(tmp_path):
    from moetrain.testing.layouts import write_token_dir

    data_dir = write_token_dir(str(tmp_path / "tokens"))
    results = run_distributed(trainer_layout, 2, data_dir, timeout=150)
    row = results[0]["row"]
    layers = results[0]["moe_layers"]
    assert len(row["fssdp_replicas"]) == layers and all(len(r) == E for r in row["fssdp_replicas"])
    # every expert got tokens in every call: each is materialized on 1 or 2 ranks
    assert all(1.0 <= x <= 2.0 for r in row["fssdp_replicas"] for x in r)
    assert all(1.0 <= x <= 1.1 for x in row["fssdp_max_over_mean"])
    assert results[0]["layout"]["expert_sharding"] == "fssdp"
