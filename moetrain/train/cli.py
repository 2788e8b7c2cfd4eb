"""``moetrain-train`` / ``python -m moetrain.train``: the Hydra app that trains a model.

Config mistakes (unknown key, ``+``-appended or not; misspelled preset; wrong type; inconsistent
settings; missing data or checkpoint) stop the run before training with one line naming the
setting and the fix (exit status 2), checked before the trainer's heavy imports and before the
run directory is created (nothing is left behind). A setting away from its default that the rest
of the config ignores prints one ``moetrain-train: warning:`` line. ``--validate-only``: check
the command line (as ``launch/torchrun.sh`` does once before starting workers) and exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetrain.train import startup

if TYPE_CHECKING:
    from moetrain.config.schema import Config
    from moetrain.train.trainer import Trainer

CONFIG_DIR = str(startup.CONFIG_DIR)
VALIDATE_ONLY = "--validate-only"


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None elsewhere."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def default_run_dir() -> Path:
    """``runs/<timestamp>-<pid>``: this process's start, or under torchrun on one node the
    torchrun agent's (every rank's parent: shared by a launch's ranks and restarts); a
    multi-node launch uses its rendezvous id (``runs/<RUN_ID>``, which launch/torchrun.sh
    makes ``moetrain-<timestamp>``). A relaunch gets a new directory: pass ``run.dir=`` to
    resume one."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    pid, started = os.getpid(), time.time()
    if run_id is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        agent_start = _start_time(os.getppid())
        if world > int(os.environ.get("LOCAL_WORLD_SIZE", world)) or agent_start is None:
            return Path("runs") / run_id
        pid, started = os.getppid(), agent_start
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{pid}"


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
    overwritten. Creates nothing (``setup`` does, once everything is validated)."""
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
    return path


def resolve_resume(cfg: Config) -> None:
    """``checkpoint.resume=<dir>``: a step directory, or a run directory (or its
    ``checkpoints/``) standing for its newest complete checkpoint, as ``load_model`` and
    ``moetrain-convert`` accept; set to that step directory. Raises ``CheckpointError``
    (``checkpoint.resume: ...``) when it holds none. Files are hashed later, by the trainer."""
    if cfg.checkpoint.resume in ("auto", "never"):
        return
    from moetrain.checkpoint.locate import locate

    cfg.checkpoint.resume = str(locate(cfg.checkpoint.resume, "checkpoint.resume", deep=False))


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``moetrain-train`` would run with these command-line overrides."""
    from hydra import compose, initialize_config_dir

    import moetrain.config  # noqa: F401  (registers the structured config schema)
    from moetrain.config.validate import reject_unknown_keys

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


def checked(dict_cfg: DictConfig, run_dir_check: bool = True) -> tuple[Config, Path]:
    """Config -> (validated Config, its run dir, not created yet), before any heavy import.
    Raises ValueError/FileNotFoundError (``CheckpointError`` is one) for user errors.
    ``run_dir_check=False``: skip the run dir (a sweep's jobs each get their own)."""
    import moetrain.config  # noqa: F401  (registers the structured config schema)
    from moetrain.config.validate import reject_unknown_keys, validate

    reject_unknown_keys(dict_cfg)  # +key/++key: OmegaConf.to_object would drop it silently
    cfg: Config = OmegaConf.to_object(dict_cfg)  # type: ignore[assignment]
    validate(cfg)
    resolve_resume(cfg)
    if not run_dir_check:
        return cfg, Path(cfg.run.dir or ".")
    return cfg, resolve_run_dir(cfg)


def setup(dict_cfg: DictConfig) -> tuple[Config, Path, Trainer]:
    """Config -> (validated Config, run dir, Trainer). Raises ValueError/FileNotFoundError for
    user errors, leaving no run directory behind; warns (``warn``) of settings that have no
    effect."""
    from moetrain.config.unused import inapplicable_keys, ineffective_keys, mark_inapplicable

    cfg, run_dir = checked(dict_cfg)
    warn(ineffective_keys(cfg))
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run.dir = str(run_dir)
    try:
        from moetrain.train.trainer import Trainer

        trainer = Trainer(cfg, run_dir)
    except BaseException:
        if created:  # a start-up error leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if trainer.ctx.is_logging_rank:  # keys the rest of the config makes moot are marked
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        (run_dir / "config.yaml").write_text(mark_inapplicable(text, inapplicable_keys(cfg)))
    return cfg, run_dir, trainer


def describe(cfg: Config, run_dir: Path, trainer: Trainer) -> str:
    from moetrain.ops import active_backend, self_check

    d = trainer.ctx.dims
    device = trainer.ctx.device
    if device.type in ("cpu", "cuda"):
        # compare the compiled kernels with the references now, so the line below reports the
        # outcome (a compiled graph could otherwise call them without the first-use check)
        self_check(device)
    backend = active_backend(device.type.upper())
    return (
        f"moetrain: run dir {run_dir}\n"
        f"  model {trainer.num_params / 1e6:.2f}M params ({trainer.num_active_params / 1e6:.2f}M "
        f"active), {trainer.num_moe_layers} MoE layers; ops backend: {backend}\n"
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
    elif where == "mix":
        parts = [f"{s['name']} {s['weight']:.2f} ({s['format']})" for s in meta["sources"]]
        where = f"mixture of {', '.join(parts)}"
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
    from moetrain.checkpoint.errors import CheckpointError
    from moetrain.train.metrics import bits_per_token
    from moetrain.train.nonfinite import NonFiniteError

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
    except CheckpointError as err:  # e.g. the checkpoint to resume from is damaged
        if logging_rank:
            print(f"moetrain-train: error: {err}", file=sys.stderr, flush=True)
        trainer.close()
        sys.exit(2)
    trainer.close()
    if logging_rank:
        done, val = "moetrain: done", result.val_history  # the run's, across resumes
        if val:
            first, last = val[0][1], val[-1][1]
            done += (
                f"; val loss {first:.4f} -> {last:.4f} "
                f"({bits_per_token(first):.3f} -> {bits_per_token(last):.3f} bits/token)"
            )
        saved = result.checkpoint or "none saved (checkpoint.final=false)"
        print(f"{done}; checkpoint {saved}; metrics in {run_dir}", flush=True)


def precheck(args: argparse.Namespace, validate_only: bool) -> None:
    """Check the command line before Hydra runs the job (and before the trainer's imports):
    the composed config (a multirun's first job), and for a run the whole of it as ``setup``
    would. A user error prints one line and exits 2; ``validate_only`` exits 0 when all is
    well."""
    from hydra.errors import HydraException

    try:
        overrides = args.overrides
        if args.multirun:
            overrides = startup.first_job_overrides(overrides)
        dict_cfg = startup.compose_checked(overrides)
        if args.cfg is None or validate_only:
            checked(dict_cfg, run_dir_check=not args.multirun)
    except HydraException as err:
        startup.fail(startup.hydra_error_line(err))
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        startup.fail(str(err))
    if validate_only:
        print("moetrain-train: config ok", flush=True)
        sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    """``moetrain-train [--validate-only] [hydra flags] [overrides]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    validate_only = VALIDATE_ONLY in argv
    argv = [arg for arg in argv if arg != VALIDATE_ONLY]
    args = startup.hydra_args(argv)
    if args.help or args.hydra_help:
        startup.register_help_schema()
    elif not (args.shell_completion or args.info):
        precheck(args, validate_only)
    sys.argv = [sys.argv[0], *argv]
    _main()


if __name__ == "__main__":
    main()
