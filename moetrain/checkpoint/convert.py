"""``moetrain-convert``: native <-> Hugging Face <-> Megatron checkpoints, without a process group.

    moetrain-convert --from SRC --to DST --format native|hf|megatron [--arch ARCH] [--verify]
                     [--megatron-arg NAME=VALUE ...]

SRC is a native checkpoint saved at any layout (a step directory, or a run directory: its newest
complete checkpoint), a Hugging Face hub directory, or a Megatron-LM / Megatron-Core
``torch_dist`` checkpoint (a save directory with ``latest_checkpointed_iteration.txt``, or one
``iter_*`` directory with ``metadata.json``; see ``moetrain.checkpoint.megatron``), whatever
TP/EP/PP it was saved at; ``--megatron-arg`` gives a Megatron-LM argument its ``args`` lack (or
overrides one). ``--format hf`` writes the hub layout of ``--arch`` (default: the first MoE
architecture that expresses the model); ``--format native`` writes a weights-only native
checkpoint for ``checkpoint.init_from`` and ``moetrain.load_model``; ``--format megatron``
writes Megatron-Core's ``torch_dist`` format (``release/``, loadable at any TP/EP/PP).
``--verify`` reloads DST and compares its logits with the source's on a fixed input (and, for
``hf``, those of ``transformers``' own model); on a mismatch DST is removed and the exit status
is 1. Errors a user can cause print one line and exit with status 2.

Memory: one model at a time. The source is read tensor by tensor into the model (a hub
directory) or chunk by chunk (a native checkpoint), written out the same way, and freed before
``--verify`` loads what was written.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from moetrain.checkpoint.errors import CheckpointError, cli_status
from moetrain.checkpoint.hf import ARCHS, ExportError, arch_of, save_hf
from moetrain.checkpoint.hf.tokenizer_files import export_tokenizer_files
from moetrain.checkpoint.megatron import is_megatron_dir
from moetrain.checkpoint.megatron_io import load_megatron, save_megatron
from moetrain.checkpoint.native import save_model
from moetrain.checkpoint.source import load_model
from moetrain.models import Transformer

VERIFY_ATOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moetrain-convert", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--from", dest="src", required=True, help="native, HF or Megatron directory"
    )
    parser.add_argument("--to", dest="dst", required=True, help="a new directory")
    parser.add_argument("--format", required=True, choices=("native", "hf", "megatron"))
    parser.add_argument(
        "--megatron-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Megatron-LM argument the source's args lack (Megatron sources; repeatable)",
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), help="HF architecture (--format hf)")
    parser.add_argument(
        "--max-shard-size", type=float, default=5.0, help="HF shard size in GiB (default 5)"
    )
    parser.add_argument("--verify", action="store_true", help="compare logits before finishing")
    return parser.parse_args(argv)


def verification_input(vocab_size: int, max_seq_len: int) -> torch.Tensor:
    """The fixed input ``--verify`` runs: 2 sequences of up to 32 tokens (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, min(32, max_seq_len)), generator=gen)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def source_logits(model: Transformer) -> torch.Tensor:
    """The source model's logits on :func:`verification_input` (what ``--verify`` compares)."""
    cfg = model.cfg
    with torch.no_grad():
        return model(verification_input(cfg.vocab_size, cfg.max_seq_len))


def verify(want: torch.Tensor, dst: Path, fmt: str) -> list[str]:
    """Problems found comparing the source's logits ``want`` (:func:`source_logits`) with those
    of what was written at ``dst`` (empty: it matches). One model in memory at a time: the
    reload, then (``hf``) transformers' model. Prints each comparison."""
    checks: dict[str, float] = {}
    with torch.no_grad():
        reloaded = load_model(dst, "--to")
        tokens = verification_input(reloaded.cfg.vocab_size, reloaded.cfg.max_seq_len)
        checks["moetrain reload"] = _max_diff(reloaded(tokens), want)
        del reloaded
        if fmt == "hf":
            import transformers

            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                dst, attn_implementation="eager", dtype=torch.float32
            ).eval()
            checks["transformers"] = _max_diff(theirs(input_ids=tokens).logits, want)
    problems = []
    for name, diff in checks.items():
        print(f"verify: {name}: max |logit difference| = {diff:.3g} (tolerance {VERIFY_ATOL})")
        if not diff <= VERIFY_ATOL:
            problems.append(f"{name} logits differ by {diff:.3g}")
    return problems


def megatron_overrides(items: list[str]) -> dict[str, Any]:
    """``--megatron-arg NAME=VALUE`` items as a dict; VALUE is a Python literal (``64``,
    ``True``, ``[0, 1]``, ``None``) or else a string (``RMSNorm``)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise CheckpointError(
                f"--megatron-arg {item!r}: give NAME=VALUE with Megatron-LM's argument name "
                "(e.g. --megatron-arg padded_vocab_size=32000)"
            )
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out


def _read_source(src: Path, args: argparse.Namespace) -> Transformer:
    overrides = megatron_overrides(args.megatron_arg)
    if not overrides:
        return load_model(src, "--from")
    if not is_megatron_dir(src):
        raise CheckpointError("--megatron-arg applies to Megatron sources only")
    return load_megatron(src, "--from", overrides)


def _tokenizer_files(src: Path, max_seq_len: int) -> dict[str, str]:
    """The tokenizer files the export carries (none with the byte tokenizer or from a Megatron
    checkpoint, which holds no tokenizer); a warning and none when the run's tokenizer file is
    gone."""
    if is_megatron_dir(src):
        return {}
    try:
        return export_tokenizer_files(src, max_seq_len)
    except FileNotFoundError as err:
        print(f"moetrain-convert: warning: no tokenizer in the export: {err}", file=sys.stderr)
        return {}


def _write(src: Path, dst: Path, args: argparse.Namespace) -> torch.Tensor | None:
    """Convert ``src`` into ``dst``; the source's logits when ``--verify`` asks for them. The
    source model is read in tensor by tensor and written out tensor by tensor (``hf``) or chunk
    by chunk (``native``), and freed on return: a conversion holds one model."""
    model = _read_source(src, args)
    want = source_logits(model) if args.verify else None
    if args.format == "hf":
        arch = args.arch or arch_of(model.cfg)
        extra = _tokenizer_files(src, model.cfg.max_seq_len)
        save_hf(model, dst, arch, int(args.max_shard_size * 2**30), extra_files=extra)
        with_tok = f", tokenizer {', '.join(sorted(extra))}" if extra else ""
        print(f"wrote {dst} ({arch}, Hugging Face hub layout{with_tok})")
    elif args.format == "megatron":
        save_megatron(model, dst)
        print(f"wrote {dst} (Megatron-Core torch_dist, release/)")
    else:
        save_model(model, dst)
        print(f"wrote {dst} (native, weights only)")
    return want


def convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CheckpointError(f"--from: {src} is not a directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"--to: {dst} exists and is not empty; give a new directory")
    if args.arch and args.format != "hf":
        raise CheckpointError("--arch applies to --format hf only")
    want = _write(src, dst, args)
    if want is not None:
        problems = verify(want, dst, args.format)
        if problems:
            shutil.rmtree(dst)
            print(
                f"moetrain-convert: error: verification failed ({'; '.join(problems)}); "
                f"removed {dst}",
                file=sys.stderr,
            )
            return 1
        print("verify: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli_status("moetrain-convert", lambda: convert(args), ExportError)


if __name__ == "__main__":
    sys.exit(main())
