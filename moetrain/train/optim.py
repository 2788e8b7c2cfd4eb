"""Optimizer construction with parameter groups.

Weight decay applies to weight matrices (parameters with two or more dims: embeddings, attention
and MLP projections, expert weights, the output head) and not to norms, biases or router
weights (decaying the router pulls its logits toward uniform, working against the balance the
aux losses set). Routed-expert weights get ``lr * expert_lr_multiplier`` (Hunyuan-Large's
expert-specific learning rate).

``optim.implementation`` picks the kernels: torch's ``foreach``, ``fused`` or ``for_loop``, or
``apex``: NVIDIA apex's ``FusedAdam`` in AdamW mode (NGC images ship it; AdamW only, CUDA plain
tensors), with the same groups, betas and eps, and checkpoints interchangeable with torch's
AdamW (see :func:`apex_adamw`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain import apex
from moetrain.config.schema import OptimConfig
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.router import Router


def _mesh_key(p: nn.Parameter) -> str:
    """Plain tensors and DTensors on different meshes go to different groups: foreach kernels
    take one kind at a time."""
    if not isinstance(p, DTensor):
        return ""
    mesh = p.device_mesh
    return f"{'x'.join(mesh.mesh_dim_names or ())}{mesh.mesh.flatten().tolist()}"


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups by (decay or not) x (routed expert or not) x (device mesh, for sharded
    parameters), empty groups left out."""
    expert_params = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    router_params = {
        id(p) for m in model.modules() if isinstance(m, Router) for p in m.learned_parameters()
    }
    groups: dict[tuple[bool, bool, str], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights are listed once
            continue
        seen.add(id(p))
        decay = p.dim() >= 2 and id(p) not in router_params
        groups.setdefault((decay, id(p) in expert_params, _mesh_key(p)), []).append(p)
    out = []
    for (decay, expert, mesh), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.lr * (cfg.expert_lr_multiplier if expert else 1.0),
                "name": f"{'decay' if decay else 'no_decay'}{'_experts' if expert else ''}"
                + (f"@{mesh}" if mesh else ""),
            }
        )
    return out


# optim.implementation -> torch optimizer kwargs ("apex" is apex_adamw)
_TORCH_KERNELS = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "for_loop": {"foreach": False},
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`parameter_groups` with ``cfg.implementation``'s kernels. Raises
    ``ValueError`` naming ``optim.implementation`` where ``apex`` cannot run (see
    :func:`apex_adamw`)."""
    groups = parameter_groups(model, cfg)
    if cfg.implementation == "apex":
        return apex_adamw(groups, cfg)
    kwargs = _TORCH_KERNELS[cfg.implementation]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kwargs)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, **kwargs
    )


def apex_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """apex's ``FusedAdam`` with ``adam_w_mode=True`` (decoupled weight decay: AdamW) over
    ``groups`` (each group's lr and weight decay kept), ``cfg``'s lr, betas and eps.

    Raises ``ValueError`` naming ``optim.implementation`` for ``optim.name=sgd``, for parameters
    that are DTensors (FSDP2, tensor or expert parallelism: apex's multi-tensor kernels take plain
    CUDA tensors; torch's ``fused`` takes DTensors) or not on a CUDA device, and where NVIDIA
    apex cannot be imported (:func:`moetrain.apex.problem`)."""
    setting = "optim.implementation"
    if cfg.name != "adamw":
        raise ValueError(
            f"{setting}: apex is apex's FusedAdam (AdamW), not {cfg.name}; use foreach or fused"
        )
    params = [p for g in groups for p in g["params"]]
    if any(isinstance(p, DTensor) for p in params):
        raise ValueError(
            f"{setting}: apex's FusedAdam takes plain tensors, but this layout shards the "
            "parameters as DTensors (FSDP2, tensor or expert parallelism); use "
            "optim.implementation=fused (torch's fused AdamW kernels take DTensors)"
        )
    devices = sorted({p.device.type for p in params} - {"cuda"})
    if devices:
        raise ValueError(
            f"{setting}: apex's FusedAdam runs CUDA kernels, but parameters are on "
            f"{', '.join(devices)}; use optim.implementation=foreach"
        )
    fused_adam = apex.require(apex.OPTIMIZERS, setting, "optim.implementation=fused").FusedAdam
    return fused_adamw(fused_adam, groups, cfg)


def fused_adamw(fused_adam: type, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``fused_adam`` (apex's ``FusedAdam`` class), :func:`with_torch_adamw_state`, in AdamW mode
    over ``groups`` with ``cfg``'s lr, betas, eps and weight decay (each group's own lr and weight
    decay win)."""
    return with_torch_adamw_state(fused_adam)(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        adam_w_mode=True,
    )


def with_torch_adamw_state(fused_adam: type) -> type:
    """A subclass of apex's ``FusedAdam`` class whose state and ``zero_grad`` are torch's AdamW's.

    apex counts steps per param group (``group["step"]``), and checkpoints save per-parameter
    state only (``moetrain.checkpoint.native``: param groups come from the config), so a resume
    would restart its bias correction. The subclass mirrors the count into every parameter's
    ``state["step"]`` (a float32 CPU scalar, as torch's AdamW keeps it) after each step and reads
    it back (the largest, where they differ) after ``load_state_dict``; with ``exp_avg`` and
    ``exp_avg_sq``, named and shaped as torch's, a checkpoint moves between torch's AdamW and
    apex's either way. ``zero_grad`` takes torch's ``set_to_none`` (apex's takes no argument)."""

    class FusedAdamW(fused_adam):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.register_load_state_dict_post_hook(_steps_from_state)

        def step(self, closure=None):
            loss = super().step(closure)
            _steps_to_state(self)
            return loss

        def zero_grad(self, set_to_none: bool = True) -> None:
            torch.optim.Optimizer.zero_grad(self, set_to_none)

    FusedAdamW.__qualname__ = f"with_torch_adamw_state({fused_adam.__qualname__})"
    return FusedAdamW


def _steps_to_state(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        if "step" not in group:
            continue
        step = float(group["step"])
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:  # no update yet (no gradient): torch's AdamW has no state there either
                continue
            if torch.is_tensor(state.get("step")):  # a loaded one keeps its device and dtype
                state["step"].fill_(step)
            else:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def _steps_from_state(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        steps = [float(s["step"]) for p in group["params"] if "step" in (s := opt.state.get(p, {}))]
        if steps:
            group["step"] = int(max(steps))
