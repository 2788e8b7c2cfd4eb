"""Train a few steps at a parallel layout and report what the correctness contract compares:
per-step losses, grad norms, aux/z-loss values and the final weights.

``train_steps(overrides, steps)`` runs in the calling process (single-process reference, or one
rank of a ``run_distributed`` launch: the default process group is already up and its world
size is the layout's).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf

from moetrain.config.schema import Config
from moetrain.config.validate import parallel_dims, validate
from moetrain.data.token_file import TokenDirWriter
from moetrain.data.tokenizer import ByteTokenizer
from moetrain.parallel.context import init_parallel
from moetrain.parallel.parallelize import full_state

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer


def write_token_dir(path: str, num_tokens: int = 60_000, seed: int = 0) -> str:
    """A prepared-token directory of random byte tokens (documents of 500 tokens)."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, 256, size=(num_tokens // 500, 500))
    docs[:, -1] = tok.require_eos()
    with TokenDirWriter(path, tok) as writer:
        writer.write(docs.flatten(), len(docs))
        writer.commit()
    return path


def small_run_command(data_dir: str, run_dir: str | os.PathLike, *overrides: str) -> list[str]:
    """``python -m moetrain.train`` on a token directory with a tiny global batch (4 sequences
    of 32 tokens), logging every step, wandb off: seconds per run, for restart and kill tests.
    Later overrides win."""
    return [
        sys.executable,
        "-m",
        "moetrain.train",
        "data.source=tokens",
        f"data.path={data_dir}",
        "train.global_batch_size=4",
        "train.seq_len=32",
        "train.eval_batches=1",
        "train.log_interval=1",
        "train.peak_flops_per_device=1e12",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        f"run.dir={run_dir}",
        *overrides,
    ]


def layout_config(data_dir: str, overrides: list[str]) -> Config:
    """``tiny``, fp32, SGD, no clipping surprises: the contract's test configuration."""
    from moetrain.train.cli import compose_config

    base = [
        "data.source=tokens",
        f"data.path={data_dir}",
        "train.steps=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_len=32",
        "train.eval_batches=1",
        "train.peak_flops_per_device=1e12",
        "optim=sgd",
        "optim.lr=0.5",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "model.moe.z_loss_coeff=0.001",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
    ]
    cfg = OmegaConf.to_object(compose_config(base + overrides))
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def train_steps(
    data_dir: str,
    overrides: list[str],
    steps: int = 3,
    prepare: Callable[[Trainer], None] | None = None,
    run_dir: str | None = None,
    checkpoint_at: int | None = None,
) -> dict[str, Any]:
    """``steps`` optimizer steps of the contract's configuration (``prepare`` may adjust the
    trainer first, e.g. to install a reference hook). With ``run_dir``, the run resumes as
    ``checkpoint.resume`` says and saves a checkpoint after step ``checkpoint_at``."""
    from moetrain.train.trainer import Trainer

    cfg = layout_config(data_dir, overrides)
    ctx = init_parallel(parallel_dims(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(run_dir or tmp), ctx)
        if run_dir is not None:
            trainer.resume()
        if prepare is not None:
            prepare(trainer)
        out: dict[str, Any] = {"loss": [], "grad_norm": [], "aux_loss": [], "z_loss": []}
        for _ in range(steps):
            stats, grad_norm, _ = trainer.train_step()
            if trainer.step == checkpoint_at:
                trainer.save_checkpoint()
            row = stats
            out["loss"].append(row["loss"])
            out["grad_norm"].append(grad_norm)
            out["aux_loss"].append(row["aux_loss"])
            out["z_loss"].append(row["z_loss"])
            out["expert_load"] = row["expert_load"]
        out["weights"] = {k: v.cpu() for k, v in full_state(trainer.pm).items()}
        out["buffers"] = persistent_buffers(trainer.pm.state_module())
        out["val_loss"] = trainer.evaluate()
    return out


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's checkpointed buffers (e.g. routers' expert biases, adaptive aux
    coefficients) by name, as CPU copies."""
    params = {name for name, _ in module.named_parameters()}
    return {
        name: value.detach().cpu().clone()
        for name, value in module.state_dict().items()
        if name not in params and isinstance(value, torch.Tensor)
    }


def train_steps_rank(
    rank: int,
    world: int,
    data_dir: str,
    overrides: list[str],
    steps: int,
    run_dir: str | None = None,
    checkpoint_at: int | None = None,
):
    """``run_distributed`` entry point."""
    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return train_steps(data_dir, overrides, steps, run_dir=run_dir, checkpoint_at=checkpoint_at)


def train_steps_each_rank(
    rank: int, world: int, data_dir: str, runs: list[list[str]], steps: int
) -> list[dict]:
    """``run_distributed`` entry point for several configurations in one launch (the
    processes start once): ``train_steps`` for each override list of ``runs``, in order."""
    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return [train_steps(data_dir, overrides, steps) for overrides in runs]


def assert_each_matches(per_rank: list[list[dict]], refs: dict[str, dict], where: str) -> None:
    """``assert_matches`` for every run of a ``train_steps_each_rank`` launch (``per_rank``:
    each rank's results, in the order of ``refs``, the runs' single-process references by
    name); a failure names the run and ``where``."""
    for i, (name, ref) in enumerate(refs.items()):
        try:
            assert_matches([results[i] for results in per_rank], ref)
        except AssertionError as err:
            raise AssertionError(f"{name} at {where}: {err}") from None


def merged_weights(results: list[dict]) -> dict[str, torch.Tensor]:
    """Union of the ranks' full parameters (pipeline stages hold different ones); ranks that
    hold the same parameter must agree exactly."""
    out: dict[str, torch.Tensor] = {}
    for r in results:
        for name, w in r["weights"].items():
            if name in out:
                torch.testing.assert_close(w, out[name], rtol=0, atol=0, msg=name)
            out[name] = w
    return out


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda message: f"{prefix}: {message}"


def assert_matches(results: list[dict], ref: dict, weights: bool = True) -> None:
    """The correctness contract: every rank's per-step loss, grad norm, aux and z-loss and the
    validation loss within rtol 1e-5 of the single-process ``ref``; the merged final weights
    within atol 1e-5."""
    for rank, res in enumerate(results):
        for key in ("loss", "grad_norm", "aux_loss", "z_loss"):
            torch.testing.assert_close(
                torch.tensor(res[key], dtype=torch.float64),
                torch.tensor(ref[key], dtype=torch.float64),
                rtol=1e-5,
                atol=0,
                msg=_prefixed(f"rank {rank} {key}"),
            )
        torch.testing.assert_close(res["val_loss"], ref["val_loss"], rtol=1e-5, atol=0)
    if weights:
        got = merged_weights(results)
        assert set(got) == set(ref["weights"])
        for name, w in ref["weights"].items():
            torch.testing.assert_close(got[name], w, rtol=0, atol=1e-5, msg=name)
