"""Router registry: ``model.moe.router_type`` -> router class.

A new router is one module with a :class:`moetrain.moe.router.Router` subclass plus one
``register_router`` line below (or a call from the caller's own code, e.g. a test). Config
validation accepts exactly the registered names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetrain.moe.baseline_routers import HashRouter, RandomRouter
from moetrain.moe.router import Router
from moetrain.moe.topk_router import TopKRouter

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str, cls: type[Router]) -> None:
    """Make ``cls`` the router of ``router_type=name``; raises ``ValueError`` if ``name`` is
    taken by another class (registering the same class again is a no-op)."""
    if ROUTERS.get(name, cls) is not cls:
        raise ValueError(f"router_type {name!r} is already registered to {ROUTERS[name].__name__}")
    ROUTERS[name] = cls


def router_class(name: str) -> type[Router]:
    """The class registered as ``name``; ``KeyError`` if none (``MoEConfig.validate`` checks)."""
    return ROUTERS[name]


def build_router(cfg: MoEConfig) -> Router:
    """A new, uninitialized router of ``cfg.router_type`` (the layer calls reset_parameters)."""
    return router_class(cfg.router_type)(cfg)


register_router("learned", TopKRouter)
register_router("random", RandomRouter)
register_router("hash", HashRouter)
