"""Training metrics: per-step MoE statistics, throughput, MFU, and where they are written.

Every logged step is one JSON object in ``<run.dir>/metrics.jsonl`` with at least ``step``,
``loss`` (language-model cross-entropy only), ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``,
``aux_loss``, ``z_loss``, ``dropped_frac``, ``expert_load`` (per MoE layer, each expert's
share of the step's assignments), ``dead_experts`` (per MoE layer, experts that got no
assignment in the step), ``router_entropy`` (nats, mean over tokens, layers and micro-batches),
``experts_per_token``, ``ffn_experts_per_token`` and ``unrouted_frac`` (routes of varying width;
``route_share`` with null or zero-computation experts: :meth:`StepStats._route_fields`)
and, with capacity dropping, ``dropped_frac_by_position`` (8 equal spans of the sequence).
An expert placement may add its own fields (FSSDP: ``fssdp_replicas``, ``fssdp_max_over_mean``,
``fssdp_materialized``; see ``moetrain.parallel.fssdp_placement``).
With ``train.nonfinite=skip`` rows carry ``skipped_steps`` (optimizer steps skipped so far in
this process). Evaluation rows carry ``val_loss`` and ``val_bpt`` instead.

``tokens_per_s`` and ``mfu`` are averages over the steps since the previous logged row, not the
logged step alone (``moetrain.train.throughput``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetrain.moe import MoELayer
from moetrain.moe.layer import MoEStats
from moetrain.moe.routes import KINDS


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
    entropy: float = 0.0
    entropy_terms: int = 0
    drops_by_position: torch.Tensor | None = None  # summed over layers and micro-batches
    assignments_per_position: int = 0
    # routes of varying width (moetrain.moe.routes): active slots per kind, per layer
    routes: list[torch.Tensor] = field(default_factory=list)
    routed_tokens: int = 0  # tokens routed, summed over layers and calls
    unrouted: int = 0  # of them, tokens no FFN expert computed

    def add_micro_batch(self, loss: torch.Tensor, moe_layers: list[MoELayer]) -> None:
        """One micro-batch's loss and each layer's ``last_stats`` (layer ``i`` of the list)."""
        self.add_losses(float(loss.item()), 1)  # host sync: once per micro-batch
        for i, layer in enumerate(moe_layers):
            if layer.last_stats is not None:
                self.add_layer_stats(i, layer.last_stats)

    def add_losses(self, loss_sum: float, micro_batches: int) -> None:
        self.loss_sum += loss_sum
        self.micro_batches += micro_batches

    def add_layer_stats(self, index: int, s: MoEStats) -> None:
        """One call of MoE layer ``index`` (its index among the model's MoE layers)."""
        self.aux_loss += s.aux_loss.item()
        self.z_loss += s.z_loss.item()
        self.dropped += int(s.num_dropped)
        self.assignments += int(s.num_assignments)
        self.entropy += s.router_entropy.item()
        self.entropy_terms += 1
        if s.drops_by_position_S is not None:
            drops = s.drops_by_position_S.detach().cpu()
            prev = self.drops_by_position
            self.drops_by_position = drops if prev is None else prev + drops
            self.assignments_per_position += int(s.num_assignments) // drops.numel()
        counts = s.tokens_per_expert_E.detach().float().cpu()
        while len(self.load) <= index:
            self.load.append(torch.zeros_like(counts))
        self.load[index] = self.load[index] + counts
        self.routed_tokens += s.num_tokens
        self.unrouted += 0 if s.unrouted_tokens is None else int(s.unrouted_tokens)
        if s.route_counts is not None:
            kinds = s.route_counts.detach().float().cpu()
            while len(self.routes) <= index:
                self.routes.append(torch.zeros_like(kinds))
            self.routes[index] = self.routes[index] + kinds

    _SCALARS = (
        "loss_sum",
        "micro_batches",
        "aux_loss",
        "z_loss",
        "dropped",
        "assignments",
        "entropy",
        "entropy_terms",
        "assignments_per_position",
        "routed_tokens",
        "unrouted",
    )

    def to_vector(self, num_layers: int, num_experts: int, seq_len: int) -> torch.Tensor:
        """Every count and sum as one float64 vector of a fixed length (layers this rank does not
        hold are zeros): summed over ranks, it is the single-process step's."""
        head = [float(getattr(self, k)) for k in self._SCALARS]
        load = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        for i, counts in enumerate(self.load):
            load[i] = counts.double()
        drops = torch.zeros(seq_len, dtype=torch.float64)
        if self.drops_by_position is not None:
            drops[: self.drops_by_position.numel()] = self.drops_by_position.double()
        has_drops = float(self.drops_by_position is not None)
        head_vec = torch.tensor([*head, has_drops], dtype=torch.float64)
        routes = torch.zeros(num_layers, len(KINDS), dtype=torch.float64)
        for i, kinds in enumerate(self.routes):
            routes[i] = kinds.double()
        return torch.cat([head_vec, load.flatten(), drops, routes.flatten()])

    @classmethod
    def from_vector(
        cls, vec: torch.Tensor, num_layers: int, num_experts: int, seq_len: int
    ) -> StepStats:
        """The inverse of ``to_vector`` (of a sum of them)."""
        out = cls()
        n = len(cls._SCALARS)
        for k, v in zip(cls._SCALARS, vec[:n].tolist()):
            setattr(out, k, round(v) if isinstance(getattr(out, k), int) else v)
        load_end = n + 1 + num_layers * num_experts
        out.load = list(vec[n + 1 : load_end].view(num_layers, num_experts).float())
        if vec[n] > 0:
            out.drops_by_position = vec[load_end : load_end + seq_len].long()
        routes = vec[load_end + seq_len :].view(num_layers, len(KINDS)).float()
        out.routes = list(routes) if bool(routes.sum() > 0) else []
        return out

    def as_dict(self) -> dict:
        return {"loss": self.loss_sum / max(self.micro_batches, 1), **self.moe_fields()}

    def moe_fields(self, micro_batches: int | None = None) -> dict:
        """The MoE fields of a row; losses are means over ``micro_batches`` (default: the ones
        counted here)."""
        n = max(self.micro_batches if micro_batches is None else micro_batches, 1)
        return {
            "aux_loss": self.aux_loss / n,
            "z_loss": self.z_loss / n,
            "dropped_frac": self.dropped / self.assignments if self.assignments else 0.0,
            "expert_load": [(c / c.sum().clamp(min=1)).tolist() for c in self.load],
            "dead_experts": [int((c == 0).sum()) for c in self.load],
            "router_entropy": self.entropy / self.entropy_terms if self.entropy_terms else 0.0,
            **self._drops_by_position(),
            **self._route_fields(),
        }

    def _route_fields(self) -> dict:
        """Per MoE layer: slots per token (``experts_per_token``: the width top-p and
        expert-choice vary), FFN experts per token (``ffn_experts_per_token``, before dropping),
        and with non-FFN experts each kind's share of the slots (``route_share``: ffn, null,
        zero, copy, constant); ``unrouted_frac``: tokens no FFN expert computed."""
        if not self.routes or not self.routed_tokens:
            return {}
        per_layer = self.routed_tokens / len(self.routes)  # every layer routes every token
        fields: dict = {
            "experts_per_token": [float(r.sum()) / per_layer for r in self.routes],
            "ffn_experts_per_token": [float(r[0]) / per_layer for r in self.routes],
            "unrouted_frac": self.unrouted / self.routed_tokens,
        }
        if any(float(r[1:].sum()) > 0 for r in self.routes):
            fields["route_share"] = {
                kind: [float(r[k]) / max(float(r.sum()), 1.0) for r in self.routes]
                for k, kind in enumerate(KINDS)
            }
        return fields

    def _drops_by_position(self, buckets: int = 8) -> dict:
        """Dropped fraction of assignments in ``buckets`` equal spans of sequence positions
        (OpenMoE's drop-towards-the-end), only when capacity dropping is on."""
        drops, per_position = self.drops_by_position, self.assignments_per_position
        if drops is None or per_position == 0:
            return {}
        spans = torch.tensor_split(drops.float(), min(buckets, drops.numel()))
        return {
            "dropped_frac_by_position": [float(s.sum()) / (per_position * len(s)) for s in spans]
        }


class MetricsWriter:
    """Appends one JSON object per row to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        """A fresh run starts the file; a run resumed from step ``resume_step`` keeps the rows up
        to that step (dropping later ones and a half-written last line) and appends."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None or not self.path.exists():
            self._file = self.path.open("w")
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
            if row.get("step", 0) <= resume_step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self._file = self.path.open("a")

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
