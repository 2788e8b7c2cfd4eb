"""Layout-invariant initialization: any shard of any parameter, generated alone.

torch's CPU generator is sequential, so "initialize the full model, then shard it" is the only
way to get the same weights at every layout from one seed — and it needs the full model on every
rank. Here every random tensor is instead cut into fixed-size **blocks**, and each block is drawn
from its own generator, seeded by a counter: ``hash(seed, parameter name, block index)``. A rank
generates the blocks its shard intersects (at most one block at a time) and keeps the
intersection, so the weights are bitwise the same whatever the layout, in one process too.

Blocks: a tensor's leading dim is cut into runs of rows (``rows = max(1, BLOCK_ELEMENTS // row
size)``); a 3-D tensor (routed experts, ``[E, X, Y]``) is cut per expert, then into runs of rows
of its dim 1. ``BLOCK_ELEMENTS`` is 2**16 (256 KiB of fp32; one row when a row is larger): the
largest transient allocation of an initialization beyond the shard itself. The weights depend on
the seed and on this block size, never on the layout.

What each tensor gets (the distribution) is the model's own ``reset_parameters`` code, recorded
once on the meta device (:func:`record_init_specs`): ``nn.init.normal_`` becomes a normal spec with
its std, ``ones_`` / ``zeros_`` / ``fill_`` / ``zero_`` a constant. A draw is
``N(0, 1) * std`` in fp32 (``torch.randn`` with the block's generator), cast to the tensor's dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

BLOCK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class InitSpec:
    """``kind``: "normal" (mean 0, std ``value``) or "constant" (every element ``value``)."""

    kind: str
    value: float


class _Recorder(TorchFunctionMode):
    """Records which init each tensor gets instead of running it."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.specs: dict[str, InitSpec] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not args and "tensor" in kwargs:  # nn.init's functions pass everything by keyword
            kwargs = dict(kwargs)
            args = (kwargs.pop("tensor"),)
        spec = _spec_of(func, args, kwargs)
        target = args[0] if args else None
        if spec is not None and isinstance(target, Tensor) and id(target) in self.names:
            self.specs[self.names[id(target)]] = spec
            return target
        return func(*args, **kwargs)


def _spec_of(func: Any, args: tuple, kwargs: dict) -> InitSpec | None:
    if func in (nn.init.normal_, Tensor.normal_):
        mean = kwargs.get("mean", args[1] if len(args) > 1 else 0.0)
        if mean != 0.0:
            raise ValueError("layout-invariant init supports zero-mean normal draws only")
        return InitSpec("normal", float(kwargs.get("std", args[2] if len(args) > 2 else 1.0)))
    if func in (nn.init.ones_,):
        return InitSpec("constant", 1.0)
    if func in (nn.init.zeros_, Tensor.zero_):
        return InitSpec("constant", 0.0)
    if func in (nn.init.constant_, Tensor.fill_):
        return InitSpec("constant", float(kwargs.get("val", args[1] if len(args) > 1 else 0.0)))
    return None


def named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters and buffers by name (a tied tensor once, under its first name)."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def record_init_specs(module: nn.Module, reset: Callable[[], None]) -> dict[str, InitSpec]:
    """Run ``reset`` (the module's own initialization code) without touching any tensor, and
    return what it would do to each parameter and buffer, by name. Raises ``ValueError`` for a
    tensor the code leaves uninitialized."""
    names = {id(t): name for name, t in named_tensors(module)}
    with torch.no_grad(), _Recorder(names) as recorder:
        reset()
    missing = sorted(set(names.values()) - set(recorder.specs))
    if missing:
        raise ValueError(f"no initialization recorded for {missing[:3]}")
    return recorder.specs


def _block_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(dims that index blocks: 1 or 2, rows per block along the last of them)."""
    lead = 2 if len(shape) == 3 else 1
    row = math.prod(shape[lead:]) if len(shape) > lead else 1
    return lead, max(1, BLOCK_ELEMENTS // max(row, 1))


def _block_seed(seed: int, name: str, block: tuple[int, ...]) -> int:
    key = f"{seed}/{name}/{'/'.join(map(str, block))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _region(t: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the local tensor to write, the global shape, the local region's global offset)."""
    from torch.distributed.tensor import DTensor  # lazy: config checks import this module

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} is not the region {shape}")
        return local, tuple(t.shape), tuple(offset)
    return t, tuple(t.shape), (0,) * t.dim()


@torch.no_grad()
def init_tensor(t: Tensor, name: str, spec: InitSpec, seed: int) -> None:
    """Fill this process's part of ``t`` (a whole tensor, or a DTensor's local shard) as the
    full tensor ``name`` would be filled from ``seed``; a meta tensor is left alone."""
    local, shape, offset = _region(t)
    if local.is_meta or local.numel() == 0:
        return
    if spec.kind == "constant":
        local.fill_(spec.value)
        return
    lead, rows = _block_layout(shape)
    for index, block in _blocks(shape, offset, tuple(local.shape), lead, rows):
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, name, index))
        block_shape = (*[1] * (lead - 1), block.stop - block.start, *shape[lead:])
        draw = torch.randn(block_shape, generator=gen, dtype=torch.float32, device="cpu")
        draw.mul_(spec.value)
        src, dst = _intersection(draw, local, index, block, offset, lead)
        dst.copy_(src)


def _blocks(shape, offset, local_shape, lead: int, rows: int):
    """The blocks (index, rows of the row dim) that the local region intersects."""
    lo = list(offset[:lead])
    hi = [o + n for o, n in zip(offset[:lead], local_shape[:lead])]
    row_dim = lead - 1
    experts = range(lo[0], hi[0]) if lead == 2 else [None]
    first, last = lo[row_dim] // rows, (hi[row_dim] - 1) // rows
    for e in experts:
        for b in range(first, last + 1):
            start, stop = b * rows, min((b + 1) * rows, shape[row_dim])
            yield ((b,) if e is None else (e, b)), range(start, stop)


def _intersection(draw: Tensor, local: Tensor, index, block: range, offset, lead: int):
    """The part of the block's ``draw`` inside the local region, and where it goes."""
    row_dim = lead - 1
    start = max(block.start, offset[row_dim])
    stop = min(block.stop, offset[row_dim] + local.shape[row_dim])
    src = draw.narrow(row_dim, start - block.start, stop - start)
    dst = local
    if lead == 2:
        dst = dst.narrow(0, index[0] - offset[0], 1)
    dst = dst.narrow(row_dim, start - offset[row_dim], stop - start)
    for dim in range(lead, draw.dim()):  # trailing dims: keep the local columns
        src = src.narrow(dim, offset[dim], local.shape[dim])
    return src, dst


def init_module(module: nn.Module, specs: dict[str, InitSpec], seed: int) -> None:
    """Initialize every parameter and buffer of ``module`` named in ``specs`` (full-model names,
    e.g. from ``Transformer.init_specs``; DTensors get their local shard)."""
    for name, t in named_tensors(module):
        if name not in specs:
            raise KeyError(f"no initialization spec for {name!r}")
        init_tensor(t, name, specs[name], seed)
