"""Upcycling: a dense model's weights become an MoE model's, with a checked preservation report.

Legend: D model dim, F dense FFN hidden dim, E routed experts, K top-k, m granularity, c = E / m
copies of the (routed part of the) dense FFN, F_s shared-expert hidden dim.

A dense FFN computes ``y = W2 (silu(W1 x) * W3 x)``; its hidden units are independent, so for
any split of the hidden units into parts P, ``y = sum_P W2[:, P] (silu(W1[P] x) * W3[P] x)``.
Modes (every layer becomes an MoE layer; attention, norms and embeddings are copied):

- ``copy`` (Sparse Upcycling): every expert is the dense FFN. The top-k weights are renormalized
  to sum to 1, so the output is the dense output whatever the router picks. Exact.
- ``granular`` (fine-grained upcycling): c copies, each split into m slices of F/m hidden units;
  slice j of copy i is expert ``i * m + j``, its down projection scaled by m. Router rows are
  tied within a copy, so the m slices of a copy get equal logits and are picked together
  (K is a multiple of m): output ``sum_i w_i * m * sum_j y_ij = y * sum_i m w_i = y``. Exact.
- ``shared`` (DeepSeekMoE): the first ``round(shared_fraction * F)`` hidden units become an
  always-on shared expert; the routed experts are copies (or, with m > 1, slices) of the rest.
  Exact. With ``shared_gate`` (Qwen2-MoE's sigmoid gate on the shared expert) the gate starts
  at 0, so it multiplies by sigmoid(0) = 1/2, compensated by doubling the shared down
  projection (both exact in floating point).
- ``partition`` (LLaMA-MoE): the F hidden units are split into E disjoint experts of F/E units,
  by a random permutation or by balanced k-means clustering of the units' gate/up weights; down
  projections are scaled by E, so with all experts active (uniform weights 1/E) the output is
  the dense output, and with top-k it is ``(E/K) * sum of the K picked parts``. Not exact: the
  report gives the gap at top-k and with all experts active.

The router starts at zero (every expert equally likely; ties go to the lower expert index) or
normal with a small std. Optional noise on the routed experts' weights is applied after the
preservation check and reported separately.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moetrain.models import ModelConfig, Transformer
from moetrain.models.mlp import FeedForward
from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer

MODES = ("copy", "granular", "partition", "shared")
EXACT_MODES = ("copy", "granular", "shared")
ROUTER_INITS = ("zero", "normal")
PARTITION_METHODS = ("random", "cluster")


class UpcycleError(ValueError):
    """A bad upcycling request: one line naming the option and the fix."""


@dataclass
class UpcycleSpec:
    """What to build. ``num_experts`` and ``top_k`` count the final (fine-grained) experts."""

    mode: str
    num_experts: int
    top_k: int
    granularity: int = 1
    shared_fraction: float = 0.25
    shared_gate: bool = False
    router_init: str = "zero"
    router_std: float = 0.02
    partition_method: str = "random"
    noise: float = 0.0
    seed: int = 0

    def validate(self, dense_hidden: int) -> None:
        def fail(option: str, why: str) -> None:
            raise UpcycleError(f"--{option}: {why}")

        if self.mode not in MODES:
            fail("mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.router_init not in ROUTER_INITS:
            fail("router-init", f"must be zero or normal; got {self.router_init!r}")
        if self.partition_method not in PARTITION_METHODS:
            fail("partition-method", f"must be random or cluster; got {self.partition_method!r}")
        E, K, m = self.num_experts, self.top_k, self.granularity
        if E < 1 or K < 1 or m < 1:
            fail("num-experts", f"experts, top-k and granularity must be >= 1; got {E}, {K}, {m}")
        if K > E:
            fail("top-k", f"{K} exceeds --num-experts={E}")
        if self.noise < 0:
            fail("noise", f"must be >= 0, got {self.noise}")
        if self.mode == "partition":
            if m != 1:
                fail("granularity", "does not apply to partition (its experts are already F/E)")
            if dense_hidden % E:
                fail(
                    "num-experts",
                    f"partition splits the FFN's {dense_hidden} hidden units evenly: {E} must "
                    "divide it",
                )
            return
        if E % m or K % m:
            fail(
                "granularity",
                f"--num-experts ({E}) and --top-k ({K}) must be multiples of the granularity {m}",
            )
        routed = dense_hidden - self.shared_units(dense_hidden)
        if self.mode == "shared" and not 0 < self.shared_units(dense_hidden) < dense_hidden:
            fail(
                "shared-fraction",
                f"{self.shared_fraction} of {dense_hidden} hidden units leaves no shared or no "
                "routed part; pick a fraction in (0, 1)",
            )
        if routed % m:
            fail("granularity", f"{m} does not divide the routed FFN's {routed} hidden units")
        if self.mode == "copy" and m != 1:
            fail("granularity", "copy makes whole copies; use --mode granular for m > 1")

    def shared_units(self, dense_hidden: int) -> int:
        if self.mode != "shared":
            return 0
        return round(self.shared_fraction * dense_hidden)


def moe_config(dense: ModelConfig, spec: UpcycleSpec) -> ModelConfig:
    """The upcycled model's config: the dense one with an MoE layer in every layer."""
    if dense.num_moe_layers:
        raise UpcycleError(
            f"--from: the model already has {dense.num_moe_layers} MoE layers; upcycling "
            "starts from a dense model"
        )
    F = dense.dense_hidden_dim
    spec.validate(F)
    shared = spec.shared_units(F)
    if spec.mode == "partition":
        hidden = F // spec.num_experts
    else:
        hidden = (F - shared) // spec.granularity
    moe = MoEConfig(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        dim=dense.dim,
        hidden_dim=hidden,
        score_func="softmax",
        norm_topk_prob=True,
        num_shared_experts=1 if shared else 0,
        shared_hidden_dim=shared or None,
        shared_gate=bool(shared) and spec.shared_gate,
    )
    return dataclasses.replace(dense, first_k_dense=0, moe_layer_freq=1, moe=moe)


def _cluster(w_FX: Tensor, parts: int, gen: torch.Generator, iters: int = 20) -> Tensor:
    """Balanced k-means of the F rows of ``w_FX`` into ``parts`` equal clusters (LLaMA-MoE's
    neuron clustering): each step assigns rows greedily, nearest pairs first, to clusters that
    still have room. Returns the permutation listing cluster 0's rows first, then 1's, ..."""
    F = w_FX.shape[0]
    size = F // parts
    x = torch.nn.functional.normalize(w_FX.float(), dim=1)
    centers = x[torch.randperm(F, generator=gen)[:parts]].clone()
    assign = torch.zeros(F, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centers)  # [F, parts]
        order = torch.argsort(dist.flatten(), stable=True)
        room = [size] * parts
        assign = torch.full((F,), -1, dtype=torch.long)
        for flat in order.tolist():
            row, part = divmod(flat, parts)
            if assign[row] < 0 and room[part] > 0:
                assign[row] = part
                room[part] -= 1
        centers = torch.stack([x[assign == p].mean(0) for p in range(parts)])
    return torch.argsort(assign, stable=True)


def _routed_slices(spec: UpcycleSpec, F: int, ffn: FeedForward, gen: torch.Generator) -> Tensor:
    """Hidden-unit indices of each routed expert, ``[E, F_e]``."""
    E, m = spec.num_experts, spec.granularity
    if spec.mode == "partition":
        if spec.partition_method == "random":
            perm = torch.randperm(F, generator=gen)
        else:
            perm = _cluster(torch.cat([ffn.w1.weight, ffn.w3.weight], dim=1), E, gen)
        return perm.view(E, F // E)
    shared = spec.shared_units(F)
    slices = torch.arange(shared, F).view(m, (F - shared) // m)  # m slices of the routed part
    return slices.repeat(E // m, 1)  # expert i*m + j = slice j (of copy i)


@torch.no_grad()
def upcycle(dense: Transformer, spec: UpcycleSpec) -> Transformer:
    """The upcycled model (eval mode, dense model's dtype), before any noise."""
    cfg = moe_config(dense.cfg, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.device("meta"):
        moe = Transformer(cfg)
    moe.to_empty(device=dense.tok_embeddings.weight.device)
    moe.to(dense.tok_embeddings.weight.dtype)
    for buffer in moe.buffers():  # to_empty leaves them uninitialized
        buffer.zero_()
    own = moe.state_dict()
    for name, tensor in dense.state_dict().items():
        if ".feed_forward." not in name:
            own[name].copy_(tensor)
    if cfg.tie_embeddings:
        moe.output.weight = moe.tok_embeddings.weight
    F, E, m = dense.cfg.dense_hidden_dim, spec.num_experts, spec.granularity
    scale = float(E if spec.mode == "partition" else m)
    for dense_block, block in zip(dense.layers, moe.layers):
        ffn, layer = dense_block.feed_forward, block.feed_forward
        assert isinstance(ffn, FeedForward) and isinstance(layer, MoELayer)
        idx_EFe = _routed_slices(spec, F, ffn, gen)
        w1, w3, w2 = ffn.w1.weight, ffn.w3.weight, ffn.w2.weight
        layer.experts.w1_EFD.copy_(w1[idx_EFe])
        assert layer.experts.w3_EFD is not None
        layer.experts.w3_EFD.copy_(w3[idx_EFe])
        layer.experts.w2_EDF.copy_(w2[:, idx_EFe].permute(1, 0, 2) * scale)
        router = layer.router.get_parameter("weight_ED")  # the learned router's [E, D] weight
        if spec.router_init == "zero":
            router.zero_()
        else:  # one row per copy, repeated for its m slices (tied: the slices get equal logits)
            rows = torch.randn(E // m, cfg.dim, generator=gen) * spec.router_std
            router.copy_(rows.repeat_interleave(m, dim=0))
        layer.router.get_buffer("expert_bias_E").zero_()
        if layer.shared_experts is not None:
            shared = spec.shared_units(F)
            se = layer.shared_experts
            se.w1_HD.copy_(w1[:shared])
            assert se.w3_HD is not None
            se.w3_HD.copy_(w3[:shared])
            # sigmoid(0) = 1/2 on the gated shared expert: doubled down projection (exact)
            se.w2_DH.copy_(w2[:, :shared] * (2.0 if se.gate_1D is not None else 1.0))
            if se.gate_1D is not None:
                se.gate_1D.zero_()
    return moe.eval()


@torch.no_grad()
def add_noise(model: Transformer, std: float, seed: int) -> None:
    """Gaussian noise of ``std`` on every routed expert weight (breaks the copies' symmetry)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.moe_layers():
        for w in (layer.experts.w1_EFD, layer.experts.w3_EFD, layer.experts.w2_EDF):
            if w is not None:
                w.add_(torch.randn(w.shape, generator=gen).to(w.dtype) * std)


def check_input(cfg: ModelConfig) -> Tensor:
    """The fixed input the report runs: 2 sequences of up to 64 tokens (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=gen)


@torch.no_grad()
def _layer_outputs(model: Transformer, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    outs: list[Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: outs.append(out.detach().float()))
        for layer in model.layers
    ]
    try:
        logits = model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return outs, logits


def _diff(got: Tensor, want: Tensor) -> dict[str, float]:
    err = (got - want).abs().max().item()
    return {"max_abs": err, "rel": err / max(want.abs().max().item(), 1e-30)}


def compare(dense: Transformer, moe: Transformer, tokens: Tensor) -> dict[str, Any]:
    """Per-layer (each decoder layer's output) and final-logit differences, MoE vs dense."""
    dense_layers, dense_logits = _layer_outputs(dense, tokens)
    moe_layers, moe_logits = _layer_outputs(moe, tokens)
    layers = [_diff(g, w) for g, w in zip(moe_layers, dense_layers)]
    logits = _diff(moe_logits, dense_logits)
    worst = max([logits["max_abs"], *(d["max_abs"] for d in layers)])
    return {"layers": layers, "logits": logits, "max_abs": worst}


def all_experts_active(moe: Transformer) -> Transformer:
    """A copy of ``moe`` whose layers route every token to every expert (top_k = E)."""
    wide = copy.deepcopy(moe)
    for layer in wide.moe_layers():
        layer.cfg = dataclasses.replace(layer.cfg, top_k=layer.cfg.num_experts)
        layer.router.cfg = layer.cfg
    return wide


def report(
    dense: Transformer, moe: Transformer, spec: UpcycleSpec, noisy: Transformer | None = None
) -> dict[str, Any]:
    """The preservation report (JSON-ready)."""
    tokens = check_input(dense.cfg)
    out: dict[str, Any] = {
        "mode": spec.mode,
        "exact_mode": spec.mode in EXACT_MODES,
        "spec": dataclasses.asdict(spec),
        "input": {"sequences": tokens.shape[0], "seq_len": tokens.shape[1], "seed": 0},
        "dense_params": dense.num_params(),
        "moe_params": moe.num_params(),
        "moe_active_params": moe.num_active_params(),
        "preservation": compare(dense, moe, tokens),
    }
    if spec.mode == "partition":
        out["all_experts_active"] = compare(dense, all_experts_active(moe), tokens)
    if noisy is not None:
        out["after_noise"] = compare(dense, noisy, tokens)
    return out


def format_report(rep: dict[str, Any]) -> str:
    lines = [
        f"upcycle ({rep['mode']}): {rep['dense_params'] / 1e6:.2f}M dense -> "
        f"{rep['moe_params'] / 1e6:.2f}M params ({rep['moe_active_params'] / 1e6:.2f}M active)"
    ]

    def block(title: str, res: dict[str, Any]) -> None:
        lines.append(f"{title}: max |difference| {res['max_abs']:.3g}")
        for i, d in enumerate(res["layers"]):
            lines.append(f"  layer {i}: max_abs {d['max_abs']:.3g}  rel {d['rel']:.3g}")
        lines.append(
            f"  logits:  max_abs {res['logits']['max_abs']:.3g}  rel {res['logits']['rel']:.3g}"
        )

    block("preservation (upcycled vs dense, before noise)", rep["preservation"])
    if "all_experts_active" in rep:
        block("with all experts active", rep["all_experts_active"])
    if "after_noise" in rep:
        block("after noise", rep["after_noise"])
    return "\n".join(lines)


def default_threshold(dtype: torch.dtype) -> float:
    """Largest difference an exact mode may show: fp32 rounding, with margin."""
    return 1e-4 if dtype == torch.float32 else 10 * math.sqrt(torch.finfo(dtype).eps)


# ----------------------------------------------------------------------------------- the tool


def _parse_args(argv: list[str] | None):
    import argparse

    p = argparse.ArgumentParser(
        prog="moetrain-upcycle",
        description="Upcycle a dense checkpoint (HF Llama/Mistral/Qwen2/Qwen3 or native) to MoE, "
        "with a function-preservation report.",
    )
    p.add_argument("--from", dest="src", required=True, help="dense HF or native checkpoint")
    p.add_argument("--to", dest="dst", required=True, help="a new directory")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--num-experts", type=int, required=True, help="final (fine-grained) experts")
    p.add_argument("--top-k", type=int, required=True, help="final (fine-grained) top-k")
    p.add_argument("--granularity", type=int, default=1, help="slices per copy (granular)")
    p.add_argument("--shared-fraction", type=float, default=0.25, help="shared: FFN share")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="zero")
    p.add_argument("--router-std", type=float, default=0.02, help="std of --router-init normal")
    p.add_argument("--partition-method", choices=PARTITION_METHODS, default="random")
    p.add_argument("--noise", type=float, default=0.0, help="std of noise on expert weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None, help="max difference (exact modes)")
    p.add_argument("--force", action="store_true", help="write even above --threshold")
    p.add_argument("--format", choices=("native", "hf"), default="native")
    return p.parse_args(argv)


def _load_dense(src: str) -> tuple[Transformer, str]:
    """(model, source architecture name) from an HF or native directory."""
    from pathlib import Path

    from moetrain.checkpoint.hf import ARCHS
    from moetrain.checkpoint.safetensors_io import is_hf_dir, read_config
    from moetrain.checkpoint.source import load_model

    if not Path(src).is_dir():
        raise UpcycleError(f"--from: {src} is not a directory")
    if is_hf_dir(src):
        kind = str(read_config(src).get("model_type"))
        if kind not in ARCHS or ARCHS[kind].moe:
            raise UpcycleError(
                f"--from: model_type {kind!r} is not a dense architecture moetrain upcycles; "
                "give a Llama, Mistral, Qwen2 or Qwen3 checkpoint (or a native dense one)"
            )
        return load_model(src, "--from"), kind
    return load_model(src, "--from"), "native"


def run(argv: list[str] | None = None) -> int:
    import sys

    from moetrain.checkpoint.hf import ExportError, arch_of

    args = _parse_args(argv)
    spec = UpcycleSpec(
        mode=args.mode, num_experts=args.num_experts, top_k=args.top_k,
        granularity=args.granularity, shared_fraction=args.shared_fraction,
        shared_gate=args.format == "hf" and args.mode == "shared", router_init=args.router_init,
        router_std=args.router_std, partition_method=args.partition_method, noise=args.noise,
        seed=args.seed,
    )  # fmt: skip
    dense, source = _load_dense(args.src)
    cfg = moe_config(dense.cfg, spec)
    arch = None
    if args.format == "hf":
        try:
            arch = arch_of(cfg)
        except ExportError as err:
            raise UpcycleError(
                f"--format hf: no Hugging Face architecture expresses --mode {spec.mode} from "
                f"{source} exactly ({err}); use --format native"
            ) from err
    moe = upcycle(dense, spec)
    noisy = None
    if spec.noise > 0:
        noisy = copy.deepcopy(moe)
        add_noise(noisy, spec.noise, spec.seed)
    rep = report(dense, moe, spec, noisy)
    threshold = args.threshold
    if threshold is None:
        threshold = default_threshold(dense.tok_embeddings.weight.dtype)
    rep.update(source=source, format=args.format, arch=arch, threshold=threshold)
    print(format_report(rep))
    worst = rep["preservation"]["max_abs"]
    if spec.mode in EXACT_MODES and not worst <= threshold:
        if not args.force:
            print(
                f"moetrain-upcycle: error: --threshold: {spec.mode} should preserve the dense "
                f"model but differs by {worst:.3g} > {threshold:.3g}; nothing written (--force "
                "writes anyway)",
                file=sys.stderr,
            )
            return 1
        rep["forced"] = True
    _write(noisy if noisy is not None else moe, args.dst, arch, rep)
    return 0


def _write(out: Transformer, dst: str, arch: str | None, rep: dict[str, Any]) -> None:
    """Write the upcycled model (hub layout for ``arch``, else native) with its report and a
    Hydra model config, and say how to train it."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from moetrain.checkpoint.hf import save_hf
    from moetrain.checkpoint.native import save_model

    model_yaml = OmegaConf.to_yaml(OmegaConf.structured(out.cfg))
    extra = {
        "upcycle_report.json": json.dumps(rep, indent=2) + "\n",
        "model/upcycled.yaml": "# the upcycled model (moetrain-upcycle)\n" + model_yaml,
    }
    if arch is not None:
        save_hf(out, dst, arch, extra_files=extra)
        print(f"wrote {dst} ({arch}, Hugging Face hub layout)")
    else:
        save_model(out, dst, extra_files=extra)
        print(f"wrote {dst} (native)")
    path = Path(dst).resolve()
    print(
        "train it: moetrain-train 'hydra.searchpath=[file://"
        f"{path}]' model=upcycled checkpoint.init_from={path}"
    )


def main(argv: list[str] | None = None) -> int:
    from moetrain.checkpoint.errors import cli_status

    return cli_status("moetrain-upcycle", lambda: run(argv), UpcycleError)


if __name__ == "__main__":
    raise SystemExit(main())
