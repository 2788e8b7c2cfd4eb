"""The training app's structured config: one dataclass per component, composed into ``Config``.

Field types are the ones OmegaConf accepts, so Hydra rejects an unknown key or a wrong type at
start. Components validate their own fields; ``moetrain.config.validate.validate`` checks what
spans components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from moetrain.data.config import DataConfig
from moetrain.models.config import ModelConfig


@dataclass
class RunConfig:
    # null: runs/<timestamp>, resolved once per launch (moetrain.train.run_dir)
    dir: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 400
    seed: int = 0
    global_batch_size: int = 16
    micro_batch_size: int = 2
    seq_len: int = 256
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    dtype: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights)
    compile: bool = False  # torch.compile each decoder block (regional compilation)
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables periodic evaluation (the final one always runs)
    eval_batches: int = 8
    deterministic: bool = False
    peak_flops_per_device: Optional[float] = None  # null: measured at start / known-GPU table
    # a non-finite loss or grad norm: stop (exit 3, nothing saved after it) | skip the update
    nonfinite: str = "stop"
    max_skipped_steps: int = 10  # skip: stop after this many consecutive skipped steps
    # [a, b]: torch.profiler trace of steps a..b in <run dir>/profile/ (null: no profiling)
    profile_steps: Optional[List[int]] = None


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    # foreach | fused | for_loop (torch's kernels) | apex (NVIDIA apex's FusedAdam: NGC images)
    implementation: str = "foreach"
    expert_lr_multiplier: float = 1.0  # routed-expert weights get lr * this
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # lr at the end of the decay, as a fraction of lr
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the ranks left over
    tp: int = 1
    pp: int = 1
    # context parallelism: each sequence split over cp ranks (ring attention), 2 load-balanced
    # chunks per rank; world = pp x dp_replicate x dp_shard x cp x tp
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp_schedule: str = "1f1b"  # 1f1b | gpipe | interleaved_1f1b
    pp_virtual_stages: int = 1  # stages per pp rank (interleaved_1f1b: >= 2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # all-to-all dispatcher: chunks whose exchanges overlap the experts (1 = no overlap)
    ep_overlap_chunks: int = 1
    # flat | hierarchical (inter-node traffic only between node peers) | node_dedup (a token
    # crosses to each destination node once)
    ep_a2a: str = "flat"
    # hierarchical, node_dedup, node groups: ranks per node; null = LOCAL_WORLD_SIZE
    ep_ranks_per_node: Optional[int] = None
    # ep (experts split over parallel.ep ranks) | fssdp (every expert sharded over a stage's
    # ranks, materialized each call where its tokens are: docs/parallelism.md)
    expert_sharding: str = "ep"
    fssdp_rematerialize: bool = True  # free gathered experts after forward, gather again in bwd
    fssdp_slack: float = 0.05  # a rank may compute (1 + slack) x the mean rows before splitting
    # a step (or eval, or checkpoint save) longer than this ends the run with a diagnosis
    # (hang-rank<N>.txt, exit 75); the process group's own timeout is 60 s longer
    timeout_s: float = 600.0


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = none but the final one
    final: bool = True  # a checkpoint after the last step (unless the interval already saved it)
    resume: str = "auto"  # auto (newest complete one in run.dir) | never | a checkpoint directory
    # model weights only: a native checkpoint (step or run directory) or a Hugging Face directory
    init_from: Optional[str] = None
    keep_last: int = 3  # checkpoints kept (older ones deleted); 0 = keep all


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "moetrain"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    tensorboard: bool = False  # every logged row also as scalars in <run dir>/tensorboard/


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
