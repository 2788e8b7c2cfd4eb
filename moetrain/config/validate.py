"""Checks that span components of the training config. Each raises ``ConfigError`` (a
``ValueError``) naming the setting and the fix; component fields validate themselves.

Also: ``reject_unknown_keys`` (keys a ``+``/``++`` override added that the schema lacks) and
``ineffective_keys`` (settings away from their default that the rest of the config ignores).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from moetrain import apex
from moetrain.config.schema import Config
from moetrain.models.config import ModelConfig
from moetrain.moe.router_registry import router_class
from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.placement import (
    ExpertPlacement,
    placement_class,
    validate_placement_options,
)

if TYPE_CHECKING:  # omegaconf only where a composed config is checked: the library's memory plan
    from omegaconf import DictConfig  # validates a Config without Hydra or OmegaConf installed


class ConfigError(ValueError):
    pass


def _fail(setting: str, why: str) -> None:
    raise ConfigError(f"{setting}: {why}")


def world_size() -> int:
    """Processes in this launch (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parallel_dims(cfg: Config, world: int | None = None) -> ParallelDims:
    """The layout of ``cfg.parallel`` on ``world`` ranks (default: this launch's), raising
    ``LayoutError`` naming the setting when inconsistent."""
    p = cfg.parallel
    return ParallelDims(
        world_size=world_size() if world is None else world,
        pp=p.pp,
        dp_replicate=p.dp_replicate,
        dp_shard=p.dp_shard,
        tp=p.tp,
        ep=p.ep,
        etp=p.etp,
        expert_sharding=p.expert_sharding,
        cp=p.cp,
    )


def expert_placement(cfg: Config) -> ExpertPlacement:
    """The expert placement ``parallel.expert_sharding`` names, with its ``parallel.*`` options
    (validated by ``validate``)."""
    return placement_class(cfg.parallel.expert_sharding).from_config(cfg.parallel)


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` for the first inconsistency found."""
    cfg.model.validate()
    cfg.data.validate()
    if cfg.data.source == "stdlib" and cfg.data.path is not None:
        _fail(
            "data.path",
            f"is {cfg.data.path!r} but data.source is stdlib (the built-in corpus reads no "
            "directory); to train on it use data=tokens (or data.source=tokens), else drop "
            "data.path",
        )
    dims = _validate_parallel(cfg)
    _validate_train(cfg, dims)
    _validate_optim(cfg)
    _validate_apex(cfg, dims)
    _validate_checkpoint(cfg)
    if cfg.logging.wandb.mode not in ("online", "offline", "disabled"):
        _fail(
            "logging.wandb.mode",
            f"must be online, offline or disabled; got {cfg.logging.wandb.mode!r}",
        )
    # wandb is optional where it cannot be installed (an offline GPU image): fail before training
    if cfg.logging.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        _fail(
            "logging.wandb.mode",
            f"is {cfg.logging.wandb.mode} but wandb is not installed: set "
            "logging.wandb.mode=disabled, or pip install wandb",
        )
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        _fail("logging.tensorboard", "needs the tensorboard package: pip install tensorboard")


def _validate_train(cfg: Config, dims: ParallelDims) -> None:
    t = cfg.train
    if t.steps <= 0:
        _fail("train.steps", f"must be > 0, got {t.steps}")
    for name in (
        "global_batch_size",
        "micro_batch_size",
        "seq_len",
        "log_interval",
        "eval_batches",
    ):
        if getattr(t, name) <= 0:
            _fail(f"train.{name}", f"must be > 0, got {getattr(t, name)}")
    if t.eval_interval < 0:
        _fail("train.eval_interval", f"must be >= 0 (0 = only at the end), got {t.eval_interval}")
    if t.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if t.dtype not in ("fp32", "bf16"):
        _fail("train.dtype", f"must be fp32 or bf16, got {t.dtype!r}")
    if t.compile and dims.tp > 1:
        _fail(
            "train.compile",
            "is not supported with parallel.tp > 1 (torch 2.13's compiled blocks hand the "
            "tensor-parallel DTensor layers plain-tensor gradients in backward); set "
            "train.compile=false or parallel.tp=1",
        )
    if t.grad_clip < 0:
        _fail("train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
    if t.nonfinite not in ("stop", "skip"):
        _fail("train.nonfinite", f"must be stop or skip, got {t.nonfinite!r}")
    if t.max_skipped_steps < 1:
        _fail("train.max_skipped_steps", f"must be >= 1, got {t.max_skipped_steps}")
    p = None if t.profile_steps is None else list(t.profile_steps)
    if p is not None and (len(p) != 2 or not 1 <= p[0] <= p[1] <= t.steps):
        _fail(
            "train.profile_steps",
            f"must be [first, last] with 1 <= first <= last <= train.steps ({t.steps}); got {p}",
        )
    dp = dims.dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail(
            "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel ranks ({dp}); choose a multiple of "
            f"{t.micro_batch_size * dp}",
        )


def _validate_optim(cfg: Config) -> None:
    o = cfg.optim
    if o.name not in ("adamw", "sgd"):
        _fail("optim.name", f"must be adamw or sgd, got {o.name!r}")
    if o.schedule not in ("cosine", "wsd", "constant"):
        _fail("optim.schedule", f"must be cosine, wsd or constant, got {o.schedule!r}")
    if o.implementation not in ("foreach", "fused", "for_loop", "apex"):
        _fail(
            "optim.implementation",
            f"must be foreach, fused, for_loop or apex; got {o.implementation!r}",
        )
    if not o.lr > 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0:
        # warmup_steps >= train.steps is allowed (short smoke runs): the lr ramps all run long
        _fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        _fail("optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
    if o.expert_lr_multiplier <= 0:
        _fail("optim.expert_lr_multiplier", f"must be > 0, got {o.expert_lr_multiplier}")


def _validate_apex(cfg: Config, dims: ParallelDims) -> None:
    """Where a setting asks for NVIDIA apex: importable here, and in a layout it supports."""
    o = cfg.optim
    if o.implementation == "apex":
        if o.name != "adamw":  # apex's FusedAdam would silently not be what runs
            _fail(
                "optim.implementation",
                f"apex is apex's FusedAdam (AdamW) but optim.name is {o.name}; use foreach or "
                "fused",
            )
        _require_apex(apex.OPTIMIZERS, "optim.implementation", "optim.implementation=fused")
    if cfg.model.norm_impl == "apex":
        if dims.tp > 1:
            _fail(
                "model.norm_impl",
                "apex's fused RMSNorm does not take the sequence-parallel (DTensor) activations "
                "of parallel.tp > 1; use model.norm_impl=torch or parallel.tp=1",
            )
        _require_apex(apex.NORMALIZATION, "model.norm_impl", "model.norm_impl=torch")


def _validate_node_groups(cfg: Config, dims: ParallelDims) -> None:
    """Node-limited routing and the locality bias need each node group of experts on one node
    of every EP group."""
    moe, p = cfg.model.moe, cfg.parallel
    key = "max_node_groups" if moe.max_node_groups is not None else "locality_bias"
    if moe.max_node_groups is None and moe.locality_bias == 0:
        return
    if p.expert_sharding != "ep":
        _fail(
            f"model.moe.{key}",
            "node groups follow the expert-parallel placement; FSSDP computes every expert "
            "where its tokens are (no inter-node token traffic to limit): use "
            "parallel.expert_sharding=ep",
        )
    if dims.ep == 1:
        return  # every expert on every rank: the groups are the config's alone
    if moe.locality_bias > 0 and dims.tp > 1:
        _fail(
            "model.moe.locality_bias",
            "tensor-parallel ranks route each micro-batch together, and theirs may sit on "
            "different nodes (no one 'own node' per token): use parallel.tp=1 with it",
        )
    per_node = p.ep_ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if not per_node:
        _fail(
            f"model.moe.{key}",
            "needs the ranks per node to place node groups under expert parallelism: set "
            "parallel.ep_ranks_per_node, or launch with torchrun (which sets LOCAL_WORLD_SIZE)",
        )
    nodes, local = dims.ep_node_layout(per_node)
    if moe.num_node_groups % nodes:
        _fail(
            "model.moe.num_node_groups",
            f"{moe.num_node_groups} node groups do not split over the {nodes} nodes of an EP "
            f"group (parallel.ep={dims.ep}, {local} EP ranks per node): use a multiple of "
            f"{nodes} so that each node group lies on one node",
        )


def _require_apex(part: tuple[str, str], setting: str, fallback: str) -> None:
    why = apex.problem(part)
    if why is not None:
        raise ConfigError(apex.message(setting, why, fallback))


def _validate_cp(cfg: Config, dims: ParallelDims) -> None:
    """Context parallelism: sequences split in 2 x cp load-balanced chunks (each further split
    over tp by sequence parallelism); what it does not compose with, one line each."""
    m, cp = cfg.model, dims.cp
    chunks = 2 * cp * dims.tp
    if cfg.train.seq_len % chunks:
        _fail(
            "train.seq_len",
            f"{cfg.train.seq_len} is not divisible by 2 x parallel.cp x parallel.tp = {chunks} "
            "(each cp rank holds 2 load-balanced chunks of every sequence, split over tp); pick "
            f"a multiple of {chunks}",
        )
    if cfg.data.document_mask:
        _fail(
            "data.document_mask",
            f"context parallelism (parallel.cp={cp}) runs full causal ring attention, without "
            "document masks; use parallel.cp=1 or data.document_mask=false",
        )
    if cfg.train.compile:
        _fail(
            "train.compile",
            f"is not supported with parallel.cp={cp} (the context-parallel attention and token "
            "gather run collectives inside autograd functions, untested under torch.compile); "
            "set train.compile=false or parallel.cp=1",
        )
    if m.num_moe_layers and router_class(m.moe.router_type).needs_token_ids:
        _fail(
            "model.moe.router_type",
            f"{m.moe.router_type!r} routes by token id, which context parallelism (parallel.cp="
            f"{cp}) does not gather for the MoE layers; use parallel.cp=1 or a learned router",
        )


def _validate_model_layout(m: ModelConfig, dims: ParallelDims) -> None:
    """Model options a TP or PP layout cannot split."""
    if m.tie_embeddings and (dims.tp > 1 or dims.pp > 1):
        _fail(
            "model.tie_embeddings",
            "tied embedding/output weights are not supported with parallel.tp > 1 or "
            "parallel.pp > 1 (they live on different stages / shard differently); untie them",
        )
    if dims.tp > 1 and m.qk_norm == "full":
        _fail(
            "model.qk_norm",
            "'full' (one norm over all heads) does not split over tensor-parallel ranks; use "
            "parallel.tp=1 or qk_norm=head",
        )
    if dims.pp > 1 and m.num_moe_layers and router_class(m.moe.router_type).needs_token_ids:
        _fail(
            "model.moe.router_type",
            f"{m.moe.router_type!r} routes by token id, which later pipeline stages do not "
            "receive; use a learned router with parallel.pp > 1",
        )
    if dims.pp > 1 and m.num_moe_layers and m.moe.gating_residual:
        _fail(
            "model.moe.gating_residual",
            "hands each MoE layer's router logits to the next MoE layer, which a pipeline "
            "stage boundary cuts; use parallel.pp=1 or gating_residual=false",
        )


def _validate_parallel(cfg: Config) -> ParallelDims:
    p, m = cfg.parallel, cfg.model
    dims = parallel_dims(cfg)
    if p.timeout_s <= 0:
        _fail("parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    if p.pp_virtual_stages < 1:
        _fail("parallel.pp_virtual_stages", f"must be >= 1, got {p.pp_virtual_stages}")
    dims.validate_model(m, p.pp_virtual_stages)
    if m.num_moe_layers:
        _validate_node_groups(cfg, dims)
        if p.ep_a2a == "node_dedup" and dims.ep > 1:
            for key, bad in (
                ("pad_to_capacity", m.moe.pad_to_capacity),
                ("expert_choice", m.moe.expert_choice is not None),
            ):
                if bad:
                    _fail(
                        f"model.moe.{key}",
                        "pads every expert to fixed rows, which parallel.ep_a2a=node_dedup "
                        "does not; use parallel.ep_a2a=flat or hierarchical",
                    )
    _validate_model_layout(m, dims)
    if dims.cp > 1:
        _validate_cp(cfg, dims)
    if cfg.train.seq_len % dims.tp:
        _fail(
            "train.seq_len",
            f"{cfg.train.seq_len} is not divisible by parallel.tp={dims.tp} (sequence "
            "parallelism splits each sequence over the tensor-parallel ranks)",
        )
    _validate_pp_schedule(p.pp_schedule)
    per_step = cfg.train.micro_batch_size * dims.dp
    if dims.pp > 1 and per_step > 0 and cfg.train.global_batch_size % per_step == 0:
        from moetrain.parallel.pipeline import schedule_error

        n_micro = cfg.train.global_batch_size // per_step
        why = schedule_error(p.pp_schedule, dims.pp, p.pp_virtual_stages, n_micro)
        if why is not None:
            raise ConfigError(why)
    elif p.pp_virtual_stages != 1:
        _fail("parallel.pp_virtual_stages", "applies to pipeline layouts only (parallel.pp > 1)")
    try:
        validate_placement_options(p, dims)
    except LayoutError:
        raise
    except ValueError as err:  # an option's value: a config error like the others
        raise ConfigError(str(err)) from None
    return dims


def _validate_pp_schedule(schedule: str) -> None:
    """A choice is checked even where unused (``parallel.pp=1``)."""
    from moetrain.parallel.pipeline import SCHEDULES

    if schedule not in SCHEDULES:
        _fail("parallel.pp_schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _validate_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    if c.interval < 0:
        _fail("checkpoint.interval", f"must be >= 0 (0 = no checkpoints), got {c.interval}")
    if c.keep_last < 0:
        _fail("checkpoint.keep_last", f"must be >= 0 (0 = keep all), got {c.keep_last}")
    if c.resume not in ("auto", "never") and not os.path.isdir(c.resume):
        _fail(
            "checkpoint.resume",
            f"{c.resume!r} is neither auto, never nor a checkpoint directory "
            "(<run.dir>/checkpoints/<step>)",
        )
    if c.init_from is not None and not os.path.isdir(c.init_from):
        _fail("checkpoint.init_from", f"{c.init_from!r} is not a directory")


# --- keys the schema does not have ----------------------------------------------------------


def reject_unknown_keys(dict_cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming every key of the composed config that its schema lacks.

    Hydra rejects an unknown ``key=value`` itself, but ``+key=value`` and ``++key=value`` add
    the key, which ``OmegaConf.to_object`` then drops without a word. Keys under a dict-typed
    field (none today) are the field's own and stay allowed.
    """
    unknown = list(_unknown_keys(dict_cfg, ""))
    if unknown:
        raise ConfigError("; ".join(unknown))


def _unknown_keys(node: DictConfig, prefix: str) -> Iterator[str]:
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    names: list[str] | None = None
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        names = [f.name for f in dataclasses.fields(schema)]
    for raw_key, value in node.items_ex(resolve=False):
        key = str(raw_key)
        path = f"{prefix}{key}"
        if names is not None and key not in names:
            yield _unknown_key_message(path, key, names)
        elif isinstance(value, DictConfig):
            yield from _unknown_keys(value, f"{path}.")


def closest_key_fix(path: str, key: str, names: list[str]) -> str:
    """The fix for unknown key ``key`` at ``path`` among its parent's ``names``: the closest
    key (``did you mean train.steps?``), else the keys there are."""
    parent = path.rpartition(".")[0]
    guess = difflib.get_close_matches(key, names, n=1)
    if guess:
        return f"did you mean {parent + '.' if parent else ''}{guess[0]}?"
    return f"remove it ({parent or 'the config'} has: {', '.join(names)})"


def _unknown_key_message(path: str, key: str, names: list[str]) -> str:
    fix = closest_key_fix(path, key, names)
    return f"{path}: unknown key (a +/++ override cannot add keys the config schema lacks); {fix}"
