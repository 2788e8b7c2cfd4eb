"""Expert placement: how a layout holds and runs the routed experts of its MoE layers.

One object per strategy, chosen by ``parallel.expert_sharding`` from a registry:

- ``ep`` (:mod:`moetrain.parallel.ep_placement`): experts split over the EP ranks, tokens move
  through an all-to-all;
- ``fssdp`` (:mod:`moetrain.parallel.fssdp_placement`): every expert sharded on F over a
  stage's ranks, materialized sparsely each call.

A placement owns everything the rest of the code would otherwise ask "which strategy is this?"
for: its layout checks (before any process group starts), the mesh it needs beyond the dense and
expert meshes, its options (``parallel.<key>`` fields it declares), ``apply`` to each MoE layer,
its description line, its checkpoint layout key, its rows in the plan tool and its per-step
statistics. The trainer, CLI, plan tool and config validation talk to this interface only.

Layout-level methods are class methods (they need the degrees, not the options);
``ParallelDims`` calls them while it validates itself. Adding a placement: one new file with a
subclass, plus one line in ``_BUILTIN`` (or :func:`register_placement` from user code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moetrain.models.config import ModelConfig
    from moetrain.moe.layer import MoELayer
    from moetrain.parallel.context import ParallelContext
    from moetrain.parallel.dims import ParallelDims, RankCoords


class StepStatistics(Protocol):
    """Per-step statistics that add up over ranks. Every rank returns a float64 vector of the
    same length from ``step_sums`` (draining what it recorded this step); the trainer sums the
    vectors over pipeline stages and data-parallel ranks (one all-reduce for all sources) and
    turns the total into ``metrics.jsonl`` fields with ``step_fields``."""

    def step_sums(self) -> Tensor: ...

    def step_fields(self, totals: Tensor) -> dict[str, Any]: ...


class ExpertPlacement:
    """A strategy for the routed experts. Subclasses set ``name`` and ``options`` (the
    ``parallel.<key>`` fields this placement owns, with their defaults: another placement's
    layouts refuse a non-default value) and override what differs from the defaults below (the
    defaults keep each expert whole on every rank of its layer)."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    # True when the placement shards the expert weights itself (FSDP then leaves them alone)
    shards_experts: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"{self.name} placement: unknown option(s) {unknown}")
        self.values = {**self.options, **options}

    @classmethod
    def from_config(cls, parallel_cfg: Any, **resolved: Any) -> ExpertPlacement:
        """The placement with its options read from ``parallel_cfg`` (``cfg.parallel``);
        ``resolved`` overrides values derived from the environment."""
        values = {key: getattr(parallel_cfg, key, default) for key, default in cls.options.items()}
        return cls(**{**values, **resolved})

    # --- layout level (before any process group) -------------------------------------------

    @classmethod
    def validate_dims(cls, dims: ParallelDims) -> None:
        """Raise ``LayoutError`` if the degrees do not suit this placement."""

    @classmethod
    def validate_model(cls, dims: ParallelDims, model: ModelConfig) -> None:
        """Raise ``LayoutError`` if the model's shapes do not split as this placement needs."""

    @classmethod
    def mesh(cls, dims: ParallelDims, device_type: str) -> DeviceMesh | None:
        """The placement's own mesh, if it needs one (collective: every rank builds it)."""
        return None

    @classmethod
    def checkpoint_layout(cls, dims: ParallelDims) -> dict[str, Any]:
        """Keys this placement adds to a checkpoint's layout record (a resume compares layouts:
        equal ones restore per-rank state exactly)."""
        return {}

    @classmethod
    def rank_experts(
        cls, dims: ParallelDims, coords: RankCoords, num_experts: int
    ) -> tuple[str, int]:
        """For the plan tool: which experts ``coords`` holds (text), and by how much the routed
        expert parameters are divided to give what it stores."""
        return "all", 1

    @classmethod
    def share_note(cls) -> str:
        """How the plan tool's expert shares were computed."""
        return "experts: whole on every rank"

    # --- options and run time -----------------------------------------------------------------

    def validate(self, dims: ParallelDims) -> None:
        """Check this placement's option values against the layout (``ConfigError``-style
        ``ValueError`` naming ``parallel.<key>``)."""

    def describe(self, dims: ParallelDims) -> str:
        """One line for the start banner and the plan tool."""
        return f"experts {self.name}"

    def setup(self, ctx: ParallelContext) -> None:
        """Collective set-up before ``apply`` (every rank calls it once, in the same place)."""

    def apply(self, layer: MoELayer, ctx: ParallelContext) -> None:
        """Shard ``layer``'s routed experts and install its dispatcher (distributed layouts)."""

    def reduce_gradients(self, moe_layers: list[MoELayer], ctx: ParallelContext) -> None:
        """After the last backward of a step: reduce the expert gradients this placement owns
        (a placement with ``shards_experts`` that FSDP leaves alone and whose backward does not
        reduce them itself). Sums, as every data-parallel reduction here."""

    def step_statistics(
        self,
        model: ModelConfig,
        moe_layers: list[MoELayer],
        moe_ids: list[int],
        ctx: ParallelContext,
    ) -> list[StepStatistics]:
        """Per-step statistics this placement logs for this rank's ``moe_layers`` (global MoE
        indices ``moe_ids``); none by default. Every rank must return sources of equal sizes."""
        return []


# name -> "module:Class"; imported on first use so that importing the registry loads no
# placement (and the trainer and config modules import no placement's module)
_BUILTIN = {
    "ep": "moetrain.parallel.ep_placement:EPPlacement",
    "fssdp": "moetrain.parallel.fssdp_placement:FSSDPPlacement",
}
_REGISTERED: dict[str, type[ExpertPlacement]] = {}


def register_placement(cls: type[ExpertPlacement]) -> type[ExpertPlacement]:
    """Make ``cls`` available as ``parallel.expert_sharding=<cls.name>`` (usable as a class
    decorator). In a multi-process launch every process must register it (e.g. at import of
    the module that defines it)."""
    _REGISTERED[cls.name] = cls
    return cls


def placement_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def placement_class(name: str) -> type[ExpertPlacement]:
    """The registered placement ``name``; ``LayoutError`` naming the choices otherwise."""
    if name not in _REGISTERED:
        if name not in _BUILTIN:
            from moetrain.parallel.dims import LayoutError

            raise LayoutError(
                f"parallel.expert_sharding: must be one of {placement_names()}, got {name!r}"
            )
        module, cls_name = _BUILTIN[name].split(":")
        register_placement(getattr(importlib.import_module(module), cls_name))
    return _REGISTERED[name]


def all_option_keys() -> dict[str, str]:
    """``parallel.<key>`` -> the placement that owns it, over every registered placement."""
    owners: dict[str, str] = {}
    for name in placement_names():
        for key in placement_class(name).options:
            owners[key] = name
    return owners


def validate_placement_options(parallel_cfg: Any, dims: ParallelDims) -> ExpertPlacement:
    """The configured placement, after checking its options and that no other placement's
    option is set away from its default."""
    placement = placement_class(dims.expert_sharding).from_config(parallel_cfg)
    placement.validate(dims)
    for key, owner in all_option_keys().items():
        if owner == dims.expert_sharding:
            continue
        default = placement_class(owner).options[key]
        if getattr(parallel_cfg, key, default) != default:
            raise ValueError(f"parallel.{key}: applies to parallel.expert_sharding={owner} only")
    return placement


def experts_share(
    dims: ParallelDims, expert_params: int, coords: RankCoords, num_experts: int
) -> tuple[str, int]:
    """(experts text, routed-expert parameters stored) of the rank at ``coords`` (plan tool)."""
    text, divisor = placement_class(dims.expert_sharding).rank_experts(dims, coords, num_experts)
    return text, expert_params // divisor
