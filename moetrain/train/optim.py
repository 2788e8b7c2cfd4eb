"""Optimizer construction with parameter groups.

Weight decay applies to weight matrices (parameters with two or more dims: embeddings, attention
and MLP projections, expert weights, the output head) and not to norms, biases or router
weights (decaying the router pulls its logits toward uniform, working against the balance the
aux losses set). Routed-expert weights get ``lr * expert_lr_multiplier`` (Hunyuan-Large's
expert-specific learning rate).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for_loop": {"foreach": False}}
    kwargs = impl[cfg.implementation]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kwargs)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, **kwargs
    )
