"""The overlapped (chunked) and hierarchical all-to-all dispatchers.

- Results: for overlap degrees 2, 3 and more than the rows, every rank's output and its input,
  router, shared-expert and expert gradients equal the unchunked dispatcher's to rtol 1e-5 /
  atol 1e-5 (the layer's unit-test tolerance), not bitwise: a GEMM's result for one row depends
  on how many rows the GEMM has (MKL takes other kernels for a handful of rows: up to 1.4e-6
  apart for one 16-wide row), and each expert weight gradient is a sum of per-chunk GEMMs.
  Cases: dropless, capacity with both drop policies and padding, gated shared experts with
  uneven token counts, and a rank with no tokens. The hierarchical exchange only moves rows, so
  it equals the flat one bit for bit, expert gradients included.
- Order: wrapped collectives and expert calls record what is issued, waited for and computed
  (no timing): the all-to-all of chunk i+1 is issued before the experts start chunk i, forward
  and backward, and the shared experts run before the first dispatch is waited for.
- Groups: on 4 processes posing as 2 nodes x 2, every collective of the hierarchical exchange
  runs either inside a node or between the peers of one local index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.ep_comm import HierarchicalAllToAll, build_node_groups
from moetrain.testing import run_distributed

E, D, F, K = 8, 16, 32, 2
DEGREES = (2, 3, 64)  # 64 > rows on any rank: most chunks are empty
CASES: dict[str, tuple[dict, str]] = {
    "dropless": ({}, "even"),
    "capacity_probs": (dict(capacity_factor=0.5), "even"),
    "capacity_position_padded": (
        dict(capacity_factor=0.75, drop_policy="position", pad_to_capacity=True),
        "even",
    ),
    "shared_gated_uneven": (
        dict(score_func="sigmoid", num_shared_experts=1, shared_gate=True),
        "uneven",
    ),
    # aux/z losses are means over tokens: undefined with none
    "empty_rank": (dict(num_shared_experts=1, aux_loss_coeff=0.0), "empty"),
}


def num_tokens(tokens: str, rank: int) -> int:
    if tokens == "uneven":
        return 3 + 5 * rank
    if tokens == "empty":
        return 0 if rank == 1 else 12
    return 12


def make_layers(case: str, world: int):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=K, dim=D, hidden_dim=F, **CASES[case][0])
    full = MoELayer(cfg)
    full.reset_parameters(std=0.3)  # peaked routing, outputs well above rounding
    return cfg, full


def ep_layer(cfg: MoEConfig, full: MoELayer, rank: int, world: int, dispatcher) -> MoELayer:
    """``full`` with this rank's experts only, dispatching through ``dispatcher``."""
    layer = MoELayer(cfg)
    layer.load_state_dict(full.state_dict())
    local = E // world
    layer.experts = GroupedExperts(cfg, num_experts=local)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(full.experts, name)[rank * local : (rank + 1) * local])
    layer.dispatcher = dispatcher
    return layer


def inputs(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    T = num_tokens(CASES[case][1], rank)
    return torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)


def forward_backward(layer: MoELayer, x: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * g).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in layer.named_parameters()})
    return out


def assert_equal(got: dict, want: dict, label: str, inexact: Callable[[str], bool]) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        a = got[name]
        if w is None or a is None:
            assert a is None and w is None, f"{label} {name}: one gradient is missing"
            continue
        if inexact(name):
            torch.testing.assert_close(
                a, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{label} {n}: {m}"
            )
        else:
            diff = (a - w).abs().max().item() if a.numel() else 0.0
            assert torch.equal(a, w), f"{label} {name}: not bitwise equal (max diff {diff:.3g})"


# --- results ---------------------------------------------------------------------------------


def overlap_matches(rank: int, world: int) -> None:
    for case in CASES:
        cfg, full = make_layers(case, world)
        x, g = inputs(case, rank)
        base = ep_layer(cfg, full, rank, world, AllToAllDispatcher(E, None))
        want = forward_backward(base, x, g)
        y_single = full(x)  # the layer on this rank's tokens alone (forward only)
        torch.testing.assert_close(want["y"], y_single.detach(), rtol=1e-5, atol=1e-6)
        for degree in DEGREES:
            layer = ep_layer(cfg, full, rank, world, AllToAllDispatcher(E, None, degree))
            got = forward_backward(layer, x, g)
            assert_equal(got, want, f"{case} degree {degree}:", lambda name: True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_dispatcher_equals_unchunked(world):
    run_distributed(overlap_matches, world, timeout=150)


# --- the hierarchical exchange ----------------------------------------------------------------

PER_NODE = 2  # 4 processes posing as 2 nodes x 2 ranks


class GroupLog:
    """Wraps the collectives the exchanges use; records each one's member ranks."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, tuple[int, ...]]] = []
        self.originals = {
            name: getattr(dist, name) for name in ("all_to_all_single", "all_gather_into_tensor")
        }

    def __enter__(self) -> GroupLog:
        for name, fn in self.originals.items():

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                group = kwargs.get("group")
                ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
                self.groups.append((_name, ranks))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def crosses_nodes_off_peers(ranks: tuple[int, ...]) -> bool:
    """True when the group spans nodes and is not one local index's peer group."""
    nodes = {r // PER_NODE for r in ranks}
    locals_ = {r % PER_NODE for r in ranks}
    return len(nodes) > 1 and len(locals_) > 1


def hierarchical_matches(rank: int, world: int) -> dict[str, list]:
    groups = build_node_groups([list(range(world))], PER_NODE)
    logs: dict[str, list] = {"hierarchical": [], "flat": []}
    for case in ("dropless", "capacity_position_padded", "empty_rank"):
        cfg, full = make_layers(case, world)
        x, g = inputs(case, rank)
        for degree in (1, 2):
            flat = ep_layer(cfg, full, rank, world, AllToAllDispatcher(E, None, degree))
            with GroupLog() as log:
                want = forward_backward(flat, x, g)
            logs["flat"] += log.groups
            comm = HierarchicalAllToAll(groups, rank)
            hier = ep_layer(cfg, full, rank, world, AllToAllDispatcher(E, None, degree, comm))
            with GroupLog() as log:
                got = forward_backward(hier, x, g)
            logs["hierarchical"] += log.groups
            assert_equal(got, want, f"{case} degree {degree} hierarchical:", lambda n: False)
    return logs


@pytest.mark.timeout(180)
def test_hierarchical_equals_flat_and_crosses_nodes_only_between_peers():
    results = run_distributed(hierarchical_matches, 4, timeout=150)
    for rank, logs in enumerate(results):
        hier = logs["hierarchical"]
        assert hier, "no collective recorded"
        offenders = [(op, ranks) for op, ranks in hier if crosses_nodes_off_peers(ranks)]
        assert not offenders, f"rank {rank}: inter-node collectives off the peer groups {offenders}"
        me_node, me_local = divmod(rank, PER_NODE)
        used = {ranks for _, ranks in hier}
        peers = tuple(r for r in range(4) if r % PER_NODE == me_local)
        node = tuple(r for r in range(4) if r // PER_NODE == me_node)
        assert used == {peers, node}, f"rank {rank}: used groups {used}"
        # the check can fail: the flat exchange does cross nodes off the peer groups
        assert any(crosses_nodes_off_peers(ranks) for _, ranks in logs["flat"])


# --- order of issue, wait and compute ---------------------------------------------------------


class _Mark(torch.autograd.Function):
    """Identity that records ``tag`` when its gradient passes."""

    @staticmethod
    def forward(ctx, x, events, tag):
        ctx.events, ctx.tag = events, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(ctx.tag)
        return grad, None, None


class _RecordedWork:
    def __init__(self, work, events: list, k: int) -> None:
        self.work, self.events, self.k = work, events, k

    def wait(self):
        self.events.append(("wait", self.k))
        return self.work.wait()


def instrument(layer: MoELayer, events: list) -> Callable[[], None]:
    """Record async all-to-alls (issue k, rows sent, rows received), their waits, the experts'
    forward / backward start / backward end per call, and the shared experts. Returns undo."""
    original_a2a = dist.all_to_all_single
    issued = [0]

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
            async_op=False):  # fmt: skip
        work = original_a2a(
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )
        if not async_op:
            events.append(("sync",))
            return work
        k = issued[0]
        issued[0] += 1
        events.append(("issue", k, sum(input_split_sizes), sum(output_split_sizes)))
        return _RecordedWork(work, events, k)

    compute = layer.experts.compute
    calls = [0]

    def traced_compute(rows, counts, *weights):
        j = calls[0]
        calls[0] += 1
        events.append(("experts_fwd", j, rows.shape[0]))
        rows = _Mark.apply(rows, events, ("experts_bwd_end", j))
        out = compute(rows, counts, *weights)
        return _Mark.apply(out, events, ("experts_bwd_start", j))

    assert layer.shared_experts is not None
    pre = layer.shared_experts.register_forward_pre_hook(
        lambda m, a: events.append(("shared_fwd",))
    )
    post = layer.shared_experts.register_forward_hook(
        lambda m, a, out: _Mark.apply(out, events, ("shared_bwd",))
    )
    dist.all_to_all_single = a2a
    layer.experts.compute = traced_compute  # type: ignore[method-assign]

    def undo() -> None:
        dist.all_to_all_single = original_a2a
        pre.remove()
        post.remove()
        del layer.experts.compute

    return undo


def schedule(n: int, dispatch: str, combine: str) -> list[str]:
    """The documented issue order: dispatch 0 and 1, then per chunk i: combine i, dispatch
    i+2 (backward: the output gradient plays dispatch, the rows' gradient combine)."""
    labels = [f"{dispatch}{i}" for i in range(min(2, n))]
    for i in range(n):
        labels.append(f"{combine}{i}")
        if i + 2 < n:
            labels.append(f"{dispatch}{i + 2}")
    return labels


def record_order(rank: int, world: int, degree: int) -> list:
    cfg, full = make_layers("shared_gated_uneven", world)
    layer = ep_layer(cfg, full, rank, world, AllToAllDispatcher(E, None, degree))
    x, g = inputs("dropless", rank)
    x.requires_grad_(True)
    events: list = []
    undo = instrument(layer, events)
    y = layer(x)
    events.append(("backward",))
    (y * g).sum().backward()
    undo()
    return events


def check_order(events: list, n: int) -> None:
    split = events.index(("backward",))
    fwd, bwd = events[:split], events[split:]

    def positions(part: list, labels: list[str]) -> dict[str, int]:
        issues = [i for i, ev in enumerate(part) if ev[0] == "issue"]
        assert len(issues) == len(labels), part
        pos = {}
        for label, i in zip(labels, issues):
            k = part[i][1]
            pos[label] = i
            pos["wait " + label] = part.index(("wait", k))
            pos["rows " + label] = part[i][2:]  # (sent, received)
        for i, ev in enumerate(part):
            if ev[0] in ("experts_fwd", "experts_bwd_start", "experts_bwd_end"):
                pos[f"{ev[0]} {ev[1]}"] = i
                if ev[0] == "experts_fwd":
                    pos[f"rows experts {ev[1]}"] = ev[2]
            elif ev[0] in ("shared_fwd", "shared_bwd"):
                pos[ev[0]] = i
        return pos

    p = positions(fwd, schedule(n, "d", "c"))
    assert fwd[0] == ("sync",)  # the counts exchange decides every split first
    assert p["d0"] < p["shared_fwd"] < p["wait d0"], fwd
    for i in range(n):
        # labels agree with the data: dispatch i delivers, and combine i returns, chunk i's rows
        assert p[f"rows d{i}"][1] == p[f"rows experts {i}"] == p[f"rows c{i}"][0]
        assert p[f"wait d{i}"] < p[f"experts_fwd {i}"] < p[f"c{i}"]
        if i + 1 < n:
            assert p[f"d{i + 1}"] < p[f"experts_fwd {i}"], fwd  # next chunk in flight
            assert p[f"c{i}"] < p[f"experts_fwd {i + 1}"] < p[f"wait c{i}"], fwd

    q = positions(bwd, schedule(n, "gc", "gd"))
    for i in range(n):
        assert q[f"rows gc{i}"][1] == p[f"rows experts {i}"] == q[f"rows gd{i}"][0]
        assert q[f"wait gc{i}"] < q[f"experts_bwd_start {i}"] < q[f"experts_bwd_end {i}"]
        assert q[f"experts_bwd_end {i}"] < q[f"gd{i}"]
        if i + 1 < n:
            assert q[f"gc{i + 1}"] < q[f"experts_bwd_start {i}"], bwd  # next chunk in flight
            assert q[f"gd{i}"] < q[f"experts_bwd_start {i + 1}"] < q[f"wait gd{i}"], bwd
    # the shared experts' backward runs while the rows' gradients are in flight
    assert q[f"gd{n - 1}"] < q["shared_bwd"] < q["wait gd0"], bwd


@pytest.mark.timeout(120)
@pytest.mark.parametrize("degree", [3])
def test_next_chunk_is_in_flight_while_experts_compute(degree):
    for rank, events in enumerate(run_distributed(record_order, 2, degree, timeout=90)):
        try:
            check_order(events, degree)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}\n{events}") from err
