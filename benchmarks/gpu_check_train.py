"""The GPU check's training part: a Mixtral-shaped layer stack, trained with each experts_impl.

The stack (``mixtral_stack``): Mixtral-8x7B's per-layer shapes (D=4096, 32 query / 8 key-value
heads of 128, E=8 experts of F=14336, top-2, softmax router renormalized, aux loss 0.02, RoPE
theta 1e6), 2 layers, vocabulary 8192 (untied), one batch of 4 x 2048 tokens. 2.97B parameters:
fp32 weights, gradients and AdamW's two moments take 44 GiB; the bf16 copies of the expert weights
and the activations bring the estimated peak to about 58 GiB, within one 80 GB GPU. With
``cpu``: the same structure at D=64, F=224, 4 heads of 16, vocabulary 256, 4 x 64 tokens.

Each run builds the model on the device (distributions from the model's own init specs, drawn with
the device's generator: fast, not the layout-invariant scheme), AdamW (``build_optimizer``:
torch's fused kernels on CUDA) and trains the same batch under bf16 autocast, so the loss must
fall: warm-up steps first, then steps timed together for tokens/s and MFU (no phase timer, one
sync at each end), then steps under :class:`moetrain.phases.PhaseTimer` for the step-time split.
A run passes when every loss is finite and the last is below the first.

Nothing here imports hydra-core, omegaconf or wandb: the model, the optimizer builder and the
peak table are library modules that do not.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moetrain.config.schema import OptimConfig
from moetrain.models import ModelConfig, Transformer
from moetrain.models.init import named_tensors
from moetrain.moe import MoEConfig
from moetrain.phases import PhaseTimer
from moetrain.train.optim import build_optimizer
from moetrain.train.throughput import model_flops_utilization, peak_flops_per_device

IMPLS = ("grouped_mm", "loop")
GPU_STEPS, CPU_STEPS = 20, 3
GIB = 2**30


def mixtral_stack(experts_impl: str, cpu: bool) -> tuple[ModelConfig, int, int]:
    """(model config, batch size, sequence length): see the module docstring."""
    if cpu:
        dim, hidden, heads, kv_heads, head_dim, vocab, batch, seq = 64, 224, 4, 2, 16, 256, 4, 64
    else:
        dim, hidden, heads, kv_heads, head_dim, vocab, batch, seq = (
            4096, 14336, 32, 8, 128, 8192, 4, 2048
        )  # fmt: skip
    moe = MoEConfig(
        dim=dim,
        num_experts=8,
        top_k=2,
        hidden_dim=hidden,
        score_func="softmax",
        norm_topk_prob=True,
        aux_loss_coeff=0.02,
        experts_impl=experts_impl,
    )
    cfg = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dense_hidden_dim=hidden,
        max_seq_len=seq,
        rope_theta=1e6,
        first_k_dense=0,
        moe=moe,
    )
    return cfg, batch, seq


def plan_steps(steps: int) -> tuple[int, int, int]:
    """(warm-up, timed, split) steps out of ``steps`` (at least 3: one of each)."""
    if steps < 3:
        raise ValueError(f"--steps must be at least 3 (warm-up, timed, split), got {steps}")
    warmup, split = (1, 1) if steps < 10 else (2, 3)
    return warmup, steps - warmup - split, split


def build_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    """``Transformer(cfg)`` allocated on ``device``, every tensor drawn there from its init spec."""
    with torch.device("meta"):
        model = Transformer(cfg)
    specs = model.init_specs()
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in named_tensors(model):
            spec = specs[name]
            if spec.kind == "constant":
                t.fill_(spec.value)
            else:
                t.normal_(0.0, spec.value)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_memory_source": "torch.cuda.max_memory_allocated (this run)",
        }
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "peak_memory_gib": round(kib / 2**20, 3),
        "peak_memory_source": "ru_maxrss (the whole process so far)",
    }


class _Trainer:
    """One experts_impl's model, optimizer and fixed batch; ``step()`` trains on it once."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, device: torch.device) -> None:
        self.device = device
        self.model = build_model(cfg, device)
        lr = 3e-3 if device.type == "cpu" else 3e-4  # full width: a gentler step in bf16
        impl = "fused" if device.type == "cuda" else "foreach"
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=lr, implementation=impl))
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
        self.tokens = tokens.to(device)
        self.moe_layers = self.model.moe_layers()
        self.count = 0

    def step(self, backward: Callable[[Tensor], None] | None = None) -> Tensor:
        """One optimizer step on the batch; returns the loss (on the device, not synced)."""
        for layer in self.moe_layers:
            layer.start_step(self.count)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(self.tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), self.tokens[:, 1:].flatten())
        (backward or Tensor.backward)(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        return loss.detach()


def train_run(
    impl: str, cpu: bool, device: torch.device, steps: int, peak_flops: float
) -> dict[str, Any]:
    """One experts_impl's run: tokens/s, MFU (against ``peak_flops`` per second), step time,
    the split, peak memory, the losses."""
    cfg, batch, seq = mixtral_stack(impl, cpu)
    warmup, timed, split_steps = plan_steps(steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = _Trainer(cfg, batch, seq, device)
    losses = [trainer.step() for _ in range(warmup)]
    _sync(device)
    start = time.perf_counter()
    losses += [trainer.step() for _ in range(timed)]
    _sync(device)
    seconds = time.perf_counter() - start
    timer = PhaseTimer(device)
    for _ in range(split_steps):
        with timer.step():
            losses.append(trainer.step(timer.backward))
    split = timer.result().as_dict()
    values = [float(x) for x in torch.stack(losses).cpu()]
    tokens_per_s = timed * batch * seq / seconds
    flops_per_token = trainer.model.flops_per_token(seq)
    result: dict[str, Any] = {
        "experts_impl": impl,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(seconds / timed * 1e3, 3),
        "mfu": round(model_flops_utilization(tokens_per_s, flops_per_token, peak_flops, 1), 4),
        "split": split,
        **_peak_memory(device),
        "losses": [round(v, 5) if math.isfinite(v) else None for v in values],  # JSON: no NaN
        "loss_decreased": values[-1] < values[0],
    }
    problem = _loss_problem(values)
    result["ok"] = problem is None
    if problem:
        result["error"] = problem
    return result


def _loss_problem(losses: list[float]) -> str | None:
    if not all(math.isfinite(v) for v in losses):
        return f"non-finite loss: {losses}"
    if not losses[-1] < losses[0]:
        return f"the loss did not fall on a fixed batch: {losses[0]:.4f} -> {losses[-1]:.4f}"
    return None


def run_training(device: torch.device, steps: int | None = None) -> dict[str, Any]:
    """Both experts_impl runs on ``device`` (``cpu``: the tiny stack): ``{"ok", "model", ...,
    "runs": {impl: run}}``; a run that raises is reported as failed and the other still runs."""
    cpu = device.type == "cpu"
    steps = steps or (CPU_STEPS if cpu else GPU_STEPS)
    warmup, timed, split_steps = plan_steps(steps)
    cfg, batch, seq = mixtral_stack("auto", cpu)
    with torch.device("meta"):
        meta = Transformer(cfg)
    # the table value on a known GPU; else measured (a smaller GEMM on the CPU: seconds, not tens)
    peak = peak_flops_per_device(None, device, n=1024 if cpu else 2048)
    runs = {}
    for impl in IMPLS:
        print(f"gpu_check: training {impl} ({steps} steps)", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        try:
            runs[impl] = train_run(impl, cpu, device, steps, peak.value)
        except Exception as err:  # e.g. out of memory: report it, run the other impl
            runs[impl] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = {k: v for k, v in asdict(cfg).items() if k in _MODEL_FIELDS}
    model["moe"] = {k: v for k, v in asdict(cfg.moe).items() if k in _MOE_FIELDS}
    return {
        "ok": all(run["ok"] for run in runs.values()),
        "model": model,
        "params": meta.num_params(),
        "active_params": meta.num_active_params(),
        "batch": {"batch_size": batch, "seq_len": seq, "tokens_per_step": batch * seq},
        "steps": {"warmup": warmup, "timed": timed, "split": split_steps},
        "dtype": "bf16 autocast, fp32 weights and AdamW state",
        "flops_per_token": meta.flops_per_token(seq),
        "peak_flops": {"value": peak.value, "source": peak.source},
        "runs": runs,
    }


_MODEL_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim")
_MOE_FIELDS = ("num_experts", "top_k", "hidden_dim", "score_func", "aux_loss_coeff")
