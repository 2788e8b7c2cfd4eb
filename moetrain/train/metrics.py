"""Training metrics: per-step MoE statistics, throughput, MFU, and where they are written.

Every logged step is one JSON object in ``<run.dir>/metrics.jsonl`` with at least ``step``,
``loss`` (language-model cross-entropy only), ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``,
``aux_loss``, ``z_loss``, ``dropped_frac`` and ``expert_load`` (per MoE layer, each expert's
share of the step's assignments). Evaluation rows carry ``val_loss`` and ``val_bpt`` instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetrain.moe import MoELayer

# bf16 dense peak per GPU, FLOP/s (vendor figures, no sparsity)
KNOWN_GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops_per_device(configured: float | None) -> tuple[float, str]:
    """The configured peak, else a known GPU's, else the CPU matmul measured now."""
    if configured:
        return configured, "configured (train.peak_flops_per_device)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_GPU_PEAK.items():
            if key in name:
                return value, f"{key} bf16 table value"
    from moetrain.perf import measure_peak_flops

    return measure_peak_flops(repeats=3), "measured: fp32 2048^3 matmul fwd+bwd"


@dataclass
class StepStats:
    """What the micro-batches of one optimizer step add up to."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    dropped: int = 0
    assignments: int = 0
    load: list[torch.Tensor] = field(default_factory=list)

    def add_micro_batch(self, loss: torch.Tensor, moe_layers: list[MoELayer]) -> None:
        self.loss_sum += loss.item()  # host sync: once per micro-batch
        self.micro_batches += 1
        for i, layer in enumerate(moe_layers):
            s = layer.last_stats
            if s is None:
                continue
            self.aux_loss += s.aux_loss.item()
            self.z_loss += s.z_loss.item()
            self.dropped += int(s.num_dropped)
            self.assignments += s.num_assignments
            counts = s.tokens_per_expert_E.detach().float().cpu()
            if len(self.load) <= i:
                self.load.append(counts)
            else:
                self.load[i] += counts

    def as_dict(self) -> dict:
        n = max(self.micro_batches, 1)
        return {
            "loss": self.loss_sum / n,
            "aux_loss": self.aux_loss / n,
            "z_loss": self.z_loss / n,
            "dropped_frac": self.dropped / self.assignments if self.assignments else 0.0,
            "expert_load": [(c / c.sum().clamp(min=1)).tolist() for c in self.load],
        }


class MetricsWriter:
    """Appends one JSON object per row to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("w")  # a fresh run; resume (checkpoint issue) trims and appends

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def console_line(row: dict) -> str:
    """The compact line printed every log interval."""
    return (
        f"step {row['step']:>5} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"gnorm {row['grad_norm']:.3f} | tok/s {row['tokens_per_s']:,.0f} | "
        f"mfu {100 * row['mfu']:.1f}% | aux {row['aux_loss']:.4f} | z {row['z_loss']:.4f} | "
        f"drop {100 * row['dropped_frac']:.2f}%"
    )


def bits_per_token(loss_nats: float) -> float:
    """Cross-entropy in bits per token (per byte with the byte tokenizer)."""
    return loss_nats / math.log(2)
