"""The training loop: build everything from the config, then step, log, evaluate.

Per optimizer step the (single, in this version) data-parallel rank runs
``global_batch_size / micro_batch_size`` micro-batches one after another (gradient
accumulation); the LM loss of each is divided by that count, and so is the aux-loss gradient
(``MoELayer.aux_loss_scale``).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from moetrain.config.schema import Config
from moetrain.data import BatchIterator, ShuffledSampler, build_datasets, build_tokenizer
from moetrain.models import Transformer
from moetrain.train.lr import build_scheduler
from moetrain.train.metrics import (
    MetricsWriter,
    StepStats,
    bits_per_token,
    console_line,
    peak_flops_per_device,
)
from moetrain.train.optim import build_optimizer
from moetrain.train.tracking import Tracker, save_expert_load_heatmap


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]  # training LM loss per step
    val_losses: list[tuple[int, float]]  # (step, validation loss)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.train
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        train_data, self.val_data, self.data_meta = build_datasets(
            cfg.data, self.tokenizer, t.seq_len, cfg.model.vocab_size
        )
        # the sampler's position is training state (exact resume comes with checkpoints)
        self.train_batches = BatchIterator(
            train_data, ShuffledSampler(len(train_data), t.seed), t.micro_batch_size
        )
        self.model = Transformer(cfg.model)
        self.moe_layers = self.model.moe_layers()
        self.num_micro = t.global_batch_size // t.micro_batch_size
        for layer in self.moe_layers:
            layer.aux_loss_scale = 1.0 / self.num_micro
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        self.peak_flops, self.peak_source = peak_flops_per_device(t.peak_flops_per_device)
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.autocast = (
            torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
            if t.dtype == "bf16"
            else contextlib.nullcontext()
        )

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self._write_run_metadata()
        tracker = Tracker(
            cfg.logging.wandb.mode,
            cfg.logging.wandb.project,
            cfg.logging.wandb.entity,
            self.run_dir,
            dict(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)),  # type: ignore[arg-type]
        )
        writer = MetricsWriter(self.run_dir)
        losses: list[float] = []
        val_losses: list[tuple[int, float]] = []
        load_steps: list[int] = []
        loads: list[list[list[float]]] = []
        val_losses.append((0, self._evaluate_and_log(0, writer, tracker)))  # the start point
        bar = tqdm(
            range(1, t.steps + 1),
            disable=not cfg.logging.progress_bar,
            desc="train",
            dynamic_ncols=True,
        )
        self.model.train()
        for step in bar:
            start = time.perf_counter()
            stats, grad_norm, lr = self.train_step()
            seconds = time.perf_counter() - start
            losses.append(stats.loss_sum / stats.micro_batches)
            if step % t.log_interval == 0 or step == t.steps:
                row = self._log_row(step, stats, grad_norm, lr, seconds)
                writer.write(row)
                tracker.log(row, step)
                bar.write(console_line(row))
                load_steps.append(step)
                loads.append(row["expert_load"])
            if step == t.steps or (t.eval_interval and step % t.eval_interval == 0):
                val_losses.append((step, self._evaluate_and_log(step, writer, tracker, bar)))
        heatmap = self.run_dir / "expert_load.png"
        if save_expert_load_heatmap(load_steps, loads, heatmap):
            tracker.log_image("expert_load_heatmap", heatmap, t.steps)
        writer.close()
        tracker.finish()
        return TrainResult(self.run_dir, losses, val_losses)

    def train_step(self) -> tuple[StepStats, float, float]:
        t = self.cfg.train
        stats = StepStats()
        for inputs_BS, targets_BS in self.train_batches.next_global_batch(t.global_batch_size):
            loss = self._lm_loss(inputs_BS, targets_BS)
            (loss / self.num_micro).backward()
            stats.add_micro_batch(loss.detach(), self.moe_layers)
        grad_norm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.moe_layers:
            layer.update_expert_bias()
        return stats, grad_norm, lr

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        # host sync: the norm is logged every step
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    def _evaluate_and_log(
        self, step: int, writer: MetricsWriter, tracker: Tracker, bar: tqdm | None = None
    ) -> float:
        val = self.evaluate()
        row = {"step": step, "val_loss": val, "val_bpt": bits_per_token(val)}
        writer.write(row)
        tracker.log(row, step)
        (bar.write if bar is not None else print)(
            f"step {step:>5} | val loss {val:.4f} | {row['val_bpt']:.3f} bits/token"
        )
        return val

    def _lm_loss(self, inputs_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy (mean over tokens), the logits upcast to fp32."""
        with self.autocast:
            logits_BSV = self.model(inputs_BS)
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over ``train.eval_batches`` fixed validation micro-batches."""
        t = self.cfg.train
        self.model.eval()
        total = 0.0
        batches = self.val_data.fixed_batches(t.eval_batches, t.micro_batch_size)
        for inputs_BS, targets_BS in batches:
            total += self._lm_loss(inputs_BS, targets_BS).item()
        self.model.train()
        return total / len(batches)

    def _log_row(
        self, step: int, stats: StepStats, grad_norm: float, lr: float, seconds: float
    ) -> dict:
        tokens = self.cfg.train.global_batch_size * self.cfg.train.seq_len
        tokens_per_s = tokens / seconds
        row = {
            "step": step,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
        }
        row.update(stats.as_dict())
        return row

    def _write_run_metadata(self) -> None:
        meta = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "data": self.data_meta,
            "params_total": self.model.num_params(),
            "params_active": self.model.num_active_params(),
            "flops_per_token": self.flops_per_token,
            "peak_flops_per_device": self.peak_flops,
            "peak_flops_source": self.peak_source,
        }
        (self.run_dir / "run_meta.json").write_text(json.dumps(meta, indent=2, default=str))
