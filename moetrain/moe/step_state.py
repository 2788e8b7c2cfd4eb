"""One MoE layer's bookkeeping within an optimizer step: which micro-batch a call is, where its
tokens sit in the global batch (the key of their routing noise), and the running expert counts
of the global aux-loss scope.

Legend: E experts, B sequences, S sequence length.

The trainer (through ``ParallelModel.start_step``) calls :meth:`RoutingStep.start` before each
step's first forward and before each evaluation. Every training-mode forward that is not an
activation-checkpointing recomputation is the step's next micro-batch on this rank; with
``data_ranks`` P and ``data_rank`` r, micro-batch j holds samples ``(j*P + r)*B ...`` of the
global batch (the layout of :mod:`moetrain.data.batches`). Evaluation forwards are numbered the
same way with P = 1 (every rank evaluates every batch). A recomputation is the oldest call not
yet recomputed (backward runs a stage's micro-batches in forward order under every supported
schedule), so it reuses that call's key and counts without a collective.

Under ``train.compile`` the methods named in ``RoutingStep.EAGER_UNDER_COMPILE`` run eagerly
(``moetrain.parallel.compile`` wraps them in ``torch.compiler.disable``: a graph break at each
call): they are host-side bookkeeping, and traced, every new call number or step number would
be a new guard value, i.e. a recompilation per micro-batch and per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moetrain.moe.aux_losses import CountReduce
from moetrain.moe.noise import EVAL, TRAIN, NoiseKey, TokenNoise, global_positions


class RoutingStep:
    """Per-layer, per-step state. ``seed``, ``data_rank`` and ``data_ranks`` are set once by
    whoever places the layer (defaults: seed 0, one process)."""

    # host-side bookkeeping (global_counts also all-reduces): never traced by torch.compile
    EAGER_UNDER_COMPILE = ("next_call", "noise", "global_counts")

    def __init__(self) -> None:
        self.seed = 0
        self.data_rank, self.data_ranks = 0, 1
        self.last_noise: TokenNoise | None = None  # the key of the latest call (for references)
        self.start(0)

    def start(self, step: int) -> None:
        """Begin optimizer step ``step`` (or an evaluation after ``step`` steps): call numbering
        and the global-scope running counts start again."""
        self.step = step
        self.calls = {TRAIN: 0, EVAL: 0}
        self.recomputes = 0
        self.running_counts: list[Tensor] = []  # after each training call, global scope

    def next_call(self, training: bool, recompute: bool) -> int:
        """The index of this call among this step's calls of its phase."""
        if recompute:
            if self.recomputes >= self.calls[TRAIN]:
                raise RuntimeError(
                    "MoELayer: a recomputation with no original forward in this step "
                    "(call RoutingStep.start only before a step's first forward)"
                )
            self.recomputes += 1
            return self.recomputes - 1
        phase = TRAIN if training else EVAL
        self.calls[phase] += 1
        return self.calls[phase] - 1

    def noise(self, call: int, training: bool, layer: int, x: Tensor) -> TokenNoise:
        """The noise key of call ``call`` on input ``x`` ([B, S, D], or [T, D] taken as one
        sequence)."""
        batch, seq_len = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        phase, ranks, rank = (TRAIN, self.data_ranks, self.data_rank) if training else (EVAL, 1, 0)
        offset = (call * ranks + rank) * batch
        key = NoiseKey(self.seed, phase, self.step, layer)
        self.last_noise = TokenNoise(key, global_positions(offset, batch, seq_len, x.device))
        return self.last_noise

    def global_counts(
        self,
        local_counts_E: Tensor,
        call: int,
        training: bool,
        recompute: bool,
        reduce: CountReduce | None,
    ) -> Tensor:
        """Expert counts for the global aux-loss scope: in training, the running sum over this
        step's micro-batches so far of the counts summed over data-parallel ranks (``reduce``);
        in evaluation, this call's counts (summed the same way)."""
        if recompute:
            return self.running_counts[call]
        counts_E = reduce(local_counts_E) if reduce is not None else local_counts_E
        if not training:
            return counts_E
        if self.running_counts:
            counts_E = self.running_counts[-1] + counts_E
        with torch.no_grad():
            self.running_counts.append(counts_E.detach())
        return counts_E
