"""moetrain.phases: named phases are plain profiler ranges without a timer, and a PhaseTimer
splits a step's time among them, forward and backward, without double counting."""

from __future__ import annotations

import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.checkpoint import checkpoint

from moetrain.models import ModelConfig, Transformer
from moetrain.models.block import TransformerBlock
from moetrain.moe import MoEConfig
from moetrain.phases import PhaseTimer, phase

MODEL_PHASES = {
    "attention",
    "moe/router",
    "moe/dispatcher",
    "moe/dispatch",
    "moe/experts",
    "moe/combine",
}
LEAVES = MODEL_PHASES - {"moe/dispatcher"}


class Sleep(torch.autograd.Function):
    """Identity that sleeps ``fwd_s`` in forward and ``bwd_s`` in backward: known durations."""

    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        time.sleep(fwd_s)
        ctx.bwd_s = bwd_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, None, None


def tiny_model(device="cpu"):
    moe = MoEConfig(dim=32, num_experts=4, top_k=2, hidden_dim=48)
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, dense_hidden_dim=48,
        max_seq_len=16, first_k_dense=0, moe=moe,
    )  # fmt: skip
    with torch.device(device):
        return Transformer(cfg)


def timed_steps(model, device, steps=2):
    timer = PhaseTimer(device)
    tokens = torch.randint(0, 64, (2, 17), device=device)
    for step in range(steps):
        for layer in model.moe_layers():
            layer.start_step(step)
        with timer.step():
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            timer.backward(loss)
    return timer.result()


def check_model_split(split):
    assert split.steps == 2
    assert set(split.phases) == MODEL_PHASES
    for name, t in split.phases.items():
        assert t.forward_ms > 0 and t.backward_ms > 0, name
    assert set(split.leaves()) == LEAVES
    assert split.parents == {
        n: "moe/dispatcher" for n in ("moe/dispatch", "moe/experts", "moe/combine")
    }
    leaves_ms = sum(split.phases[n].total_ms for n in LEAVES)
    assert leaves_ms <= split.step_ms
    assert split.other_ms() == pytest.approx(split.step_ms - leaves_ms)
    children = sum(split.phases[n].total_ms for n in ("moe/dispatch", "moe/experts", "moe/combine"))
    assert children <= split.phases["moe/dispatcher"].total_ms * (1 + 1e-6)


def test_the_model_split_has_every_phase_forward_and_backward_within_the_step():
    split = timed_steps(tiny_model(), "cpu")
    check_model_split(split)
    out = split.as_dict()
    assert out["phases"]["moe/experts"]["inside"] == "moe/dispatcher"
    assert sum(out["phases"][n]["fraction"] for n in LEAVES) <= 1.0


def test_forward_and_backward_go_to_the_phase_that_created_the_nodes():
    """Known sleeps: the outer 0.3 s backward, outside every phase, must not reach "a"; "b"'s
    time counts to its parent "a" as well; "a" and "b" get both their halves."""
    timer = PhaseTimer("cpu")
    x = torch.ones(3, requires_grad=True)
    with timer.step():
        y = Sleep.apply(x, 0.0, 0.3)
        with phase("a"):
            y = Sleep.apply(y, 0.02, 0.03)
            with phase("b"):
                y = Sleep.apply(y, 0.01, 0.05)
        timer.backward((y * 2).sum())
    split = timer.result()
    a, b = split.phases["a"], split.phases["b"]
    assert b.forward_ms >= 10 and b.backward_ms >= 50
    assert a.forward_ms >= 30 and a.backward_ms >= 80
    assert a.backward_ms < 300  # the outer node's backward is "other"
    assert split.leaves() == ["b"] and split.parents == {"b": "a"}
    assert split.other_ms() >= 300 + 20 + 30  # outer + a's own forward and backward
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_recomputation_in_backward_is_not_counted_as_forward():
    timer = PhaseTimer("cpu")
    x = torch.ones(3, requires_grad=True)

    def block(t):
        with phase("c"):
            return Sleep.apply(t, 0.05, 0.0)

    with timer.step():
        y = checkpoint(block, x, use_reentrant=False)
        timer.backward(y.sum())
    forward_ms = timer.result().phases["c"].forward_ms
    assert 50 <= forward_ms < 100  # once, not again when backward recomputes it


def test_without_a_timer_a_phase_is_a_profiler_range():
    assert type(phase("x")) is record_function
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with phase("outside/timer"):
            torch.ones(2).sum()
        timer = PhaseTimer("cpu")
        with timer.step(), phase("inside/timer"):
            torch.ones(2).sum()
    names = {e.name for e in prof.events()}
    assert {"outside/timer", "inside/timer"} <= names


def test_a_compiled_block_runs_with_no_timer():
    fn = torch.compile(lambda t: _phased(t), backend="eager", fullgraph=True)  # no graph break
    t = torch.randn(4)
    torch.testing.assert_close(fn(t), _phased(t))
    model = tiny_model()
    block = model.layers[0]
    assert isinstance(block, TransformerBlock)
    x = torch.randn(2, 8, 32)
    cos, sin = model.rope(torch.arange(8))
    compiled = torch.compile(block, backend="eager")
    torch.testing.assert_close(compiled(x, cos, sin), block(x, cos, sin))


def _phased(t):
    with phase("p"):
        return t.sin() * 2


def test_steps_do_not_nest_and_backward_needs_a_step():
    timer = PhaseTimer("cpu")
    loss = torch.ones(1, requires_grad=True).sum()
    with pytest.raises(RuntimeError, match="must run inside"):
        timer.backward(loss)
    with timer.step(), pytest.raises(RuntimeError, match="already open"), PhaseTimer().step():
        pass
    assert phase("y").__class__ is record_function  # the step closed: no timer left active


@pytest.mark.gpu
def test_the_model_split_on_cuda_events():
    split = timed_steps(tiny_model("cuda"), "cuda")
    check_model_split(split)
