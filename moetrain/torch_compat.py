"""What differs between the torch releases moetrain supports: 2.11 (setup.py's bound, run by CI's
``torch_min`` tier) up to the pinned 2.13 and newer. It depends on torch alone, so every layer
may import it; each helper says which releases differ."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_gather_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``dist.all_gather_single`` where it exists (2.13), else ``dist.all_gather_into_tensor``
    (2.11 has only that name; 2.13 deprecates it with a FutureWarning). Looked up per call, so a
    benchmark that wraps the ``torch.distributed`` function (to count bytes) sees this call."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, **kwargs)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``dist.reduce_scatter_single`` where it exists (2.13), else
    ``dist.reduce_scatter_tensor`` (2.11's name; 2.13 deprecates it with a FutureWarning)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, **kwargs)
