"""Count the host syncs a piece of code would make on a GPU, by running it on the CPU.

On a CPU every tensor is on the host, so nothing ever waits for a device; on a GPU, reading a
device tensor's values on the host (``.tolist()``, ``.item()``, ``bool(t)``, ``.cpu()``, an op
whose output shape depends on the values, such as ``nonzero`` or boolean indexing) blocks the
host until the device has computed them. :class:`HostSyncCounter` emulates the distinction: the
tensors it is told live "on the device" (a layer's input and parameters), and every tensor
computed from one of them, are device tensors; tensors made on the host (``torch.tensor(list)``,
``torch.arange(n)`` with no device input) are host tensors. Each read of a device tensor's values
on the host is recorded as a :class:`SyncEvent` with the moetrain function that made it.

Conventions the code under test keeps: a host copy is made with ``.cpu()`` (``.to(device)`` is
taken to stay on the device: on the CPU the two cannot be told apart).

Limits: only what passes through Python or the torch dispatcher is seen (a C++ kernel that
reads its input's values directly, as CPU kernels do, is invisible: ``bincount``'s internal max,
for instance, is seen because it dispatches ``item()``); a factory call meant for the device but
made without a device input counts as host.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# ops whose output shape depends on the input's values: the host must read them on a GPU
_VALUE_SHAPED = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::argwhere",
}


@dataclass(frozen=True)
class SyncEvent:
    """One host read of device data: ``kind`` (``tolist``, ``item``, ``cpu``, ``aten::nonzero``,
    ...) and ``site``, the innermost moetrain function that caused it (``module:function``)."""

    kind: str
    site: str


def _site() -> str:
    """The innermost frame in moetrain's library code (not its testing helpers)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/moetrain/" in path and "/moetrain/testing/" not in path:
            module = path[path.rindex("/moetrain/") + 1 : -3].replace("/", ".")
            return f"{module}:{frame.name}"
    return "<outside moetrain>"


class HostSyncCounter(TorchDispatchMode):
    """Context manager: ``with HostSyncCounter(device_tensors) as syncs: ...`` records in
    ``syncs.events`` every host read of a device tensor's values (module docstring).

    ``device_tensors``: tensors (or modules, whose parameters count, DTensors by their local
    shard) that live on the emulated device. ``mark(t)`` adds more later.
    """

    _PATCHED = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, device_tensors: Iterable[Any] = ()) -> None:
        super().__init__()
        self._device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.events: list[SyncEvent] = []
        self._lock = threading.Lock()
        self._in_python_read = threading.local()
        self._saved: dict[str, Any] = {}
        for item in device_tensors:
            self.mark(item)

    # --- which tensors are on the device -------------------------------------------------

    def mark(self, item: Any) -> None:
        """Treat ``item`` (a tensor, a DTensor, or a module's parameters) as device data."""
        if isinstance(item, torch.nn.Module):
            for p in item.parameters():
                self.mark(p)
            return
        local = getattr(item, "_local_tensor", None)
        if local is not None:
            self.mark(local)
        if isinstance(item, torch.Tensor):
            self._device[item] = True

    def on_device(self, t: torch.Tensor) -> bool:
        local = getattr(t, "_local_tensor", None)
        return t in self._device or (local is not None and local in self._device)

    # --- recording -----------------------------------------------------------------------

    def _record(self, kind: str) -> None:
        with self._lock:
            self.events.append(SyncEvent(kind, _site()))

    def counts(self) -> Counter[tuple[str, str]]:
        """(site, kind) -> how many times."""
        return Counter((e.site, e.kind) for e in self.events)

    def sites(self) -> Counter[str]:
        """site -> how many syncs it made."""
        return Counter(e.site for e in self.events)

    # --- the dispatcher side: propagate device-ness, see value reads from C++ -------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        name = func._schema.name
        if from_device and not getattr(self._in_python_read, "active", False):
            if name == "aten::_local_scalar_dense":
                self._record("item")
            elif name in _VALUE_SHAPED or (name == "aten::index" and _bool_index(args)):
                self._record(name)
            elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
                self._record("aten::repeat_interleave (no output_size)")
        out = func(*args, **kwargs)
        if from_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
            for t in inputs:  # in-place and out= ops: the written tensor now holds device data
                if name.endswith("_") or "out" in kwargs or name.startswith("c10d::"):
                    self._device[t] = True
        return out

    # --- the Python side: methods that read values without dispatching -------------------

    def _wrap(self, name: str, original: Any) -> Any:
        counter = self

        def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not counter.on_device(t) or getattr(counter._in_python_read, "active", False):
                return original(t, *args, **kwargs)
            if name == "cpu":  # the copy lands on the host; on the CPU it would be `t` itself
                counter._record("cpu")
                copy = t.clone()
                counter._device.pop(copy, None)  # the clone dispatched from device data
                return copy
            counter._record(name.strip("_"))
            counter._in_python_read.active = True
            try:
                return original(t, *args, **kwargs)
            finally:
                counter._in_python_read.active = False

        return read

    def __enter__(self) -> HostSyncCounter:
        for name in self._PATCHED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


def describe(counter: HostSyncCounter) -> str:
    """The recorded syncs, one ``site: kind x count`` per line (for assertion messages)."""
    return "\n".join(f"{site}: {kind} x{n}" for (site, kind), n in sorted(counter.counts().items()))


__all__ = ["HostSyncCounter", "SyncEvent", "describe"]
