"""``train.compile``: regional compilation, one ``torch.compile`` per decoder block.

Each block is compiled in place, so parameter names, state dicts, checkpoints, FSDP2 and the HF
export see the same module tree as without compilation. Blocks share their code, so the first
block of each kind (dense, MoE) compiles and the others reuse its graphs. In the layout order
compilation comes after activation checkpointing and before FSDP2 (whose hooks torch.compile
does not trace).

What stays eager inside an MoE block, by design (:func:`keep_host_work_eager`): the token
exchange (``dispatcher.run``: expert sort, permutation, all-to-all, the expert GEMMs, combine),
whose shapes are the per-expert row counts the routing decides, known only on the host after a
sync (compiled, every new set of counts would be a new graph: a recompilation per step until
torch's recompile limit, after which torch runs it eagerly anyway); and the per-call host
bookkeeping (call numbering, noise keys, running counts), whose Python ints would otherwise be
guards. Every graph break of the MoE layer, and why it remains, is listed in docs/moe.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moetrain.models.block import TransformerBlock
from moetrain.moe.layer import MoELayer


def run_eagerly(obj: object, names: Iterable[str], reason: str) -> None:
    """Make ``obj``'s methods ``names`` run eagerly inside compiled code (a graph break at each
    call), for this object only: an instance attribute shadows each method. Idempotent.
    Applied here, when compilation is asked for, rather than by decorators, so that importing
    the MoE modules (config checks do) does not import torch's compiler."""
    for name in names:
        method = getattr(obj, name)
        if not getattr(method, "_torchdynamo_disable", False):
            setattr(obj, name, torch.compiler.disable(method, reason=reason))


def keep_host_work_eager(layer: MoELayer) -> None:
    """Make the parts of ``layer`` that must not be traced run eagerly in a compiled block: the
    token exchange (``dispatcher.run``: data-dependent shapes), the step's bookkeeping
    (``RoutingStep.EAGER_UNDER_COMPILE``), and the ``eager_under_compile`` methods of the
    router and of the layer itself (its statistics log). The router math, the aux losses and
    the rest of the block stay compiled. Apply it after the placement installed the layout's
    dispatcher."""
    run_eagerly(layer.dispatcher, ("run",), "MoE token exchange: data-dependent shapes")
    step = layer.routing_step
    run_eagerly(step, step.EAGER_UNDER_COMPILE, "per-call bookkeeping: host-side state")
    run_eagerly(layer.router, layer.router.eager_under_compile, "host-side router state")
    run_eagerly(layer, getattr(layer, "eager_under_compile", ()), "host-side statistics")


def compile_block(block: TransformerBlock, backend: str = "inductor") -> None:
    """Compile ``block`` in place with ``backend``: its whole call, or, when it checkpoints its
    activations (set the flag first), the function the checkpoint runs and reruns in backward
    (``block._forward``). Call once per block."""
    for module in block.modules():
        if isinstance(module, MoELayer):
            keep_host_work_eager(module)
    if block.activation_checkpointing:
        # torch.compile traces a checkpoint as one region, and a graph break inside it (the MoE
        # layer has some) sends the whole checkpointed block back to eager: compile inside it
        compiled = torch.compile(block._forward, backend=backend)
        block._forward = compiled  # type: ignore[method-assign]
    else:
        block.compile(backend=backend)


def apply_compile(blocks: Iterable[TransformerBlock], backend: str = "inductor") -> None:
    """``train.compile``: compile each decoder block of ``blocks`` in place
    (:func:`compile_block`). Apply after TP, the expert placement and the activation
    checkpointing flag, before FSDP2.

    Sets ``torch._dynamo.config.allow_unspec_int_on_nn_module`` for the process: integer module
    attributes that differ between blocks (an MoE layer's index) are otherwise constants of the
    graph, one recompilation per block, and past torch's recompile limit (8) the remaining
    blocks would silently run eagerly.
    """
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for block in blocks:
        compile_block(block, backend)
