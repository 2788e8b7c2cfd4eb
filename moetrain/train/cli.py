"""``moetrain-train`` / ``python -m moetrain.train``: the Hydra app that trains a model.

Config mistakes (unknown key, ``+``-appended or not; wrong type; inconsistent settings; missing
data) stop the run before training with one line naming the setting and the fix (exit status 2;
Hydra's own message and status 1 for an unknown key without ``+``). A setting away from its
default that the rest of the config ignores prints one ``moetrain-train: warning:`` line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import moetrain.config  # noqa: F401  (registers the structured config schema)
from moetrain.config.schema import Config
from moetrain.config.validate import ineffective_keys, reject_unknown_keys, validate
from moetrain.train.metrics import bits_per_token
from moetrain.train.nonfinite import NonFiniteError
from moetrain.train.trainer import Trainer

# moetrain/configs/: package data, so editable and wheel installs alike find it
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def default_run_dir() -> Path:
    """``runs/<torchrun run id>`` (shared by a launch's ranks and restarts), else
    ``runs/<timestamp>-<pid>``."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return Path("runs") / (run_id if run_id != "none" else stamp)


def sweep_dir(run_dir: str | None) -> str:
    """``hydra.sweep.dir`` of a multirun (``-m``): ``run.dir`` when set, else the default run
    dir, so the sweep's ``multirun.yaml`` and its jobs' dirs share one parent. Registered as
    the ``moetrain.sweep_dir`` resolver with caching, so every job of a sweep sees one value."""
    return run_dir if run_dir else str(default_run_dir())


OmegaConf.register_new_resolver("moetrain.sweep_dir", sweep_dir, use_cache=True, replace=True)


def multirun_job_dir() -> Path | None:
    """Under ``-m``, this job's own directory ``<hydra.sweep.dir>/<hydra.sweep.subdir>``
    (``<run.dir or default run dir>/<job number>``); None outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir) / str(hc.sweep.subdir)


def resolve_run_dir(cfg: Config) -> Path:
    """``run.dir``, else ``default_run_dir()``; in a Hydra multirun, each job's own
    ``<that dir>/<job number>``. A directory that already holds a run is refused unless it
    has checkpoints to resume from (``checkpoint.resume``): nothing of an earlier run is
    overwritten."""
    path = multirun_job_dir()
    if path is None:
        path = Path(cfg.run.dir) if cfg.run.dir else default_run_dir()
    resumable = cfg.checkpoint.resume != "never" and any(
        p.is_dir() and p.name.isdigit() for p in (path / "checkpoints").glob("*")
    )
    # a torchrun restart of this launch (killed before its first checkpoint) starts over
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if (path / "metrics.jsonl").exists() and not resumable and not restarted:
        raise ValueError(
            f"run.dir: {path} already holds a run (metrics.jsonl) with no checkpoint to resume "
            "from; choose a new run.dir or remove it"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``moetrain-train`` would run with these command-line overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        dict_cfg = compose(config_name="config", overrides=overrides)
    reject_unknown_keys(dict_cfg)  # as setup() does: a +key the schema lacks is an error
    return dict_cfg


def first_rank() -> bool:
    """Whether this process prints a launch's messages (one copy per launch, not per rank)."""
    return os.environ.get("RANK", "0") == "0"


def warn(messages: list[str]) -> None:
    """Print each message once per launch: ``moetrain-train: warning: <message>`` on stderr."""
    if first_rank():
        for message in messages:
            print(f"moetrain-train: warning: {message}", file=sys.stderr, flush=True)


def setup(dict_cfg: DictConfig) -> tuple[Config, Path, Trainer]:
    """Config -> (validated Config, run dir, Trainer). Raises ValueError/FileNotFoundError for
    user errors; warns (``warn``) of settings that have no effect."""
    reject_unknown_keys(dict_cfg)  # +key/++key: OmegaConf.to_object would drop it silently
    cfg: Config = OmegaConf.to_object(dict_cfg)  # type: ignore[assignment]
    validate(cfg)
    warn(ineffective_keys(cfg))
    run_dir = resolve_run_dir(cfg)
    cfg.run.dir = str(run_dir)
    trainer = Trainer(cfg, run_dir)
    if trainer.ctx.is_logging_rank:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    return cfg, run_dir, trainer


def describe(cfg: Config, run_dir: Path, trainer: Trainer) -> str:
    from moetrain.ops import active_backend

    d = trainer.ctx.dims
    return (
        f"moetrain: run dir {run_dir}\n"
        f"  model {trainer.num_params / 1e6:.2f}M params ({trainer.num_active_params / 1e6:.2f}M "
        f"active), {trainer.num_moe_layers} MoE layers; ops backend: {active_backend()}\n"
        f"  layout: {d.describe()}; {trainer.placement.describe(d)}; "
        f"backend {trainer.ctx.backend}\n"
        f"  data {data_summary(trainer.data_meta)}\n"
        f"  {cfg.train.steps} steps x {cfg.train.global_batch_size} seqs x {cfg.train.seq_len} "
        f"tokens; peak {trainer.peak_flops / 1e9:.1f} GFLOP/s ({trainer.peak_source})"
    )


def data_summary(meta: dict) -> str:
    where = meta.get("source", "?")
    if where == "stdlib":
        where = f"Python {meta.get('python_version')} standard library"
    tokens = meta.get("train_tokens", 0) / 1e6
    return (
        f"{where}: {tokens:.1f}M train tokens, {meta.get('val_tokens', 0) / 1e6:.2f}M val "
        f"tokens, tokenizer {meta.get('tokenizer')}"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(dict_cfg: DictConfig) -> None:
    try:
        cfg, run_dir, trainer = setup(dict_cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        if first_rank():
            print(f"moetrain-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    logging_rank = trainer.ctx.is_logging_rank
    if logging_rank:
        print(describe(cfg, run_dir, trainer), flush=True)
    try:
        result = trainer.run()
    except NonFiniteError as err:  # every rank stops at the same step
        if logging_rank:
            print(f"moetrain-train: error: {err}", file=sys.stderr, flush=True)
        trainer.close()
        sys.exit(3)
    trainer.close()
    if logging_rank and result.val_losses:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(
            f"moetrain: done; val loss {first:.4f} -> {last:.4f} "
            f"({bits_per_token(first):.3f} -> {bits_per_token(last):.3f} bits/token); "
            f"metrics in {run_dir}"
        )


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
